//! The workers' loop: take a job, fill its range of the destination (read, read and
//! decode, or fault in), hash the checksum chunks it covers, and complete it on its ticket.

use super::jobs::Job;
use super::pieces::{JobKind, StoredChunk};
use super::shared::Shared;
use crate::codec::{Decoder, CODEC_CHUNK};
use crate::error::{Error, Result};
use crate::io::AlignedBuf;
use crate::store::{align_up, BLOCK, CHECKSUM_CHUNK};
use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Start a worker thread called `name`; a decode worker (`coded_only`) takes only coded
/// chunks.
pub(super) fn spawn(shared: Arc<Shared>, name: String, coded_only: bool) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || worker(shared, coded_only))
        .map_err(|e| Error::io("<thread>", "spawn", 0, 0, e))
}

fn worker(shared: Arc<Shared>, coded_only: bool) {
    loop {
        let job = {
            let mut q = shared.queues.lock().expect("queue poisoned");
            loop {
                if let Some(j) = q.take(coded_only) {
                    break j;
                }
                if q.shutdown {
                    return;
                }
                q = shared.work.wait(q).expect("queue poisoned");
            }
        };
        shared.job_started();
        run_job(&shared, job);
        shared.job_ended();
    }
}

fn run_job(shared: &Shared, job: Job) {
    let Job { ticket: t, piece } = job;
    let mut result = Ok(());
    let mut digests: Vec<(usize, u64)> = Vec::new();
    let mut part_digests: Vec<(usize, u64)> = Vec::new();
    if !t.abort.load(Ordering::SeqCst) {
        let start = Instant::now();
        let ptr = (t.dest + piece.dest_offset as usize) as *mut u8;
        let len = piece.len as usize;
        result = match &piece.kind {
            JobKind::Populate => {
                populate(ptr, len);
                Ok(())
            }
            JobKind::Read { file, file_offset } => {
                // SAFETY: `submit`'s contract keeps dest valid and exclusively ours until the
                // ticket finishes, which cannot happen before this job completes; jobs of one
                // ticket cover disjoint ranges inside `buffer_len`, checked at submit.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                shared
                    .backend
                    .read_into(file, *file_offset, dst)
                    .map_err(|e| e.with_unit(&t.unit))
            }
            JobKind::Decode(chunk) => {
                // SAFETY: as for a read above: the range is ours until the ticket finishes.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                read_and_decode(shared, &t.unit, piece.dest_offset, chunk, dst)
            }
        };
        if result.is_ok() {
            if let Some(exp) = t.expected {
                let mut k = piece.dest_offset / CHECKSUM_CHUNK;
                while k * CHECKSUM_CHUNK < (piece.dest_offset + piece.len).min(exp.covered) {
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
                // Tensor parts whose last bytes this job wrote: all their jobs are done.
                for (i, lo, hi) in t.parts_written(piece.dest_offset, piece.len) {
                    // SAFETY: [lo, hi) lies inside the buffer (checked at submit) and was
                    // written or mapped by jobs of this ticket that have all completed
                    // their writes (their completion, under the ticket's lock, came first).
                    let bytes = unsafe {
                        std::slice::from_raw_parts(
                            (t.dest as *const u8).add(lo as usize),
                            (hi - lo) as usize,
                        )
                    };
                    part_digests.push((i, xxhash_rust::xxh3::xxh3_64(bytes)));
                }
            }
            let c = &shared.counters;
            let read = match piece.kind {
                JobKind::Decode(ref chunk) => chunk.stored_len,
                JobKind::Read { .. } | JobKind::Populate => piece.len,
            };
            c.bytes_read.fetch_add(read, Ordering::Relaxed);
            c.chunks.fetch_add(1, Ordering::Relaxed);
        }
        shared
            .counters
            .busy_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
    t.complete(&shared.counters, digests, part_digests, result);
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

/// Read a coded chunk's stored bytes into this worker's scratch and decode them into `dst`,
/// the range at `dest_offset` of a buffer for `unit`.
fn read_and_decode(
    shared: &Shared,
    unit: &str,
    dest_offset: u64,
    chunk: &StoredChunk,
    dst: &mut [u8],
) -> Result<()> {
    let StoredChunk {
        ref file,
        file_offset,
        stored_len,
        mode,
    } = *chunk;
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
        // chunk on a block and pad its end to one. The layout check at submit bounds
        // stored_len by the chunk's raw length, at most a codec chunk.
        let skip = file_offset % BLOCK;
        let read_len = align_up(skip + stored_len, BLOCK);
        shared
            .backend
            .read_into(file, file_offset - skip, &mut sc.stored[..read_len as usize])
            .map_err(|e| e.with_unit(unit))?;
        let stored = &sc.stored[skip as usize..(skip + stored_len) as usize];
        let start = Instant::now();
        sc.decoder.decode(mode, stored, dst).map_err(|reason| {
            Error::format(
                "store",
                &**file,
                format!(
                    "unit '{unit}': coded chunk at raw offset {dest_offset} ({stored_len} bytes stored at file offset {file_offset} as {mode}) does not decode: {reason}"
                ),
            )
        })?;
        let c = &shared.counters;
        c.decode_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        c.coded_chunks.fetch_add(1, Ordering::Relaxed);
        c.decoded_bytes
            .fetch_add(dst.len() as u64, Ordering::Relaxed);
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
