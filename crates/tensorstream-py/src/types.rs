//! The record types the bindings return: named tuples (so they unpack like tuples and read
//! like records), created once per interpreter in `tensorstream._core`.

use pyo3::call::PyCallArgs;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

/// One record type: its name, its fields (space-separated) and its lazily made class.
pub struct Record {
    name: &'static str,
    fields: &'static str,
    class: PyOnceLock<Py<PyAny>>,
}

impl Record {
    const fn new(name: &'static str, fields: &'static str) -> Self {
        Record {
            name,
            fields,
            class: PyOnceLock::new(),
        }
    }

    fn class<'py>(&self, py: Python<'py>) -> PyResult<&Bound<'py, PyAny>> {
        let class = self.class.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            let kwargs = PyDict::new(py);
            kwargs.set_item("module", "tensorstream._core")?;
            let namedtuple = py.import("collections")?.getattr("namedtuple")?;
            Ok(namedtuple
                .call((self.name, self.fields), Some(&kwargs))?
                .unbind())
        })?;
        Ok(class.bind(py))
    }

    /// A new record from its field values, in order.
    pub fn make<'py, A>(&self, py: Python<'py>, values: A) -> PyResult<Bound<'py, PyAny>>
    where
        A: PyCallArgs<'py>,
    {
        self.class(py)?.call1(values)
    }

    /// Add the record's class to the module.
    pub fn register(&self, m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add(self.name, self.class(m.py())?)
    }
}

/// A tensor inside a unit's read buffer.
pub static TENSOR: Record = Record::new("TensorEntry", "name dtype shape offset nbytes digest");
/// A unit of a store, as its manifest records it.
pub static UNIT: Record = Record::new(
    "UnitEntry",
    "name offset length padded_length codec checksum",
);
/// How a unit of a store is coded.
pub static UNIT_CODEC: Record =
    Record::new("UnitCodec", "name codec raw_length stored_length chunks");
/// A tensor of a safetensors checkpoint, at its absolute offset in its file.
pub static CHECKPOINT_TENSOR: Record =
    Record::new("CheckpointTensor", "dtype shape file offset nbytes");
/// One coded chunk of a unit: where its raw bytes go in the unit's buffer, where its
/// stored bytes lie in the unit's stored bytes (`Store.stored_layout`), and its mode.
pub static CHUNK: Record = Record::new(
    "ChunkEntry",
    "raw_offset raw_len stored_offset stored_len mode",
);
/// The planner's answer to an access.
pub static ACCESS: Record = Record::new(
    "Access",
    "hit prefetched load evict prefetch pressure_evicted_bytes",
);

/// Every record type, for registration.
pub static ALL: [&Record; 6] = [
    &TENSOR,
    &UNIT,
    &UNIT_CODEC,
    &CHUNK,
    &CHECKPOINT_TENSOR,
    &ACCESS,
];
