//! A backend wrapper that injects faults, so tests can prove that errors reach the right
//! request, that nothing deadlocks and that the engine stays usable afterwards.

use super::{BackendStats, ReadBackend};
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What to inject. Reads are counted from 1 across all threads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Fail read number N (and only it) with EIO.
    pub fail_read: Option<u64>,
    /// Fail every read from number N on with EIO.
    pub fail_from: Option<u64>,
    /// Make read number N come back short (an unexpected end of file).
    pub short_read: Option<u64>,
    /// Sleep this long before every read.
    pub delay: Option<Duration>,
}

/// Wraps another backend and injects the faults of a [`FaultPlan`].
pub struct FaultyBackend<B> {
    inner: B,
    plan: Mutex<FaultPlan>,
    reads: AtomicU64,
}

impl<B: ReadBackend> FaultyBackend<B> {
    /// Wrap `inner` with no faults planned.
    pub fn new(inner: B) -> Self {
        FaultyBackend {
            inner,
            plan: Mutex::new(FaultPlan::default()),
            reads: AtomicU64::new(0),
        }
    }

    /// Replace the plan and restart the read count.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock().expect("plan poisoned") = plan;
        self.reads.store(0, Ordering::SeqCst);
    }
}

impl<B: ReadBackend> ReadBackend for FaultyBackend<B> {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        let n = self.reads.fetch_add(1, Ordering::SeqCst) + 1;
        let plan = self.plan.lock().expect("plan poisoned").clone();
        if let Some(d) = plan.delay {
            std::thread::sleep(d);
        }
        let eio = || {
            Error::io(
                path,
                "pread",
                offset,
                dst.len() as u64,
                std::io::Error::from_raw_os_error(libc::EIO),
            )
        };
        if plan.fail_read == Some(n) || plan.fail_from.is_some_and(|f| n >= f) {
            return Err(eio());
        }
        if plan.short_read == Some(n) {
            let half = dst.len() / 2;
            self.inner.read_into(path, offset, &mut dst[..half])?;
            return Err(super::eof(path, offset, dst.len() as u64, half as u64));
        }
        self.inner.read_into(path, offset, dst)
    }

    fn stats(&self) -> BackendStats {
        self.inner.stats()
    }

    fn preopen(&self, path: &Path) -> Result<()> {
        self.inner.preopen(path)
    }

    fn close_all(&self) {
        self.inner.close_all()
    }
}
