//! Thin PyO3 bindings of `tensorstream-core`, exposed to Python as `tensorstream._core`.
//! One file per concept; every blocking call releases the GIL.

mod engine;
mod errors;
mod planner;
mod store;
mod types;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::PyLayout>()?;
    m.add_class::<store::PyStoreWriter>()?;
    m.add_class::<store::PyStore>()?;
    m.add_class::<store::PySafetensorsView>()?;
    m.add_class::<engine::PyEngine>()?;
    m.add_class::<engine::PyTicket>()?;
    m.add_class::<planner::PyPlanner>()?;
    m.add_function(wrap_pyfunction!(store::checksum, m)?)?;
    m.add_function(wrap_pyfunction!(store::store_unit_buffer_len, m)?)?;
    m.add_function(wrap_pyfunction!(store::codec_encode, m)?)?;
    m.add_function(wrap_pyfunction!(store::codec_decode, m)?)?;
    m.add_function(wrap_pyfunction!(engine::drop_page_cache, m)?)?;
    for record in types::ALL {
        record.register(m)?;
    }
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
