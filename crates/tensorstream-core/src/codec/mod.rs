//! Lossless codecs of stored units.
//!
//! A unit stored with the `bytegroup-zstd` codec is cut into chunks of [`CODEC_CHUNK`] raw
//! bytes (the checksum chunk, so the worker that decodes a chunk also hashes it), each coded
//! on its own:
//!
//! - the chunk's bytes are grouped by element width into planes: plane `k` holds byte `k`
//!   of every element (two planes for bf16 and fp16, four for fp32, eight for 8-byte
//!   dtypes, none for 1-byte dtypes). The high plane of a float (sign and exponent) carries
//!   about 2.7 bits of entropy per byte, the low planes (mantissa) nearly 8, and coding them
//!   apart is what makes floats compress;
//! - each plane is a separate zstd frame;
//! - a chunk whose coded form is not below 0.95 of its raw size is stored raw.
//!
//! Grouping is a permutation of the chunk's bytes, reversible whatever the data: the width
//! only changes the ratio, never correctness. `docs/store-format.md` describes the bytes.

mod group;

pub use group::{group, ungroup};

use crate::error::{Error, Result};
use crate::store::CHECKSUM_CHUNK;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Codec name of units stored as they are.
pub const CODEC_RAW: &str = "raw";
/// Codec name of units coded in byte-grouped, zstd-compressed chunks.
pub const CODEC_BYTEGROUP_ZSTD: &str = "bytegroup-zstd";
/// Raw bytes per coded chunk (the last chunk of a unit may be shorter). Equal to the
/// checksum chunk, so each chunk is decoded and verified by one worker.
pub const CODEC_CHUNK: u64 = CHECKSUM_CHUNK;
/// A chunk is stored coded only when its coded size is below this fraction of its raw
/// size, written as a ratio of integers: coded * DEN < raw * NUM.
pub const KEEP_CODED_NUM: u64 = 95;
/// See [`KEEP_CODED_NUM`].
pub const KEEP_CODED_DEN: u64 = 100;
/// Compression levels the writer accepts (zstd's).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

/// How one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkMode {
    /// The raw bytes, as they are.
    Raw,
    /// Planes of `width`-byte elements, each a zstd frame (width 1: one frame, no grouping).
    Zstd {
        /// Element width of the grouping: 1, 2, 4 or 8.
        width: u8,
    },
}

impl ChunkMode {
    /// The name the manifest records: "raw", "zstd", "bg2-zstd", "bg4-zstd", "bg8-zstd".
    pub const fn name(self) -> &'static str {
        match self {
            ChunkMode::Raw => "raw",
            ChunkMode::Zstd { width: 1 } => "zstd",
            ChunkMode::Zstd { width: 2 } => "bg2-zstd",
            ChunkMode::Zstd { width: 4 } => "bg4-zstd",
            ChunkMode::Zstd { width: 8 } => "bg8-zstd",
            ChunkMode::Zstd { .. } => "invalid",
        }
    }

    /// Parse a manifest name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => ChunkMode::Raw,
            "zstd" => ChunkMode::Zstd { width: 1 },
            "bg2-zstd" => ChunkMode::Zstd { width: 2 },
            "bg4-zstd" => ChunkMode::Zstd { width: 4 },
            "bg8-zstd" => ChunkMode::Zstd { width: 8 },
            _ => return None,
        })
    }

    /// The grouping width for elements of `size` bytes (1, 2, 4 or 8; anything else: 1).
    pub const fn for_element_size(size: u64) -> Self {
        match size {
            2 | 4 | 8 => ChunkMode::Zstd { width: size as u8 },
            _ => ChunkMode::Zstd { width: 1 },
        }
    }
}

impl fmt::Display for ChunkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for ChunkMode {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ChunkMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ChunkMode::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown chunk mode '{s}' (known: raw, zstd, bg2-zstd, bg4-zstd, bg8-zstd)"
            ))
        })
    }
}

/// Bytes of the plane-length header of a coded chunk of `width` planes.
const fn header_len(width: usize) -> usize {
    4 * width
}

/// Codes chunks. One per writer thread; it keeps its zstd context and scratch memory.
pub struct Encoder {
    level: i32,
    cctx: zstd::bulk::Compressor<'static>,
    planes: Vec<u8>,
    out: Vec<u8>,
    out_len: usize,
}

impl Encoder {
    /// An encoder at zstd `level` (see [`LEVELS`]).
    pub fn new(level: i32) -> Result<Self> {
        if !LEVELS.contains(&level) {
            return Err(Error::InvalidArgument(format!(
                "compression level {level} is outside {}..={}",
                LEVELS.start(),
                LEVELS.end()
            )));
        }
        let cctx = zstd::bulk::Compressor::new(level).map_err(|e| {
            Error::InvalidArgument(format!("zstd compressor at level {level}: {e}"))
        })?;
        Ok(Encoder {
            level,
            cctx,
            planes: Vec::new(),
            out: Vec::new(),
            out_len: 0,
        })
    }

    /// The zstd level.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Code one chunk of at most [`CODEC_CHUNK`] bytes, grouping `width`-byte elements
    /// (1, 2, 4 or 8; other widths code without grouping). Returns the mode, with the
    /// coded bytes in [`coded`](Self::coded), or `None` when the chunk should be stored raw
    /// (coding would not bring it below 0.95 of its size).
    pub fn encode(&mut self, raw: &[u8], width: u64) -> Result<Option<ChunkMode>> {
        let mode = ChunkMode::for_element_size(width);
        let ChunkMode::Zstd { width } = mode else {
            unreachable!("for_element_size gives a zstd mode")
        };
        let w = width as usize;
        self.out_len = 0;
        if raw.is_empty() || raw.len() as u64 > CODEC_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a coded chunk holds 1 to {CODEC_CHUNK} bytes, got {}",
                raw.len()
            )));
        }
        let plane_len = raw.len() / w;
        let tail = raw.len() - plane_len * w;
        let limit = (raw.len() as u64 * KEEP_CODED_NUM).div_ceil(KEEP_CODED_DEN) as usize;
        let planes: &[u8] = if w == 1 {
            raw
        } else {
            self.planes.resize(plane_len * w, 0);
            group(&raw[..plane_len * w], w, &mut self.planes);
            &self.planes
        };
        let bound = header_len(w) + w * zstd::zstd_safe::compress_bound(plane_len) + tail;
        if self.out.len() < bound {
            self.out.resize(bound, 0);
        }
        let mut pos = header_len(w);
        for k in 0..w {
            let plane = &planes[k * plane_len..(k + 1) * plane_len];
            let n = self
                .cctx
                .compress_to_buffer(plane, &mut self.out[pos..])
                .map_err(|e| Error::InvalidArgument(format!("zstd compression failed: {e}")))?;
            self.out[4 * k..4 * k + 4].copy_from_slice(&(n as u32).to_le_bytes());
            pos += n;
            if pos + tail >= limit {
                return Ok(None);
            }
        }
        self.out[pos..pos + tail].copy_from_slice(&raw[plane_len * w..]);
        pos += tail;
        // Strictly below 0.95 of the raw size, as integers: pos * 100 < raw * 95.
        if pos as u64 * KEEP_CODED_DEN >= raw.len() as u64 * KEEP_CODED_NUM {
            return Ok(None);
        }
        self.out_len = pos;
        Ok(Some(mode))
    }

    /// The coded bytes of the last chunk [`encode`](Self::encode) coded.
    pub fn coded(&self) -> &[u8] {
        &self.out[..self.out_len]
    }
}

/// Decodes chunks. One per I/O worker; it keeps its zstd context and plane scratch.
pub struct Decoder {
    dctx: zstd::bulk::Decompressor<'static>,
    planes: Vec<u8>,
}

impl Decoder {
    /// A decoder.
    pub fn new() -> Result<Self> {
        let dctx = zstd::bulk::Decompressor::new()
            .map_err(|e| Error::InvalidArgument(format!("zstd decompressor: {e}")))?;
        Ok(Decoder {
            dctx,
            planes: Vec::new(),
        })
    }

    /// Decode the stored bytes of a chunk into `dst`, which has the chunk's raw length (at
    /// most [`CODEC_CHUNK`]). Corrupted input gives a description of what is wrong, never
    /// a panic, and never writes outside `dst`.
    pub fn decode(
        &mut self,
        mode: ChunkMode,
        stored: &[u8],
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
        if dst.len() as u64 > CODEC_CHUNK {
            return Err(format!(
                "raw length {} exceeds the chunk size {CODEC_CHUNK}",
                dst.len()
            ));
        }
        let width = match mode {
            ChunkMode::Raw => {
                if stored.len() != dst.len() {
                    return Err(format!(
                        "raw chunk of {} stored bytes for {} raw bytes",
                        stored.len(),
                        dst.len()
                    ));
                }
                dst.copy_from_slice(stored);
                return Ok(());
            }
            ChunkMode::Zstd { width } if matches!(width, 1 | 2 | 4 | 8) => width as usize,
            ChunkMode::Zstd { width } => return Err(format!("invalid grouping width {width}")),
        };
        let plane_len = dst.len() / width;
        let tail = dst.len() - plane_len * width;
        let head = header_len(width);
        if stored.len() < head + tail {
            return Err(format!(
                "coded chunk of {} bytes is shorter than its {head}-byte header and {tail}-byte tail",
                stored.len()
            ));
        }
        let mut lens = [0usize; 8];
        let mut total = head + tail;
        for (k, len) in lens.iter_mut().take(width).enumerate() {
            *len =
                u32::from_le_bytes(stored[4 * k..4 * k + 4].try_into().expect("4 bytes")) as usize;
            total = total.saturating_add(*len);
        }
        if total != stored.len() {
            return Err(format!(
                "plane lengths {:?} plus header and tail make {total} bytes, the chunk has {}",
                &lens[..width],
                stored.len()
            ));
        }
        let (grouped, rest) = dst.split_at_mut(plane_len * width);
        let planes: &mut [u8] = if width == 1 {
            grouped
        } else {
            if self.planes.len() < plane_len * width {
                self.planes.resize(plane_len * width, 0);
            }
            &mut self.planes[..plane_len * width]
        };
        let mut pos = head;
        for (k, &len) in lens.iter().take(width).enumerate() {
            let frame = &stored[pos..pos + len];
            let out = &mut planes[k * plane_len..(k + 1) * plane_len];
            let n = self
                .dctx
                .decompress_to_buffer(frame, out)
                .map_err(|e| format!("plane {k}: zstd: {e}"))?;
            if n != plane_len {
                return Err(format!(
                    "plane {k} decoded to {n} bytes, expected {plane_len}"
                ));
            }
            pos += len;
        }
        if width > 1 {
            ungroup(&self.planes[..plane_len * width], width, grouped);
        }
        rest.copy_from_slice(&stored[pos..pos + tail]);
        Ok(())
    }
}

/// Encode `raw` whole (any length) with the writer's chunking, for tests and benchmarks:
/// returns, per chunk, the mode and the stored bytes.
pub fn encode_all(raw: &[u8], width: u64, level: i32) -> Result<Vec<(ChunkMode, Vec<u8>)>> {
    let mut enc = Encoder::new(level)?;
    let mut out = Vec::new();
    for chunk in raw.chunks(CODEC_CHUNK as usize) {
        out.push(match enc.encode(chunk, width)? {
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

/// [`encode_all`] on `threads` threads (chunks handed out in order), for benchmarks.
pub fn encode_parallel(
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
                        let coded = match enc.encode(chunk, width)? {
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
