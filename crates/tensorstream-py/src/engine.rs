//! The request engine and its tickets. Blocking calls release the GIL.

use crate::errors::IntoPyResult;
use crate::store::PyLayout;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;
use std::time::Duration;
use tensorstream_core::io::{FaultPlan, FaultyBackend, MmapBackend, PreadBackend, ReadBackend};
use tensorstream_core::{Engine, EngineConfig, Priority, Ticket};

/// A pool of I/O workers reading units into caller memory.
#[pyclass(name = "Engine", module = "tensorstream._core", frozen)]
pub struct PyEngine {
    engine: Arc<Engine>,
    /// Set only for engines made by `Engine.with_faults` (tests).
    faults: Option<Arc<FaultyBackend<Arc<dyn ReadBackend>>>>,
}

/// The read backend named `name`, in the vocabulary of `tensorstream.BackendType`: "mmap",
/// "pread" (O_DIRECT, buffered where the filesystem refuses it) or "pread-buffered".
fn read_backend(name: &str) -> PyResult<Arc<dyn ReadBackend>> {
    Ok(match name {
        "mmap" => Arc::new(MmapBackend::new()),
        "pread" => Arc::new(PreadBackend::new(true)),
        "pread-buffered" => Arc::new(PreadBackend::new(false)),
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown engine backend '{other}' (known: mmap, pread, pread-buffered)"
            )))
        }
    })
}

fn start(
    backend: Arc<dyn ReadBackend>,
    num_threads: usize,
    chunk_bytes: u64,
) -> PyResult<Arc<Engine>> {
    let cfg = EngineConfig {
        num_threads,
        chunk_bytes,
    };
    Ok(Arc::new(Engine::new(backend, cfg).py()?))
}

/// One submitted request. Holds the destination buffer alive until the request is finished;
/// dropping an unfinished ticket cancels it and waits, so no worker writes into freed memory.
#[pyclass(name = "Ticket", module = "tensorstream._core")]
pub struct PyTicket {
    ticket: Ticket,
    engine: Arc<Engine>,
    keepalive: Option<Py<PyAny>>,
}

#[pymethods]
impl PyTicket {
    /// The unit this ticket reads.
    #[getter]
    fn unit(&self) -> String {
        self.ticket.unit().to_string()
    }
    /// True once every chunk has completed.
    fn is_finished(&self) -> bool {
        self.ticket.is_finished()
    }
}

impl Drop for PyTicket {
    fn drop(&mut self) {
        if !self.ticket.is_finished() {
            self.engine.cancel(&self.ticket);
            let _ = self.engine.wait(&self.ticket);
        }
        self.keepalive = None;
    }
}

fn priority(demand: bool) -> Priority {
    if demand {
        Priority::Demand
    } else {
        Priority::Prefetch
    }
}

#[pymethods]
impl PyEngine {
    /// An engine reading with `backend`: "mmap", "pread" (O_DIRECT) or "pread-buffered".
    #[new]
    #[pyo3(signature = (backend, num_threads=4, chunk_bytes=8 << 20))]
    fn new(backend: &str, num_threads: usize, chunk_bytes: u64) -> PyResult<Self> {
        Ok(PyEngine {
            engine: start(read_backend(backend)?, num_threads, chunk_bytes)?,
            faults: None,
        })
    }

    /// An engine whose reads can be made to fail on purpose (`set_fault_plan`), for tests.
    #[staticmethod]
    #[pyo3(signature = (backend, num_threads=4, chunk_bytes=8 << 20))]
    fn with_faults(backend: &str, num_threads: usize, chunk_bytes: u64) -> PyResult<Self> {
        let faults = Arc::new(FaultyBackend::new(read_backend(backend)?));
        let as_backend: Arc<dyn ReadBackend> = faults.clone();
        Ok(PyEngine {
            engine: start(as_backend, num_threads, chunk_bytes)?,
            faults: Some(faults),
        })
    }

    /// The backend in use ("mmap", "pread", "pread-buffered").
    #[getter]
    fn backend_name(&self) -> String {
        self.engine.backend_name()
    }

    /// Start reading `layout` into the `length` bytes at address `ptr`.
    ///
    /// `keepalive` is the object owning that memory (a tensor); the ticket holds it until the
    /// read finishes. The memory must not be touched until `wait` returns.
    #[pyo3(signature = (layout, ptr, length, demand, keepalive))]
    fn submit(
        &self,
        layout: &PyLayout,
        ptr: usize,
        length: usize,
        demand: bool,
        keepalive: Py<PyAny>,
    ) -> PyResult<PyTicket> {
        if ptr == 0 {
            return Err(PyValueError::new_err("null destination pointer"));
        }
        // SAFETY: `keepalive` owns the memory and is held by the ticket until the request
        // finishes (the ticket's Drop cancels and waits); the Python layer does not touch the
        // buffer before `wait` returns.
        let ticket = unsafe {
            self.engine
                .submit(&layout.inner, ptr as *mut u8, length, priority(demand))
        }
        .py()?;
        Ok(PyTicket {
            ticket,
            engine: self.engine.clone(),
            keepalive: Some(keepalive),
        })
    }

    /// Fault in (and verify, if the layout carries a checksum) a unit mapped read-only at `ptr`.
    #[pyo3(signature = (layout, ptr, demand, keepalive))]
    fn submit_populate(
        &self,
        layout: &PyLayout,
        ptr: usize,
        demand: bool,
        keepalive: Py<PyAny>,
    ) -> PyResult<PyTicket> {
        if ptr == 0 {
            return Err(PyValueError::new_err("null mapping pointer"));
        }
        // SAFETY: `keepalive` owns the mapping and is held until the request finishes.
        let ticket = unsafe {
            self.engine
                .submit_populate(&layout.inner, ptr as *const u8, priority(demand))
        }
        .py()?;
        Ok(PyTicket {
            ticket,
            engine: self.engine.clone(),
            keepalive: Some(keepalive),
        })
    }

    /// Block (GIL released) until the ticket completes; raises its error.
    fn wait(&self, py: Python<'_>, ticket: &PyTicket) -> PyResult<()> {
        let t = ticket.ticket.clone();
        let e = self.engine.clone();
        py.detach(move || e.wait(&t)).py()
    }

    /// Cancel a request; `wait` must still be called before reusing the buffer.
    fn cancel(&self, ticket: &PyTicket) {
        self.engine.cancel(&ticket.ticket);
    }

    /// Counters of the engine and its backend.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.engine.stats();
        let d = PyDict::new(py);
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("requests", s.requests)?;
        d.set_item("demand_requests", s.demand_requests)?;
        d.set_item("prefetch_requests", s.prefetch_requests)?;
        d.set_item("promoted", s.promoted)?;
        d.set_item("cancelled", s.cancelled)?;
        d.set_item("failed", s.failed)?;
        d.set_item("chunks", s.chunks)?;
        d.set_item("busy_seconds", s.busy_ns as f64 / 1e9)?;
        d.set_item("stall_seconds", s.stall_ns as f64 / 1e9)?;
        d.set_item("active_seconds", s.active_ns as f64 / 1e9)?;
        d.set_item("coded_chunks", s.coded_chunks)?;
        d.set_item("decoded_bytes", s.decoded_bytes)?;
        d.set_item("decode_seconds", s.decode_ns as f64 / 1e9)?;
        d.set_item("buffered_fallback_bytes", s.backend.buffered_fallback_bytes)?;
        d.set_item("direct_refused_files", s.backend.direct_refused_files)?;
        Ok(d)
    }

    /// Inject faults into later reads (tests): fail read N, fail from read N on, make read N
    /// short, or delay every read. Reads are counted from 1 after this call.
    #[pyo3(signature = (fail_read=None, fail_from=None, short_read=None, delay_ms=None))]
    fn set_fault_plan(
        &self,
        fail_read: Option<u64>,
        fail_from: Option<u64>,
        short_read: Option<u64>,
        delay_ms: Option<u64>,
    ) -> PyResult<()> {
        let faults = self.faults.as_ref().ok_or_else(|| {
            PyValueError::new_err("this engine injects no faults; make it with Engine.with_faults")
        })?;
        faults.set_plan(FaultPlan {
            fail_read,
            fail_from,
            short_read,
            delay: delay_ms.map(Duration::from_millis),
        });
        Ok(())
    }

    /// Open these files now and keep them open: reads then see these files even if their
    /// paths are replaced before the first read.
    fn preopen(&self, py: Python<'_>, paths: Vec<String>) -> PyResult<()> {
        let backend = self.engine.backend().clone();
        py.detach(move || {
            paths
                .iter()
                .try_for_each(|p| backend.preopen(std::path::Path::new(p)))
        })
        .py()
    }
}

/// Drop the page cache's copy of a file (benchmarks of cold reads).
#[pyfunction]
pub fn drop_page_cache(path: &str) -> PyResult<()> {
    tensorstream_core::io::drop_page_cache(std::path::Path::new(path)).py()
}
