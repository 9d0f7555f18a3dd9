//! Lossless codecs of stored units.
//!
//! A unit stored with the `bytegroup` codec is cut into chunks of [`CODEC_CHUNK`] raw bytes
//! (the checksum chunk, so the worker that decodes a chunk also hashes it), each coded on
//! its own:
//!
//! - the chunk's bytes are grouped by element width into planes: plane `k` holds byte `k`
//!   of every element (two planes for bf16 and fp16, four for fp32, eight for 8-byte
//!   dtypes, one for 1-byte dtypes). The high plane of a float (sign and exponent) carries
//!   about 2.7 bits of entropy per byte, the low planes (mantissa) nearly 8, and coding them
//!   apart is what makes floats compress;
//! - each plane is coded with whichever is smallest, preferring the fastest to decode:
//!   a canonical Huffman code ([`huffman`]: order-0 entropy, decoded at several GB/s), the
//!   same of the plane's top six bits with its low two bits packed apart ([`split`]: for
//!   fp16's high byte, as small and faster to decode), a zstd frame at the writer's level
//!   (planes with repeats: zeros, sparse or integer data), or nothing (mantissa planes are
//!   incompressible);
//! - a chunk whose coded form is not below 0.95 of its raw size is stored raw.
//!
//! Grouping is a permutation of the chunk's bytes, reversible whatever the data: the width
//! only changes the ratio, never correctness. `docs/store-format.md` describes the bytes.
//!
//! A store written for a GPU codes its float chunks with the [`table`] code instead
//! ([`CodeFamily::Table`]): a fixed-width code that torch decodes on the device with a
//! handful of elementwise operations, so that the PCIe link carries coded bytes. It codes
//! bf16 about 1.3x where the Huffman planes give 1.5x; both decode on the CPU.

mod group;
pub mod huffman;
pub mod split;
pub mod table;

pub use group::{group, interleave, ungroup};

use crate::error::{Error, Result};
use crate::store::CHECKSUM_CHUNK;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Codec name of units stored as they are.
pub const CODEC_RAW: &str = "raw";
/// Codec name of units coded in byte-grouped chunks.
pub const CODEC_BYTEGROUP: &str = "bytegroup";
/// Raw bytes per coded chunk (the last chunk of a unit may be shorter). Equal to the
/// checksum chunk, so each chunk is decoded and verified by one worker.
pub const CODEC_CHUNK: u64 = CHECKSUM_CHUNK;
/// A chunk is stored coded only when its coded size is below this fraction of its raw
/// size, written as a ratio of integers: coded * DEN < raw * NUM.
pub const KEEP_CODED_NUM: u64 = 95;
/// See [`KEEP_CODED_NUM`].
pub const KEEP_CODED_DEN: u64 = 100;
/// Compression levels the writer accepts (zstd's, for the planes zstd codes).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=22;

/// Which code a writer uses for the chunks it codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeFamily {
    /// Byte-grouped planes, Huffman or zstd coded (modes `bg1` to `bg8`): the smallest,
    /// decoded on the CPU by the I/O workers.
    Bytegroup,
    /// The [`table`] code for 2- and 4-byte elements (modes `tb2`, `tb4`; other chunks
    /// stored raw): decodable on a GPU, so the link carries coded bytes.
    Table,
}

impl CodeFamily {
    /// The name a store's metadata records as `compression`: "bytegroup" or "table".
    pub const fn name(self) -> &'static str {
        match self {
            CodeFamily::Bytegroup => CODEC_BYTEGROUP,
            CodeFamily::Table => "table",
        }
    }

    /// Parse a name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            CODEC_BYTEGROUP => Some(CodeFamily::Bytegroup),
            "table" => Some(CodeFamily::Table),
            _ => None,
        }
    }
}

/// How one chunk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkMode {
    /// The raw bytes, as they are.
    Raw,
    /// Planes of `width`-byte elements, each coded on its own (width 1: one plane).
    Grouped {
        /// Element width of the grouping: 1, 2, 4 or 8.
        width: u8,
    },
    /// The [`table`] code of `width`-byte elements.
    Table {
        /// Element width: 2 or 4.
        width: u8,
    },
}

impl ChunkMode {
    /// The name the manifest records: "raw", "bg1", "bg2", "bg4", "bg8", "tb2", "tb4".
    pub const fn name(self) -> &'static str {
        match self {
            ChunkMode::Raw => "raw",
            ChunkMode::Grouped { width: 1 } => "bg1",
            ChunkMode::Grouped { width: 2 } => "bg2",
            ChunkMode::Grouped { width: 4 } => "bg4",
            ChunkMode::Grouped { width: 8 } => "bg8",
            ChunkMode::Table { width: 2 } => "tb2",
            ChunkMode::Table { width: 4 } => "tb4",
            ChunkMode::Grouped { .. } | ChunkMode::Table { .. } => "invalid",
        }
    }

    /// Parse a manifest name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => ChunkMode::Raw,
            "bg1" => ChunkMode::Grouped { width: 1 },
            "bg2" => ChunkMode::Grouped { width: 2 },
            "bg4" => ChunkMode::Grouped { width: 4 },
            "bg8" => ChunkMode::Grouped { width: 8 },
            "tb2" => ChunkMode::Table { width: 2 },
            "tb4" => ChunkMode::Table { width: 4 },
            _ => return None,
        })
    }

    /// True for the modes a GPU decodes (`raw` and the table code).
    pub const fn gpu_decodable(self) -> bool {
        matches!(self, ChunkMode::Raw | ChunkMode::Table { .. })
    }

    /// The grouping for elements of `size` bytes (1, 2, 4 or 8; anything else: 1).
    pub const fn for_element_size(size: u64) -> Self {
        match size {
            2 | 4 | 8 => ChunkMode::Grouped { width: size as u8 },
            _ => ChunkMode::Grouped { width: 1 },
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
                "unknown chunk mode '{s}' (known: raw, bg1, bg2, bg4, bg8, tb2, tb4)"
            ))
        })
    }
}

/// How one plane of a grouped chunk is coded (its tag byte in the chunk header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PlaneCoder {
    /// The plane's bytes as they are.
    Raw = 0,
    /// A zstd frame.
    Zstd = 1,
    /// A [`huffman`] payload.
    Huffman = 2,
    /// The plane split at bit 2: its top six bits a [`huffman`] payload, its low two bits
    /// packed four to a byte ([`split`]). Where a byte's Huffman code averages several
    /// bits (fp16's sign-exponent-mantissa byte: about 5.5), the six-bit values code about
    /// as small and decode about twice as many symbols per table lookup.
    Split = 3,
}

/// Bytes of a grouped chunk's header: per plane, a coder tag and a u32 LE payload length.
const fn header_len(width: usize) -> usize {
    5 * width
}

/// Planes whose order-0 entropy is at least this (bits per byte) are stored raw without
/// trying a coder: mantissa bytes.
const RAW_ENTROPY: f64 = 7.9;

/// A plane is Huffman-coded only if that brings it below this fraction of its size: a
/// plane that barely shrinks (the top mantissa bits of fp32) is faster to copy than to decode.
const HUFFMAN_KEEP: f64 = 0.92;

/// How much larger than the byte-wise Huffman code, as a fraction of the plane, the split
/// code may be and still be chosen, for its faster decoding (fp16: about 0.6% larger).
const SPLIT_ALLOWANCE: f64 = 0.02;

/// Bytes at the start of a plane that zstd codes first, to see if coding the whole plane
/// with it could pay.
const ZSTD_SAMPLE: usize = 128 << 10;

/// Codes chunks. One per writer thread; it keeps its zstd context and scratch memory.
pub struct Encoder {
    level: i32,
    cctx: zstd::bulk::Compressor<'static>,
    planes: Vec<u8>,
    out: Vec<u8>,
    zbuf: Vec<u8>,
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
            zbuf: Vec::new(),
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
        let ChunkMode::Grouped { width } = mode else {
            unreachable!("for_element_size gives a grouped mode")
        };
        let w = width as usize;
        self.out.clear();
        if raw.is_empty() || raw.len() as u64 > CODEC_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a coded chunk holds 1 to {CODEC_CHUNK} bytes, got {}",
                raw.len()
            )));
        }
        let plane_len = raw.len() / w;
        let planes: &[u8] = if w == 1 {
            raw
        } else {
            self.planes.resize(plane_len * w, 0);
            group(&raw[..plane_len * w], w, &mut self.planes);
            &self.planes
        };
        self.out.resize(header_len(w), 0);
        for k in 0..w {
            let plane = &planes[k * plane_len..(k + 1) * plane_len];
            let at = self.out.len();
            let coder = code_plane(&mut self.cctx, &mut self.zbuf, plane, &mut self.out)?;
            let n = (self.out.len() - at) as u32;
            self.out[5 * k] = coder as u8;
            self.out[5 * k + 1..5 * k + 5].copy_from_slice(&n.to_le_bytes());
        }
        self.out.extend_from_slice(&raw[plane_len * w..]);
        // Strictly below 0.95 of the raw size, as integers: coded * 100 < raw * 95.
        if self.out.len() as u64 * KEEP_CODED_DEN >= raw.len() as u64 * KEEP_CODED_NUM {
            return Ok(None);
        }
        Ok(Some(mode))
    }

    /// Code one chunk with the [`table`] code: `width` 2 or 4 (other widths: `None`, the
    /// chunk is stored raw), or `None` when it would not come below 0.95 of its size.
    pub fn encode_table(&mut self, raw: &[u8], width: u64) -> Result<Option<ChunkMode>> {
        if raw.is_empty() || raw.len() as u64 > CODEC_CHUNK {
            return Err(Error::InvalidArgument(format!(
                "a coded chunk holds 1 to {CODEC_CHUNK} bytes, got {}",
                raw.len()
            )));
        }
        if width != 2 && width != 4 {
            return Ok(None);
        }
        let len = table::encode(raw, width as usize, &mut self.out) as u64;
        if len * KEEP_CODED_DEN >= raw.len() as u64 * KEEP_CODED_NUM {
            return Ok(None);
        }
        Ok(Some(ChunkMode::Table { width: width as u8 }))
    }

    /// Code one chunk with `family`'s code ([`encode`](Self::encode) or
    /// [`encode_table`](Self::encode_table)).
    pub fn encode_with(
        &mut self,
        family: CodeFamily,
        raw: &[u8],
        width: u64,
    ) -> Result<Option<ChunkMode>> {
        match family {
            CodeFamily::Bytegroup => self.encode(raw, width),
            CodeFamily::Table => self.encode_table(raw, width),
        }
    }

    /// The coded bytes of the last chunk [`encode`](Self::encode) coded.
    pub fn coded(&self) -> &[u8] {
        &self.out
    }
}

/// Append `plane` coded with the best coder to `out`; returns the coder.
fn code_plane(
    cctx: &mut zstd::bulk::Compressor<'static>,
    zbuf: &mut Vec<u8>,
    plane: &[u8],
    out: &mut Vec<u8>,
) -> Result<PlaneCoder> {
    let n = plane.len();
    if n == 0 {
        return Ok(PlaneCoder::Raw);
    }
    let mut freq = [0u64; 256];
    for &b in plane {
        freq[b as usize] += 1;
    }
    let entropy: f64 = freq
        .iter()
        .filter(|&&f| f > 0)
        .map(|&f| {
            let p = f as f64 / n as f64;
            -p * p.log2()
        })
        .sum();
    if entropy >= RAW_ENTROPY {
        out.extend_from_slice(plane);
        return Ok(PlaneCoder::Raw);
    }
    let lens = huffman::code_lengths(&freq);
    let mut huff = huffman::encoded_size(&freq, &lens);
    // The six-bit split, where it codes nearly as small (within SPLIT_ALLOWANCE of the
    // plane): it decodes faster. Its histogram is the byte histogram's, four values to one.
    let freq6: [u64; 256] = std::array::from_fn(|v| {
        if v < 64 {
            freq[4 * v..4 * v + 4].iter().sum()
        } else {
            0
        }
    });
    let lens6 = huffman::code_lengths(&freq6);
    let split_size = split::encoded_size(n, huffman::encoded_size(&freq6, &lens6));
    let use_split = split_size as f64 <= huff as f64 + SPLIT_ALLOWANCE * n as f64;
    if use_split {
        huff = split_size;
    }
    // zstd only where it is clearly smaller (repeats that an order-0 code cannot see):
    // Huffman decodes faster. A sample tells whether zstd is worth trying on the plane.
    let mut zstd = |data: &[u8]| {
        zbuf.resize(zstd::zstd_safe::compress_bound(data.len()), 0);
        cctx.compress_to_buffer(data, &mut zbuf[..])
            .map_err(|e| Error::InvalidArgument(format!("zstd compression failed: {e}")))
    };
    let sample = &plane[..n.min(ZSTD_SAMPLE)];
    let promising = sample.len() == n
        || (zstd(sample)? as f64) < 0.8 * huff as f64 * sample.len() as f64 / n as f64;
    let z = if promising { zstd(plane)? } else { usize::MAX };
    if z < n && (z as f64) < 0.9 * huff as f64 {
        out.extend_from_slice(&zbuf[..z]);
        Ok(PlaneCoder::Zstd)
    } else if (huff as f64) < HUFFMAN_KEEP * n as f64 {
        if use_split {
            split::encode(plane, &lens6, out);
            Ok(PlaneCoder::Split)
        } else {
            huffman::encode(plane, &lens, out);
            Ok(PlaneCoder::Huffman)
        }
    } else {
        out.extend_from_slice(plane);
        Ok(PlaneCoder::Raw)
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
            ChunkMode::Grouped { width } if matches!(width, 1 | 2 | 4 | 8) => width as usize,
            ChunkMode::Grouped { width } => return Err(format!("invalid grouping width {width}")),
            ChunkMode::Table { width } => return table::decode(stored, width as usize, dst),
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
        let mut planes_meta = [(0u8, 0usize); 8];
        let mut total = head + tail;
        for (k, m) in planes_meta.iter_mut().take(width).enumerate() {
            let len = u32::from_le_bytes(stored[5 * k + 1..5 * k + 5].try_into().expect("4 bytes"));
            *m = (stored[5 * k], len as usize);
            total = total.saturating_add(len as usize);
        }
        if total != stored.len() {
            return Err(format!(
                "plane lengths {:?} plus header and tail make {total} bytes, the chunk has {}",
                &planes_meta[..width],
                stored.len()
            ));
        }
        let (grouped, rest) = dst.split_at_mut(plane_len * width);
        if width == 1 {
            let (coder, len) = planes_meta[0];
            decode_plane(&mut self.dctx, coder, &stored[head..head + len], grouped, 0)?;
            rest.copy_from_slice(&stored[head + len..head + len + tail]);
            return Ok(());
        }
        if self.planes.len() < plane_len * width {
            self.planes.resize(plane_len * width, 0);
        }
        // A scratch plane for each stored plane; only those that need decoding use it: raw
        // planes are interleaved straight from the stored bytes, without a copy.
        let mut scratch = self.planes[..plane_len * width].chunks_mut(plane_len.max(1));
        let mut slices: [&[u8]; 8] = [&[]; 8];
        let mut pos = head;
        for (k, &(coder, len)) in planes_meta.iter().take(width).enumerate() {
            let payload = &stored[pos..pos + len];
            pos += len;
            let out = scratch.next().unwrap_or_default();
            if width == 2 && k == 1 && coder == PlaneCoder::Split as u8 {
                // fp16-like chunks: the high plane's six-bit values decode into the scratch
                // and are joined with their low bits while interleaving, in one pass.
                let packed =
                    split::decode_high(payload, out).map_err(|e| format!("plane 1: {e}"))?;
                split::interleave_low_high(slices[0], out, packed, grouped);
                rest.copy_from_slice(&stored[pos..pos + tail]);
                return Ok(());
            }
            slices[k] = plane_bytes(&mut self.dctx, coder, payload, out, k)?;
        }
        interleave(&slices[..width], grouped);
        rest.copy_from_slice(&stored[pos..pos + tail]);
        Ok(())
    }
}

/// A plane's bytes: a raw plane's are the stored bytes themselves (their length checked),
/// any other plane is decoded into `scratch` (the plane's length).
fn plane_bytes<'a>(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    coder: u8,
    payload: &'a [u8],
    scratch: &'a mut [u8],
    k: usize,
) -> std::result::Result<&'a [u8], String> {
    if coder == PlaneCoder::Raw as u8 {
        check_raw_plane(payload, scratch.len(), k)?;
        return Ok(payload);
    }
    decode_plane(dctx, coder, payload, scratch, k)?;
    Ok(scratch)
}

/// A raw plane's payload must be the plane itself.
fn check_raw_plane(payload: &[u8], plane_len: usize, k: usize) -> std::result::Result<(), String> {
    if payload.len() != plane_len {
        return Err(format!(
            "raw plane {k} of {} bytes, expected {plane_len}",
            payload.len()
        ));
    }
    Ok(())
}

/// Decode one plane payload with its coder into `out` (the plane's length).
fn decode_plane(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    coder: u8,
    payload: &[u8],
    out: &mut [u8],
    k: usize,
) -> std::result::Result<(), String> {
    match coder {
        c if c == PlaneCoder::Raw as u8 => {
            check_raw_plane(payload, out.len(), k)?;
            out.copy_from_slice(payload);
        }
        c if c == PlaneCoder::Zstd as u8 => {
            let n = dctx
                .decompress_to_buffer(payload, out)
                .map_err(|e| format!("plane {k}: zstd: {e}"))?;
            if n != out.len() {
                return Err(format!(
                    "plane {k} decoded to {n} bytes, expected {}",
                    out.len()
                ));
            }
        }
        c if c == PlaneCoder::Huffman as u8 => {
            huffman::decode(payload, out).map_err(|e| format!("plane {k}: {e}"))?;
        }
        c if c == PlaneCoder::Split as u8 => {
            split::decode(payload, out).map_err(|e| format!("plane {k}: {e}"))?;
        }
        c => return Err(format!("plane {k} has unknown coder {c}")),
    }
    Ok(())
}

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
