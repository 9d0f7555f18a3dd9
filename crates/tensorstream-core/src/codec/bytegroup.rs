//! The `bytegroup` chunk code (modes `bg1` to `bg8`): a chunk's bytes grouped into planes
//! by element width, each plane coded with whichever of its coders is smallest (see the
//! [`codec`](super) module), behind a header of a coder tag and a length per plane.
//! Here: the choice of coder per plane, and the coding and decoding of a grouped chunk.

use super::group::{group, interleave};
use super::{huffman, split};
use crate::error::{Error, Result};

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

/// The state of [`Encoder`](super::Encoder) for grouped chunks: its zstd context and its
/// scratch memory.
pub(super) struct GroupedEncoder {
    cctx: zstd::bulk::Compressor<'static>,
    planes: Vec<u8>,
    zbuf: Vec<u8>,
}

impl GroupedEncoder {
    /// An encoder whose zstd planes are coded at `level` (already checked).
    pub fn new(level: i32) -> Result<Self> {
        let cctx = zstd::bulk::Compressor::new(level).map_err(|e| {
            Error::InvalidArgument(format!("zstd compressor at level {level}: {e}"))
        })?;
        Ok(GroupedEncoder {
            cctx,
            planes: Vec::new(),
            zbuf: Vec::new(),
        })
    }

    /// Write to `out` (empty) the coded form of `raw` (1 to
    /// [`CODEC_CHUNK`](super::CODEC_CHUNK) bytes, already checked) grouped by `w`-byte
    /// elements (1, 2, 4 or 8): the header, each plane, and the bytes after the last whole
    /// element.
    pub fn encode(&mut self, raw: &[u8], w: usize, out: &mut Vec<u8>) -> Result<()> {
        let plane_len = raw.len() / w;
        let planes: &[u8] = if w == 1 {
            raw
        } else {
            self.planes.resize(plane_len * w, 0);
            group(&raw[..plane_len * w], w, &mut self.planes);
            &self.planes
        };
        out.resize(header_len(w), 0);
        for k in 0..w {
            let plane = &planes[k * plane_len..(k + 1) * plane_len];
            let at = out.len();
            let coder = code_plane(&mut self.cctx, &mut self.zbuf, plane, out)?;
            let n = (out.len() - at) as u32;
            out[5 * k] = coder as u8;
            out[5 * k + 1..5 * k + 5].copy_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&raw[plane_len * w..]);
        Ok(())
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

/// The state of [`Decoder`](super::Decoder) for grouped chunks: its zstd context and its
/// plane scratch.
pub(super) struct GroupedDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
    planes: Vec<u8>,
}

impl GroupedDecoder {
    /// A decoder.
    pub fn new() -> Result<Self> {
        let dctx = zstd::bulk::Decompressor::new()
            .map_err(|e| Error::InvalidArgument(format!("zstd decompressor: {e}")))?;
        Ok(GroupedDecoder {
            dctx,
            planes: Vec::new(),
        })
    }

    /// Decode the stored bytes of a chunk grouped by `width`-byte elements (1, 2, 4 or 8,
    /// already checked) into `dst`, its raw bytes (at most a chunk, already checked).
    pub fn decode(
        &mut self,
        width: usize,
        stored: &[u8],
        dst: &mut [u8],
    ) -> std::result::Result<(), String> {
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
