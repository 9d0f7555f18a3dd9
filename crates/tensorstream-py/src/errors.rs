//! Maps core errors onto the exception hierarchy defined in `tensorstream/errors.py`, so that
//! Python users catch one base class (`TensorStreamError`) or the specific subclass they expect.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tensorstream_core::Error;

fn class_name(err: &Error) -> &'static str {
    match err {
        Error::Io { .. } => "StreamIOError",
        Error::Checksum { .. } | Error::Format { .. } => "StoreCorruptedError",
        Error::FingerprintMismatch { .. } => "StoreMismatchError",
        Error::Budget { .. } => "BudgetError",
        Error::Cancelled { .. } => "TensorStreamError",
        _ => "InvalidArgumentError",
    }
}

/// Convert a core error into the matching Python exception, with its context as attributes
/// (`path`, `unit`, `offset`, `length`, ...).
pub fn to_py(err: Error) -> PyErr {
    Python::attach(|py| match build(py, &err) {
        Ok(e) => e,
        Err(import_failure) => import_failure,
    })
}

fn build(py: Python<'_>, err: &Error) -> PyResult<PyErr> {
    let module = py.import("tensorstream.errors")?;
    let cls = module.getattr(class_name(err))?;
    let attrs = PyDict::new(py);
    match err {
        Error::Io {
            path,
            op,
            offset,
            len,
            unit,
            source,
        } => {
            attrs.set_item("path", path.to_string_lossy().to_string())?;
            attrs.set_item("op", *op)?;
            attrs.set_item("offset", *offset)?;
            attrs.set_item("length", *len)?;
            attrs.set_item("unit", unit.clone())?;
            attrs.set_item("os_errno", source.raw_os_error())?;
        }
        Error::Checksum {
            path,
            unit,
            tensor,
            offset,
            len,
            expected,
            actual,
        } => {
            attrs.set_item("path", path.to_string_lossy().to_string())?;
            attrs.set_item("unit", unit.clone())?;
            attrs.set_item("tensor", tensor.clone())?;
            attrs.set_item("offset", *offset)?;
            attrs.set_item("length", *len)?;
            attrs.set_item("expected", format!("{expected:016x}"))?;
            attrs.set_item("actual", format!("{actual:016x}"))?;
        }
        Error::Format { path, .. } | Error::FingerprintMismatch { path, .. } => {
            attrs.set_item("path", path.to_string_lossy().to_string())?;
        }
        Error::Budget { budget, .. } => attrs.set_item("budget", *budget)?,
        Error::Cancelled { unit } => attrs.set_item("unit", unit.clone())?,
        _ => {}
    }
    let exc = cls.call1((err.to_string(),))?;
    for (k, v) in attrs.iter() {
        exc.setattr(k.extract::<String>()?.as_str(), v)?;
    }
    Ok(PyErr::from_value(exc))
}

/// `?`-friendly conversion for binding functions.
pub trait IntoPyResult<T> {
    /// Map the core error into its Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
