//! Tickets: a submitted request's shared state, and its completion (checksum verified
//! from the chunks' digests, counted, waiters woken).

use super::Counters;
use crate::error::{Error, Result};
use crate::store::{chunked_checksum_combine, ExpectedChecksum, UnitLayout, CHECKSUM_CHUNK};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

pub(super) struct TicketState {
    /// Jobs not yet completed or dropped.
    pub remaining: usize,
    /// The request's first error.
    pub error: Option<Error>,
    /// Digest of each checksum chunk, filled by the jobs that wrote it.
    pub digests: Vec<u64>,
    pub finished: bool,
}

impl TicketState {
    /// The request's outcome, once finished.
    pub fn outcome(&self) -> Result<()> {
        match &self.error {
            None => Ok(()),
            Some(e) => Err(e.duplicate()),
        }
    }
}

pub(super) struct TicketInner {
    pub unit: String,
    /// Address of the destination's first byte.
    pub dest: usize,
    pub expected: Option<ExpectedChecksum>,
    /// File and offset a checksum error names: the unit's first range.
    source: (PathBuf, u64),
    /// Set when the request is cancelled or failed: its remaining jobs are skipped.
    pub abort: AtomicBool,
    pub state: Mutex<TicketState>,
    pub done: Condvar,
}

impl TicketInner {
    /// The state of a request for `layout` into `dest`, split into `jobs` jobs.
    pub fn new(layout: &UnitLayout, dest: *mut u8, jobs: usize) -> Self {
        let n_digests = layout
            .checksum
            .map_or(0, |c| c.covered.div_ceil(CHECKSUM_CHUNK) as usize);
        let source = match (layout.extents.first(), layout.chunks.first()) {
            (Some(e), _) => (layout.files[e.file].clone(), e.file_offset),
            (None, Some(c)) => (layout.files[c.file].clone(), c.file_offset),
            (None, None) => (PathBuf::new(), 0),
        };
        TicketInner {
            unit: layout.name.clone(),
            dest: dest as usize,
            expected: layout.checksum,
            source,
            abort: AtomicBool::new(false),
            state: Mutex::new(TicketState {
                remaining: jobs,
                error: None,
                digests: vec![0; n_digests],
                finished: false,
            }),
            done: Condvar::new(),
        }
    }

    /// Record a completed job: the digests of the checksum chunks it wrote, and its
    /// outcome (an error aborts the rest of the request); finish once no job is left.
    pub fn complete(&self, counters: &Counters, digests: Vec<(usize, u64)>, result: Result<()>) {
        let mut st = self.state.lock().expect("ticket poisoned");
        for (k, d) in digests {
            st.digests[k] = d;
        }
        if let Err(e) = result {
            self.abort.store(true, Ordering::SeqCst);
            if st.error.is_none() {
                st.error = Some(e);
            }
        }
        st.remaining -= 1;
        if st.remaining == 0 && !st.finished {
            self.finish(counters, &mut st);
        }
    }

    /// Count `n` jobs, taken off the queues, as done without running them: the ticket
    /// fails as cancelled (unless it already failed) and finishes once nothing is left.
    pub fn drop_queued(&self, counters: &Counters, n: usize) {
        let mut st = self.state.lock().expect("ticket poisoned");
        if st.finished {
            return;
        }
        if st.error.is_none() {
            st.error = Some(Error::Cancelled {
                unit: self.unit.clone(),
            });
        }
        st.remaining -= n;
        if st.remaining == 0 {
            self.finish(counters, &mut st);
        }
    }

    /// Mark the ticket finished: verify the checksum, count, and wake waiters.
    pub fn finish(&self, counters: &Counters, st: &mut TicketState) {
        if st.error.is_none() {
            if let Some(exp) = self.expected {
                let actual = chunked_checksum_combine(&st.digests);
                if actual != exp.value {
                    st.error = Some(Error::Checksum {
                        path: self.source.0.clone(),
                        unit: self.unit.clone(),
                        offset: self.source.1,
                        len: exp.covered,
                        expected: exp.value,
                        actual,
                    });
                }
            }
        }
        match &st.error {
            Some(Error::Cancelled { .. }) => counters.cancelled.fetch_add(1, Ordering::Relaxed),
            Some(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
        st.finished = true;
        self.done.notify_all();
    }
}

/// A submitted request. Wait for it with [`Engine::wait`](super::Engine::wait) or cancel it
/// with [`Engine::cancel`](super::Engine::cancel).
#[derive(Clone)]
pub struct Ticket(pub(super) Arc<TicketInner>);

impl Ticket {
    /// The unit this request reads.
    pub fn unit(&self) -> &str {
        &self.0.unit
    }

    /// True once every chunk has completed, successfully or not.
    pub fn is_finished(&self) -> bool {
        self.0.state.lock().expect("ticket poisoned").finished
    }
}
