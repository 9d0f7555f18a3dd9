//! Tickets: a submitted request's shared state, and its completion (checksum verified
//! from the chunks' digests, tensors' digests from their parts' digests, counted, waiters
//! woken).

use super::jobs::Piece;
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
    /// For each part of [`TensorChecks::parts`], the jobs that have yet to write it.
    part_pending: Vec<u32>,
    /// Digest of each tensor part, filled by the job that wrote its last bytes.
    part_digests: Vec<u64>,
    pub finished: bool,
}

/// One checksum chunk of a tensor that records a digest: bytes `lo..hi` of the
/// destination, 4 MiB of the tensor (less for its last). The job that completes its last
/// bytes hashes it, so tensors are hashed in parallel, each byte once, whatever the jobs'
/// boundaries.
struct TensorPart {
    lo: u64,
    hi: u64,
}

/// A tensor whose digest is verified; its parts are `parts[first..first + count]`.
struct TensorDigest {
    name: String,
    offset: u64,
    nbytes: u64,
    expected: u64,
    first: usize,
    count: usize,
}

/// The tensors of a checksummed request that record digests.
struct TensorChecks {
    /// In destination order, without overlap (so both ends are sorted).
    parts: Vec<TensorPart>,
    tensors: Vec<TensorDigest>,
}

impl TensorChecks {
    /// The parts of `layout`'s tensors, or None when no tensor records a digest. A tensor
    /// with a digest must lie in the bytes the pieces fill, after the previous one.
    fn new(layout: &UnitLayout, pieces: &[Piece]) -> Result<Option<Self>> {
        let bad =
            |reason: String| Error::InvalidArgument(format!("unit '{}': {reason}", layout.name));
        let mut parts = Vec::new();
        let mut tensors = Vec::new();
        let mut prev_end = 0u64;
        for t in &layout.tensors {
            let Some(expected) = t.digest else { continue };
            let end = t
                .offset
                .checked_add(t.nbytes)
                .filter(|&e| e <= layout.buffer_len && t.offset >= prev_end)
                .ok_or_else(|| {
                    bad(format!(
                        "tensor '{}' at {}+{} lies outside the {}-byte buffer or before the previous tensor with a digest (ending at {prev_end})",
                        t.name, t.offset, t.nbytes, layout.buffer_len
                    ))
                })?;
            prev_end = end;
            let first = parts.len();
            let mut lo = t.offset;
            while lo < end {
                let hi = end.min(lo + CHECKSUM_CHUNK);
                parts.push(TensorPart { lo, hi });
                lo = hi;
            }
            tensors.push(TensorDigest {
                name: t.name.clone(),
                offset: t.offset,
                nbytes: t.nbytes,
                expected,
                first,
                count: parts.len() - first,
            });
        }
        if tensors.is_empty() {
            return Ok(None);
        }
        let checks = TensorChecks { parts, tensors };
        // Every part must be filled by the pieces, whole: it is hashed once they are done.
        let mut covered = vec![0u64; checks.parts.len()];
        for p in pieces {
            for i in checks.overlapping(p.dest_offset, p.dest_offset + p.len) {
                let part = &checks.parts[i];
                covered[i] += part.hi.min(p.dest_offset + p.len) - part.lo.max(p.dest_offset);
            }
        }
        if let Some(i) =
            (0..covered.len()).find(|&i| covered[i] != checks.parts[i].hi - checks.parts[i].lo)
        {
            let part = &checks.parts[i];
            let t = checks
                .tensors
                .iter()
                .find(|t| (t.first..t.first + t.count).contains(&i))
                .expect("every part belongs to a tensor");
            return Err(bad(format!(
                "tensor '{}' has bytes {}..{} that the layout does not fill",
                t.name, part.lo, part.hi
            )));
        }
        Ok(Some(checks))
    }

    /// Indices of the parts that overlap destination bytes `lo..hi`.
    fn overlapping(&self, lo: u64, hi: u64) -> std::ops::Range<usize> {
        let start = self.parts.partition_point(|p| p.hi <= lo);
        let end = self.parts.partition_point(|p| p.lo < hi);
        start..end.max(start)
    }
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
                let actual = chunked_checksum_combine(&st.digests);
                if actual != exp.value {
                    st.error = Some(Error::Checksum {
                        path: self.source.0.clone(),
                        unit: self.unit.clone(),
                        tensor: None,
                        offset: self.source.1,
                        len: exp.covered,
                        expected: exp.value,
                        actual,
                    });
                }
            }
        }
        if st.error.is_none() {
            // Every job succeeded, so every part was hashed by the job that completed it.
            if let Some(checks) = &self.tensor_checks {
                for t in &checks.tensors {
                    let actual =
                        chunked_checksum_combine(&st.part_digests[t.first..t.first + t.count]);
                    if actual != t.expected {
                        st.error = Some(Error::Checksum {
                            path: self.source.0.clone(),
                            unit: self.unit.clone(),
                            tensor: Some(t.name.clone()),
                            offset: self.source.1.saturating_add(t.offset),
                            len: t.nbytes,
                            expected: t.expected,
                            actual,
                        });
                        break;
                    }
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
