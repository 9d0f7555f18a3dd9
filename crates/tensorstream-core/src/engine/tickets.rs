//! Tickets: a submitted request's shared state, and its completion (the checks of
//! `checks` made on the chunks' and tensor parts' digests, counted, waiters woken).

use super::checks::{checksum_mismatch, TensorChecks};
use super::counters::Counters;
use super::pieces::Piece;
use crate::error::{Error, Result};
use crate::store::{ExpectedChecksum, UnitLayout, CHECKSUM_CHUNK};
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
    /// For each part of [`TensorChecks::parts`], the jobs that have yet to write it.
    part_pending: Vec<u32>,
    /// Digest of each tensor part, filled by the job that wrote its last bytes.
    part_digests: Vec<u64>,
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
    /// Tensor digests to verify, for a checksummed request whose tensors record them.
    tensor_checks: Option<TensorChecks>,
    /// Set when the request is cancelled or failed: its remaining jobs are skipped.
    pub abort: AtomicBool,
    pub state: Mutex<TicketState>,
    pub done: Condvar,
}

impl TicketInner {
    /// The state of a request for `layout` into `dest`, split into `pieces`. Tensor
    /// digests are verified with the checksum: only when the layout has one.
    pub fn new(layout: &UnitLayout, dest: *mut u8, pieces: &[Piece]) -> Result<Self> {
        let tensor_checks = match layout.checksum {
            Some(_) => TensorChecks::new(layout, pieces)?,
            None => None,
        };
        let mut part_pending = vec![0u32; tensor_checks.as_ref().map_or(0, |c| c.parts.len())];
        if let Some(checks) = &tensor_checks {
            for p in pieces {
                for i in checks.overlapping(p.dest_offset, p.dest_offset + p.len) {
                    part_pending[i] += 1;
                }
            }
        }
        let n_parts = part_pending.len();
        let n_digests = layout
            .checksum
            .map_or(0, |c| c.covered.div_ceil(CHECKSUM_CHUNK) as usize);
        let source = match (layout.extents.first(), layout.chunks.first()) {
            (Some(e), _) => (layout.files[e.file].clone(), e.file_offset),
            (None, Some(c)) => (layout.files[c.file].clone(), c.file_offset),
            (None, None) => (PathBuf::new(), 0),
        };
        Ok(TicketInner {
            unit: layout.name.clone(),
            dest: dest as usize,
            expected: layout.checksum,
            source,
            tensor_checks,
            abort: AtomicBool::new(false),
            state: Mutex::new(TicketState {
                remaining: pieces.len(),
                error: None,
                digests: vec![0; n_digests],
                part_pending,
                part_digests: vec![0; n_parts],
                finished: false,
            }),
            done: Condvar::new(),
        })
    }

    /// Record that a job has written destination bytes `lo..lo + len`; returns the tensor
    /// parts (index and range) it completed, which the job then hashes.
    pub fn parts_written(&self, lo: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let Some(checks) = &self.tensor_checks else {
            return Vec::new();
        };
        let range = checks.overlapping(lo, lo + len);
        if range.is_empty() {
            return Vec::new();
        }
        let mut st = self.state.lock().expect("ticket poisoned");
        let mut ready = Vec::new();
        for i in range {
            st.part_pending[i] -= 1;
            if st.part_pending[i] == 0 {
                ready.push((i, checks.parts[i].lo, checks.parts[i].hi));
            }
        }
        ready
    }

    /// Record a completed job: the digests of the checksum chunks it wrote and of the
    /// tensor parts it completed, and its outcome (an error aborts the rest of the
    /// request); finish once no job is left.
    pub fn complete(
        &self,
        counters: &Counters,
        digests: Vec<(usize, u64)>,
        part_digests: Vec<(usize, u64)>,
        result: Result<()>,
    ) {
        let mut st = self.state.lock().expect("ticket poisoned");
        for (k, d) in digests {
            st.digests[k] = d;
        }
        for (i, d) in part_digests {
            st.part_digests[i] = d;
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
                st.error = checksum_mismatch(exp, &st.digests, &self.unit, &self.source);
            }
        }
        if st.error.is_none() {
            // Every job succeeded, so every part was hashed by the job that completed it.
            if let Some(checks) = &self.tensor_checks {
                st.error = checks.mismatch(&st.part_digests, &self.unit, &self.source);
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
