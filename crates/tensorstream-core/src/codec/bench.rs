//! Whole buffers coded and decoded in one call, as the writer and the workers code and
//! decode them chunk by chunk: for tests, tools and benchmarks. Neither the store nor the
//! engine uses them.

use super::{ChunkMode, CodeFamily, Decoder, Encoder, CODEC_CHUNK};
use crate::error::Result;

/// Encode `raw` whole (any length) with the writer's chunking, for tests and benchmarks:
/// returns, per chunk, the mode and the stored bytes.
pub fn encode_all(raw: &[u8], width: u64, level: i32) -> Result<Vec<(ChunkMode, Vec<u8>)>> {
    encode_all_with(CodeFamily::Bytegroup, raw, width, level)
}

/// [`encode_all`] with `family`'s code.
pub fn encode_all_with(
    family: CodeFamily,
    raw: &[u8],
    width: u64,
    level: i32,
) -> Result<Vec<(ChunkMode, Vec<u8>)>> {
    let mut enc = Encoder::new(level)?;
    let mut out = Vec::new();
    for chunk in raw.chunks(CODEC_CHUNK as usize) {
        out.push(match enc.encode_with(family, chunk, width)? {
            Some(mode) => (mode, enc.coded().to_vec()),
            None => (ChunkMode::Raw, chunk.to_vec()),
        });
    }
    Ok(out)
}

/// Decode what [`encode_all`] produced into `dst` (the raw length).
pub fn decode_all(
    chunks: &[(ChunkMode, Vec<u8>)],
    dst: &mut [u8],
) -> std::result::Result<(), String> {
    let mut dec = Decoder::new().map_err(|e| e.to_string())?;
    let n = dst.len().div_ceil(CODEC_CHUNK as usize);
    if chunks.len() != n {
        return Err(format!(
            "{} chunks for {} raw bytes, expected {n}",
            chunks.len(),
            dst.len()
        ));
    }
    for ((mode, stored), out) in chunks.iter().zip(dst.chunks_mut(CODEC_CHUNK as usize)) {
        dec.decode(*mode, stored, out)?;
    }
    Ok(())
}

/// [`encode_all_with`] on `threads` threads (chunks handed out in order), for benchmarks.
pub fn encode_parallel(
    family: CodeFamily,
    raw: &[u8],
    width: u64,
    level: i32,
    threads: usize,
) -> Result<Vec<(ChunkMode, Vec<u8>)>> {
    let pieces: Vec<&[u8]> = raw.chunks(CODEC_CHUNK as usize).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(vec![None; pieces.len()]);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut enc = Encoder::new(level)?;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(chunk) = pieces.get(i) else {
                            return Ok(());
                        };
                        let coded = match enc.encode_with(family, chunk, width)? {
                            Some(mode) => (mode, enc.coded().to_vec()),
                            None => (ChunkMode::Raw, chunk.to_vec()),
                        };
                        results.lock().expect("results")[i] = Some(coded);
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("encoder thread panicked"))
    })?;
    Ok(results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|c| c.expect("every chunk coded"))
        .collect())
}

/// [`decode_all`] on `threads` threads, for benchmarks.
pub fn decode_parallel(
    chunks: &[(ChunkMode, Vec<u8>)],
    dst: &mut [u8],
    threads: usize,
) -> std::result::Result<(), String> {
    let n = dst.len().div_ceil(CODEC_CHUNK as usize);
    if chunks.len() != n {
        return Err(format!(
            "{} chunks for {} raw bytes, expected {n}",
            chunks.len(),
            dst.len()
        ));
    }
    let work = std::sync::Mutex::new(chunks.iter().zip(dst.chunks_mut(CODEC_CHUNK as usize)));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> std::result::Result<(), String> {
                    let mut dec = Decoder::new().map_err(|e| e.to_string())?;
                    loop {
                        let Some(((mode, stored), out)) = work.lock().expect("work").next() else {
                            return Ok(());
                        };
                        dec.decode(*mode, stored, out)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("decoder thread panicked"))
    })
}
