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
//!
//! Here: the [`Engine`] and its settings. The modules, each using only those before it:
//! `pieces` how a request is split into pieces (a read, a read and decode, or a fault-in
//! of a mapped range); `counters` the engine's counters; `checks` the checksum and tensor
//! digest checks of a request; `tickets` a request's shared state and its completion;
//! `jobs` the priorities, the jobs (a piece and its ticket) and the two priority queues;
//! `shared` what the engine and its workers share; `workers` the worker threads' loop.

mod checks;
mod counters;
mod jobs;
mod pieces;
mod shared;
mod tickets;
mod workers;

pub use counters::EngineStats;
pub use jobs::Priority;
pub use tickets::Ticket;

use crate::error::{Error, Result};
use crate::io::ReadBackend;
use crate::store::{UnitLayout, CHECKSUM_CHUNK};
use jobs::Job;
use shared::Shared;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use tickets::TicketInner;

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
        let shared = Arc::new(Shared::new(backend));
        let workers = (0..config.num_threads)
            .map(|i| workers::spawn(shared.clone(), format!("tensorstream-io-{i}"), false))
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
            let name = format!("tensorstream-dec-{}", extra.len());
            extra.push(workers::spawn(self.shared.clone(), name, true)?);
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
        layout.validate().map_err(|reason| {
            Error::InvalidArgument(format!("unit '{}': {reason}", layout.name))
        })?;
        let pieces = pieces::split(layout, self.chunk_bytes, populate);
        let inner = Arc::new(TicketInner::new(layout, dest, &pieces)?);
        let c = &self.shared.counters;
        c.requests.fetch_add(1, Ordering::Relaxed);
        match priority {
            Priority::Demand => c.demand_requests.fetch_add(1, Ordering::Relaxed),
            Priority::Prefetch => c.prefetch_requests.fetch_add(1, Ordering::Relaxed),
        };
        if pieces.iter().any(|p| p.kind.is_decode()) {
            self.start_decode_workers()?;
        }
        if pieces.is_empty() {
            inner.finish(
                &self.shared.counters,
                &mut inner.state.lock().expect("ticket poisoned"),
            );
            return Ok(Ticket(inner));
        }
        {
            let mut q = self.shared.queues.lock().expect("queue poisoned");
            if q.shutdown {
                return Err(Error::InvalidArgument("engine is shut down".into()));
            }
            q.push(
                priority,
                pieces.into_iter().map(|piece| Job {
                    ticket: inner.clone(),
                    piece,
                }),
            );
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
                return st.outcome();
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
        st.outcome()
    }

    fn promote(&self, ticket: &Ticket) {
        let mut q = self.shared.queues.lock().expect("queue poisoned");
        if q.promote(&ticket.0) {
            self.shared
                .counters
                .promoted
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Cancel a request. Queued chunks are dropped; chunks being read finish first. After
    /// this returns, [`wait`](Self::wait) still must be called (or `is_finished` observed)
    /// before the destination buffer is reused.
    pub fn cancel(&self, ticket: &Ticket) {
        let t = &ticket.0;
        t.abort.store(true, Ordering::SeqCst);
        let removed = self.shared.queues.lock().expect("queue poisoned").remove(t);
        t.drop_queued(&self.shared.counters, removed);
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
            active_ns: self.shared.active_ns(),
            coded_chunks: l(&c.coded_chunks),
            decoded_bytes: l(&c.decoded_bytes),
            decode_ns: l(&c.decode_ns),
            backend: self.shared.backend.stats(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let pending = {
            let mut q = self.shared.queues.lock().expect("queue poisoned");
            q.shutdown = true;
            q.drain()
        };
        self.shared.work.notify_all();
        for job in pending {
            job.ticket.drop_queued(&self.shared.counters, 1);
        }
        let extra = std::mem::take(&mut *self.decode_workers.lock().expect("workers poisoned"));
        for w in self.workers.drain(..).chain(extra) {
            let _ = w.join();
        }
    }
}
