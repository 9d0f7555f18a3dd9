//! Counters: the engine's public snapshot of its work, and the atomic counters the engine,
//! its tickets and its workers add to. A leaf.

use std::sync::atomic::AtomicU64;

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
    /// Nanoseconds of wall time during which at least one worker had a job (read, decode,
    /// checksum): the engine's busy time, not summed over workers. The rest of the time
    /// the engine left the disk idle.
    pub active_ns: u64,
    /// Nanoseconds callers spent blocked in [`Engine::wait`](super::Engine::wait).
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

/// The counters behind [`EngineStats`], kept by the engine, its tickets and its workers.
#[derive(Default)]
pub(super) struct Counters {
    pub bytes_read: AtomicU64,
    pub requests: AtomicU64,
    pub demand_requests: AtomicU64,
    pub prefetch_requests: AtomicU64,
    pub promoted: AtomicU64,
    pub cancelled: AtomicU64,
    pub failed: AtomicU64,
    pub chunks: AtomicU64,
    pub busy_ns: AtomicU64,
    pub stall_ns: AtomicU64,
    pub active_ns: AtomicU64,
    pub coded_chunks: AtomicU64,
    pub decoded_bytes: AtomicU64,
    pub decode_ns: AtomicU64,
}
