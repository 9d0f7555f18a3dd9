//! The request engine: a pool of I/O workers that read units into caller buffers.
//!
//! A request ([`Engine::submit`]) is split into chunks (8 MiB by default) that the workers
//! read in parallel. Demand requests always go ahead of prefetches, and a prefetch that
//! somebody starts waiting for is promoted to demand. Each chunk of a checksummed unit is
//! hashed by the worker that read it, so verification is parallel too. Errors belong to
//! their own ticket: a failed read fails that request, and the engine keeps serving others.
//!
//! A coded unit (see [`crate::codec`]) is one job per coded chunk: the worker reads the
//! chunk's stored bytes into its own aligned scratch buffer, decodes them straight into the
//! chunk's range of the destination, and hashes that range. Chunks stored raw are read
//! straight into the destination. Reads and decoding of a unit's chunks thus run on all
//! workers at once, pipelined. Since a worker decoding issues no read, the first coded
//! request also starts as many decode workers again, which take only coded chunks: while
//! some threads decode, others keep the disk busy.

use crate::codec::{ChunkMode, Decoder, CODEC_CHUNK};
use crate::error::{Error, Result};
use crate::io::{AlignedBuf, ReadBackend};
use crate::store::{
    align_up, chunked_checksum_combine, ExpectedChecksum, UnitLayout, BLOCK, CHECKSUM_CHUNK,
};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Who is waiting for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// Compute is (or soon will be) blocked on it.
    Demand,
    /// Read ahead of need; may be cancelled.
    Prefetch,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of I/O worker threads.
    pub num_threads: usize,
    /// Requests are split into chunks of this many bytes (a multiple of 4 MiB).
    pub chunk_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            num_threads: 4,
            chunk_bytes: 8 << 20,
        }
    }
}

/// Counters of the engine's work, all monotonic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Requests submitted.
    pub requests: u64,
    /// Of those, submitted as demand.
    pub demand_requests: u64,
    /// Of those, submitted as prefetch.
    pub prefetch_requests: u64,
    /// Prefetches promoted to demand because somebody waited for them.
    pub promoted: u64,
    /// Requests cancelled.
    pub cancelled: u64,
    /// Requests that failed (I/O or checksum).
    pub failed: u64,
    /// Chunks read.
    pub chunks: u64,
    /// Nanoseconds workers spent reading, summed over workers.
    pub busy_ns: u64,
    /// Nanoseconds callers spent blocked in [`Engine::wait`].
    pub stall_ns: u64,
    /// Coded chunks read and decoded.
    pub coded_chunks: u64,
    /// Bytes those chunks decoded to (their stored bytes count in `bytes_read`).
    pub decoded_bytes: u64,
    /// Nanoseconds workers spent decoding, summed over workers (part of `busy_ns`).
    pub decode_ns: u64,
    /// Counters of the backend's fallbacks.
    pub backend: crate::io::BackendStats,
}

#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    requests: AtomicU64,
    demand_requests: AtomicU64,
    prefetch_requests: AtomicU64,
    promoted: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    chunks: AtomicU64,
    busy_ns: AtomicU64,
    stall_ns: AtomicU64,
    coded_chunks: AtomicU64,
    decoded_bytes: AtomicU64,
    decode_ns: AtomicU64,
}

struct Job {
    ticket: Arc<TicketInner>,
    file: Arc<PathBuf>,
    file_offset: u64,
    /// Bytes of the destination this job fills.
    len: u64,
    dest_offset: u64,
    /// Instead of reading the file, fault in the already-mapped destination range.
    populate: bool,
    /// A coded chunk: read this many stored bytes and decode them with this mode.
    decode: Option<(u64, ChunkMode)>,
}

#[derive(Default)]
struct Queues {
    demand: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    backend: Arc<dyn ReadBackend>,
    queues: Mutex<Queues>,
    work: Condvar,
    counters: Counters,
}

struct TicketState {
    remaining: usize,
    error: Option<Error>,
    digests: Vec<u64>,
    finished: bool,
}

struct TicketInner {
    unit: String,
    dest: usize,
    expected: Option<ExpectedChecksum>,
    source: (PathBuf, u64),
    abort: AtomicBool,
    state: Mutex<TicketState>,
    done: Condvar,
}

/// A submitted request. Wait for it with [`Engine::wait`] or cancel it with [`Engine::cancel`].
#[derive(Clone)]
pub struct Ticket(Arc<TicketInner>);

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

/// A pool of I/O workers serving read requests.
pub struct Engine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Workers for coded chunks only, started with the first coded request.
    decode_workers: Mutex<Vec<JoinHandle<()>>>,
    num_threads: usize,
    chunk_bytes: u64,
}

impl Engine {
    /// Start `config.num_threads` workers reading through `backend`.
    pub fn new(backend: Arc<dyn ReadBackend>, config: EngineConfig) -> Result<Self> {
        if config.num_threads == 0 || config.num_threads > 256 {
            return Err(Error::InvalidArgument(format!(
                "num_threads must be 1 to 256, got {}",
                config.num_threads
            )));
        }
        if config.chunk_bytes == 0 || !config.chunk_bytes.is_multiple_of(CHECKSUM_CHUNK) {
            return Err(Error::InvalidArgument(format!(
                "chunk_bytes must be a nonzero multiple of {CHECKSUM_CHUNK}, got {}",
                config.chunk_bytes
            )));
        }
        let shared = Arc::new(Shared {
            backend,
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            counters: Counters::default(),
        });
        let workers = (0..config.num_threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("tensorstream-io-{i}"))
                    .spawn(move || worker(s, false))
                    .map_err(|e| Error::io("<thread>", "spawn", 0, 0, e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Engine {
            shared,
            workers,
            decode_workers: Mutex::new(Vec::new()),
            num_threads: config.num_threads,
            chunk_bytes: config.chunk_bytes,
        })
    }

    /// Start the decode workers, once.
    fn start_decode_workers(&self) -> Result<()> {
        let mut extra = self.decode_workers.lock().expect("workers poisoned");
        while extra.len() < self.num_threads {
            let s = self.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("tensorstream-dec-{}", extra.len()))
                .spawn(move || worker(s, true))
                .map_err(|e| Error::io("<thread>", "spawn", 0, 0, e))?;
            extra.push(h);
        }
        Ok(())
    }

    /// The backend's name.
    pub fn backend_name(&self) -> String {
        self.shared.backend.name()
    }

    /// The backend, for direct use (tests, diagnostics).
    pub fn backend(&self) -> &Arc<dyn ReadBackend> {
        &self.shared.backend
    }

    /// Submit a read of `layout` into `dest`.
    ///
    /// # Safety
    /// `dest` must be valid for writes of `dest_len` bytes, and must not be read or written by
    /// anybody else, until [`wait`](Self::wait) has returned for this ticket, or until
    /// [`is_finished`](Ticket::is_finished) is true, or until the engine is dropped. For
    /// O_DIRECT to apply, `dest` should be 4096-aligned.
    ///
    /// A layout with coded chunks is decoded into `dest` on the workers.
    pub unsafe fn submit(
        &self,
        layout: &UnitLayout,
        dest: *mut u8,
        dest_len: usize,
        priority: Priority,
    ) -> Result<Ticket> {
        // SAFETY: forwarded contract.
        unsafe { self.submit_inner(layout, dest, dest_len, priority, false) }
    }

    /// Fault in, and verify, a unit that the caller has memory-mapped read-only at `mapped`
    /// (the unit's first byte), instead of copying it: the zero-copy CPU path. The workers
    /// ask the kernel to populate the page tables (MADV_POPULATE_READ, or a read of each
    /// page on kernels without it), reading from the disk what the page cache lacks, and
    /// hash the unit when `layout.checksum` is set. A coded unit cannot be mapped in place
    /// and is refused.
    ///
    /// # Safety
    /// `mapped` must point to a readable mapping of at least `layout.buffer_len` bytes
    /// holding the unit's bytes, which stays mapped until the ticket finishes.
    pub unsafe fn submit_populate(
        &self,
        layout: &UnitLayout,
        mapped: *const u8,
        priority: Priority,
    ) -> Result<Ticket> {
        let len = layout.buffer_len as usize;
        // SAFETY: forwarded contract; populate jobs only read the range.
        unsafe { self.submit_inner(layout, mapped as *mut u8, len, priority, true) }
    }

    unsafe fn submit_inner(
        &self,
        layout: &UnitLayout,
        dest: *mut u8,
        dest_len: usize,
        priority: Priority,
        populate: bool,
    ) -> Result<Ticket> {
        if (dest_len as u64) < layout.buffer_len {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' needs a {}-byte buffer, got {dest_len}",
                layout.name, layout.buffer_len
            )));
        }
        if populate && !layout.chunks.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' is stored coded: it cannot be mapped in place, read it into a buffer",
                layout.name
            )));
        }
        for c in &layout.chunks {
            let inside = c
                .dest_offset
                .checked_add(c.raw_len)
                .is_some_and(|end| end <= layout.buffer_len);
            let sizes = match c.mode {
                ChunkMode::Raw => c.stored_len == c.raw_len,
                ChunkMode::Grouped { .. } => (1..=CODEC_CHUNK).contains(&c.stored_len),
            };
            if c.file >= layout.files.len()
                || !inside
                || !(1..=CODEC_CHUNK).contains(&c.raw_len)
                || !sizes
            {
                return Err(Error::InvalidArgument(format!(
                    "unit '{}' has a coded chunk outside its buffer or files, or of invalid size ({c:?})",
                    layout.name
                )));
            }
        }
        for e in &layout.extents {
            let inside = e
                .dest_offset
                .checked_add(e.len)
                .is_some_and(|end| end <= layout.buffer_len);
            if e.file >= layout.files.len() || !inside {
                return Err(Error::InvalidArgument(format!(
                    "unit '{}' has an extent outside its buffer or files",
                    layout.name
                )));
            }
        }
        // Workers write extents concurrently: overlapping ones would race on the buffer.
        let mut spans: Vec<(u64, u64)> = layout
            .extents
            .iter()
            .map(|e| (e.dest_offset, e.dest_offset + e.len))
            .chain(
                layout
                    .chunks
                    .iter()
                    .map(|c| (c.dest_offset, c.dest_offset + c.raw_len)),
            )
            .collect();
        spans.sort_unstable();
        if spans.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' has extents that overlap in the destination buffer",
                layout.name
            )));
        }
        if let Some(c) = layout.checksum {
            let single = layout.chunks.is_empty()
                && layout.extents.len() == 1
                && layout.extents[0].dest_offset == 0
                && layout.extents[0].len >= c.covered;
            // Or coded chunks that tile the covered bytes chunk for chunk, so that each
            // worker hashes exactly the checksum chunk it decoded.
            let tiled = layout.extents.is_empty()
                && layout.chunks.len() as u64 == c.covered.div_ceil(CHECKSUM_CHUNK)
                && layout.chunks.iter().enumerate().all(|(k, ch)| {
                    let lo = k as u64 * CHECKSUM_CHUNK;
                    ch.dest_offset == lo && ch.raw_len == CHECKSUM_CHUNK.min(c.covered - lo)
                });
            if !single && !tiled {
                return Err(Error::InvalidArgument(format!(
                    "unit '{}': a checksum needs one extent at offset 0, or coded chunks that tile the checksummed bytes",
                    layout.name
                )));
            }
        }
        let files: Vec<Arc<PathBuf>> = layout.files.iter().map(|p| Arc::new(p.clone())).collect();
        let mut jobs_spec = Vec::new();
        for e in &layout.extents {
            // Split on chunk boundaries of the destination, so checksum chunks never straddle jobs.
            let mut off = 0;
            while off < e.len {
                let dest_offset = e.dest_offset + off;
                let boundary = align_up(dest_offset + 1, self.chunk_bytes);
                let len = (boundary - dest_offset).min(e.len - off);
                jobs_spec.push((
                    files[e.file].clone(),
                    e.file_offset + off,
                    len,
                    dest_offset,
                    None,
                ));
                off += len;
            }
        }
        for c in &layout.chunks {
            // A chunk stored raw is a plain read into the destination.
            let decode = (c.mode != ChunkMode::Raw).then_some((c.stored_len, c.mode));
            jobs_spec.push((
                files[c.file].clone(),
                c.file_offset,
                c.raw_len,
                c.dest_offset,
                decode,
            ));
        }
        let n_digests = layout
            .checksum
            .map_or(0, |c| c.covered.div_ceil(CHECKSUM_CHUNK) as usize);
        let source = match (layout.extents.first(), layout.chunks.first()) {
            (Some(e), _) => ((*files[e.file]).clone(), e.file_offset),
            (None, Some(c)) => ((*files[c.file]).clone(), c.file_offset),
            (None, None) => (PathBuf::new(), 0),
        };
        let inner = Arc::new(TicketInner {
            unit: layout.name.clone(),
            dest: dest as usize,
            expected: layout.checksum,
            source,
            abort: AtomicBool::new(false),
            state: Mutex::new(TicketState {
                remaining: jobs_spec.len(),
                error: None,
                digests: vec![0; n_digests],
                finished: false,
            }),
            done: Condvar::new(),
        });
        let c = &self.shared.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        match priority {
            Priority::Demand => c.demand_requests.fetch_add(1, Ordering::Relaxed),
            Priority::Prefetch => c.prefetch_requests.fetch_add(1, Ordering::Relaxed),
        };
        if jobs_spec.iter().any(|j| j.4.is_some()) {
            self.start_decode_workers()?;
        }
        if jobs_spec.is_empty() {
            finish(
                &self.shared,
                &inner,
                &mut inner.state.lock().expect("ticket poisoned"),
            );
            return Ok(Ticket(inner));
        }
        {
            let mut q = self.shared.queues.lock().expect("queue poisoned");
            if q.shutdown {
                return Err(Error::InvalidArgument("engine is shut down".into()));
            }
            let target = match priority {
                Priority::Demand => &mut q.demand,
                Priority::Prefetch => &mut q.prefetch,
            };
            for (file, file_offset, len, dest_offset, decode) in jobs_spec {
                target.push_back(Job {
                    ticket: inner.clone(),
                    file,
                    file_offset,
                    len,
                    dest_offset,
                    populate,
                    decode,
                });
            }
        }
        self.shared.work.notify_all();
        Ok(Ticket(inner))
    }

    /// Block until `ticket` completes; returns its error, if any. Waiting on a queued
    /// prefetch promotes it to demand. Waiting twice returns the same outcome.
    pub fn wait(&self, ticket: &Ticket) -> Result<()> {
        let t = &ticket.0;
        {
            let st = t.state.lock().expect("ticket poisoned");
            if st.finished {
                return outcome(&st);
            }
        }
        self.promote(ticket);
        let start = Instant::now();
        let mut st = t.state.lock().expect("ticket poisoned");
        while !st.finished {
            st = t.done.wait(st).expect("ticket poisoned");
        }
        self.shared
            .counters
            .stall_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        outcome(&st)
    }

    fn promote(&self, ticket: &Ticket) {
        let mut q = self.shared.queues.lock().expect("queue poisoned");
        let before = q.prefetch.len();
        let (mine, rest): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut q.prefetch)
            .into_iter()
            .partition(|j| Arc::ptr_eq(&j.ticket, &ticket.0));
        q.prefetch = rest;
        if q.prefetch.len() != before {
            self.shared
                .counters
                .promoted
                .fetch_add(1, Ordering::Relaxed);
            q.demand.extend(mine);
        }
    }

    /// Cancel a request. Queued chunks are dropped; chunks being read finish first. After
    /// this returns, [`wait`](Self::wait) still must be called (or `is_finished` observed)
    /// before the destination buffer is reused.
    pub fn cancel(&self, ticket: &Ticket) {
        let t = &ticket.0;
        t.abort.store(true, Ordering::SeqCst);
        let removed = {
            let mut guard = self.shared.queues.lock().expect("queue poisoned");
            let q = &mut *guard;
            let mut removed = 0;
            for queue in [&mut q.demand, &mut q.prefetch] {
                let before = queue.len();
                queue.retain(|j| !Arc::ptr_eq(&j.ticket, t));
                removed += before - queue.len();
            }
            removed
        };
        drop_queued(&self.shared, t, removed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            bytes_read: l(&c.bytes_read),
            requests: l(&c.requests),
            demand_requests: l(&c.demand_requests),
            prefetch_requests: l(&c.prefetch_requests),
            promoted: l(&c.promoted),
            cancelled: l(&c.cancelled),
            failed: l(&c.failed),
            chunks: l(&c.chunks),
            busy_ns: l(&c.busy_ns),
            stall_ns: l(&c.stall_ns),
            coded_chunks: l(&c.coded_chunks),
            decoded_bytes: l(&c.decoded_bytes),
            decode_ns: l(&c.decode_ns),
            backend: self.shared.backend.stats(),
        }
    }
}

fn outcome(st: &TicketState) -> Result<()> {
    match &st.error {
        None => Ok(()),
        Some(e) => Err(e.duplicate()),
    }
}

/// Count `n` jobs of `t`, taken off the queues, as done without running them: the ticket
/// fails as cancelled (unless it already failed) and finishes once nothing is left.
fn drop_queued(shared: &Shared, t: &TicketInner, n: usize) {
    let mut st = t.state.lock().expect("ticket poisoned");
    if st.finished {
        return;
    }
    if st.error.is_none() {
        st.error = Some(Error::Cancelled {
            unit: t.unit.clone(),
        });
    }
    st.remaining -= n;
    if st.remaining == 0 {
        finish(shared, t, &mut st);
    }
}

/// Mark a ticket finished: verify the checksum, count, and wake waiters.
fn finish(shared: &Shared, t: &TicketInner, st: &mut TicketState) {
    if st.error.is_none() {
        if let Some(exp) = t.expected {
            let actual = chunked_checksum_combine(&st.digests);
            if actual != exp.value {
                st.error = Some(Error::Checksum {
                    path: t.source.0.clone(),
                    unit: t.unit.clone(),
                    offset: t.source.1,
                    len: exp.covered,
                    expected: exp.value,
                    actual,
                });
            }
        }
    }
    let c = &shared.counters;
    match &st.error {
        Some(Error::Cancelled { .. }) => c.cancelled.fetch_add(1, Ordering::Relaxed),
        Some(_) => c.failed.fetch_add(1, Ordering::Relaxed),
        None => 0,
    };
    st.finished = true;
    t.done.notify_all();
}

/// The next job for a worker: the first queued, demand before prefetch; for a decode
/// worker (`coded_only`), the first coded chunk.
fn take_job(q: &mut Queues, coded_only: bool) -> Option<Job> {
    if !coded_only {
        return q.demand.pop_front().or_else(|| q.prefetch.pop_front());
    }
    for queue in [&mut q.demand, &mut q.prefetch] {
        if let Some(i) = queue.iter().position(|j| j.decode.is_some()) {
            return queue.remove(i);
        }
    }
    None
}

fn worker(shared: Arc<Shared>, coded_only: bool) {
    loop {
        let job = {
            let mut q = shared.queues.lock().expect("queue poisoned");
            loop {
                if let Some(j) = take_job(&mut q, coded_only) {
                    break j;
                }
                if q.shutdown {
                    return;
                }
                q = shared.work.wait(q).expect("queue poisoned");
            }
        };
        run_job(&shared, job);
    }
}

fn run_job(shared: &Shared, job: Job) {
    let t = &job.ticket;
    let mut result = Ok(());
    let mut digests: Vec<(usize, u64)> = Vec::new();
    if !t.abort.load(Ordering::SeqCst) {
        let start = Instant::now();
        let ptr = (t.dest + job.dest_offset as usize) as *mut u8;
        result = if job.populate {
            populate(ptr, job.len as usize);
            Ok(())
        } else if let Some((stored_len, mode)) = job.decode {
            // SAFETY: as for a read below: the range is ours until the ticket finishes.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, job.len as usize) };
            read_and_decode(shared, &job, stored_len, mode, dst)
        } else {
            // SAFETY: `submit`'s contract keeps dest valid and exclusively ours until the
            // ticket finishes, which cannot happen before this job completes; jobs of one
            // ticket cover disjoint ranges inside `buffer_len`, checked at submit.
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, job.len as usize) };
            shared
                .backend
                .read_into(&job.file, job.file_offset, dst)
                .map_err(|e| e.with_unit(&t.unit))
        };
        if result.is_ok() {
            if let Some(exp) = t.expected {
                let mut k = job.dest_offset / CHECKSUM_CHUNK;
                while k * CHECKSUM_CHUNK < (job.dest_offset + job.len).min(exp.covered) {
                    let lo = k * CHECKSUM_CHUNK;
                    let hi = ((k + 1) * CHECKSUM_CHUNK).min(exp.covered);
                    // SAFETY: [lo, hi) lies inside this job's range, which we just wrote or mapped.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            (t.dest as *const u8).add(lo as usize),
                            (hi - lo) as usize,
                        )
                    };
                    digests.push((k as usize, xxhash_rust::xxh3::xxh3_64(bytes)));
                    k += 1;
                }
            }
            let c = &shared.counters;
            let read = job.decode.map_or(job.len, |(stored_len, _)| stored_len);
            c.bytes_read.fetch_add(read, Ordering::Relaxed);
            c.chunks.fetch_add(1, Ordering::Relaxed);
        }
        shared
            .counters
            .busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    let mut st = t.state.lock().expect("ticket poisoned");
    for (k, d) in digests {
        st.digests[k] = d;
    }
    if let Err(e) = result {
        t.abort.store(true, Ordering::SeqCst);
        if st.error.is_none() {
            st.error = Some(e);
        }
    }
    st.remaining -= 1;
    if st.remaining == 0 && !st.finished {
        finish(shared, t, &mut st);
    }
}

/// A worker's scratch for coded chunks: an aligned buffer for the stored bytes (O_DIRECT
/// lands in it) and a decoder. Allocated on a worker's first coded chunk, kept after.
struct DecodeScratch {
    stored: AlignedBuf,
    decoder: Decoder,
}

/// Largest stored read: a chunk's stored bytes (at most a chunk), widened to 4096 bounds.
const SCRATCH_LEN: u64 = CODEC_CHUNK + 2 * BLOCK;

thread_local! {
    static DECODE_SCRATCH: RefCell<Option<DecodeScratch>> = const { RefCell::new(None) };
}

/// Read a coded chunk's stored bytes into this worker's scratch and decode them into `dst`.
fn read_and_decode(
    shared: &Shared,
    job: &Job,
    stored_len: u64,
    mode: ChunkMode,
    dst: &mut [u8],
) -> Result<()> {
    let unit = &job.ticket.unit;
    DECODE_SCRATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(DecodeScratch {
                stored: AlignedBuf::new(SCRATCH_LEN as usize),
                decoder: Decoder::new()?,
            });
        }
        let sc = slot.as_mut().expect("just set");
        // Widened to 4096 bounds, so O_DIRECT reads it in one request: stores start each
        // chunk on a block and pad its end to one. Submit bounds stored_len by a chunk.
        let skip = job.file_offset % BLOCK;
        let read_len = align_up(skip + stored_len, BLOCK);
        shared
            .backend
            .read_into(
                &job.file,
                job.file_offset - skip,
                &mut sc.stored[..read_len as usize],
            )
            .map_err(|e| e.with_unit(unit))?;
        let stored = &sc.stored[skip as usize..(skip + stored_len) as usize];
        let start = Instant::now();
        sc.decoder.decode(mode, stored, dst).map_err(|reason| {
            Error::format(
                "store",
                &*job.file,
                format!(
                    "unit '{unit}': coded chunk at raw offset {} ({} bytes stored at file offset {} as {mode}) does not decode: {reason}",
                    job.dest_offset, stored_len, job.file_offset
                ),
            )
        })?;
        let c = &shared.counters;
        c.decode_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.coded_chunks.fetch_add(1, Ordering::Relaxed);
        c.decoded_bytes.fetch_add(job.len, Ordering::Relaxed);
        Ok(())
    })
}

/// Fault in the pages of a mapped range without copying them anywhere.
fn populate(ptr: *const u8, len: usize) {
    const MADV_POPULATE_READ: libc::c_int = 22;
    let addr = ptr as usize;
    let page = 4096usize;
    let start = addr & !(page - 1);
    let span = addr + len - start;
    // SAFETY: the range lies in a live mapping (submit_populate's contract); populating
    // page tables reads nothing into our memory and changes no data.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, span, MADV_POPULATE_READ) };
    if rc != 0 {
        // Older kernels: touch one byte per page.
        let mut sum = 0u8;
        for off in (0..len).step_by(page) {
            // SAFETY: off < len, inside the mapping; a volatile read keeps the load.
            sum ^= unsafe { std::ptr::read_volatile(ptr.add(off)) };
        }
        std::hint::black_box(sum);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pending: Vec<Job> = {
            let mut guard = self.shared.queues.lock().expect("queue poisoned");
            let q = &mut *guard;
            q.shutdown = true;
            q.demand.drain(..).chain(q.prefetch.drain(..)).collect()
        };
        self.shared.work.notify_all();
        for job in pending {
            drop_queued(&self.shared, &job.ticket, 1);
        }
        let extra = std::mem::take(&mut *self.decode_workers.lock().expect("workers poisoned"));
        for w in self.workers.drain(..).chain(extra) {
            let _ = w.join();
        }
    }
}
