//! Store format v1: a 64-byte header, 4 KiB-aligned unit data, then a JSON manifest.
//! `docs/store-format.md` is the normative description; this module implements it.

use super::{
    align_up, CodedChunk, DType, ExpectedChecksum, Extent, TensorSlot, UnitLayout, BLOCK,
    TENSOR_ALIGN,
};
use crate::codec::{ChunkMode, CODEC_BYTEGROUP, CODEC_CHUNK, CODEC_RAW};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// The first 8 bytes of every store file.
pub const MAGIC: [u8; 8] = *b"TSSTORE\0";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The minor version this crate writes: 1 adds a `digest` to every tensor, 2 a
/// `stored_checksum` to every coded unit (and the table code's chunk modes). Minor versions
/// only add optional fields and chunk modes, so a reader accepts any (an older reader
/// ignores the fields, and refuses a chunk mode it does not know, naming it).
pub const FORMAT_MINOR_VERSION: u32 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Largest manifest a reader accepts, checked before anything is allocated.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// Largest number of units in one store.
pub const MAX_UNITS: usize = 1 << 20;
/// Largest number of tensors in one unit.
pub const MAX_TENSORS_PER_UNIT: usize = 1 << 16;
/// Largest number of dimensions of a tensor.
pub const MAX_DIMS: usize = 16;
/// Largest number of coded chunks in one unit (4 TiB of raw bytes at 4 MiB a chunk).
pub const MAX_CHUNKS_PER_UNIT: u64 = 1 << 20;

/// The fixed header at offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub manifest_checksum: u64,
    pub file_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        // 12..16: flags, zero in v1.
        b[16..24].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.manifest_checksum.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        b
    }

    pub fn decode(path: &Path, b: &[u8]) -> Result<Self> {
        let bad = |reason: String| Error::format("store", path, reason);
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "file is {} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        if b[0..8] != MAGIC {
            return Err(bad(format!(
                "bad magic {:02x?}, expected {:02x?} ('TSSTORE')",
                &b[0..8],
                MAGIC
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {version}, this build reads version {FORMAT_VERSION}"
            )));
        }
        if u32_at(12) != 0 {
            return Err(bad(format!("unknown header flags {:#x}", u32_at(12))));
        }
        Ok(Header {
            manifest_offset: u64_at(16),
            manifest_len: u64_at(24),
            manifest_checksum: u64_at(32),
            file_len: u64_at(40),
        })
    }
}

/// One tensor of a unit, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Name, relative to the unit (e.g. "self_attn.q_proj.weight").
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte offset inside the unit, a multiple of 64.
    pub offset: u64,
    /// Size in bytes: the dtype's size times the product of the shape.
    pub nbytes: u64,
    /// Checksum of the tensor's own bytes (see `chunked_checksum`), as 16 lowercase hex
    /// digits; written from minor version 1 on, absent from older stores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl TensorRecord {
    /// The digest as a number, when the tensor has a well-formed one.
    pub fn digest_value(&self) -> Option<u64> {
        self.digest.as_deref().and_then(parse_hex64)
    }
}

/// Parse exactly 16 lowercase hex digits (no sign, no prefix): the one spelling a store
/// writes, so a digest string round-trips through `{:016x}`.
pub(crate) fn parse_hex64(s: &str) -> Option<u64> {
    let lower_hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if s.len() != 16 || !s.bytes().all(lower_hex) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// One unit, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// Unit name (e.g. "model.layers.3").
    pub name: String,
    /// Byte offset of the unit in the file, a multiple of 4096.
    pub offset: u64,
    /// Bytes of unit data (tensors and the padding between them).
    pub length: u64,
    /// Bytes the unit occupies in the file, a multiple of 4096: `length` rounded up for a
    /// raw unit, the end of the last stored chunk rounded up for a coded one.
    pub padded_length: u64,
    /// How the unit's bytes are coded on disk: "raw" or "bytegroup".
    pub codec: String,
    /// Checksum of the `length` raw bytes, as 16 hex digits (see `chunked_checksum`).
    pub checksum: String,
    /// The tensors, in offset order.
    pub tensors: Vec<TensorRecord>,
    /// For a coded unit, its chunks in order; empty (and absent from the JSON) for a raw one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkRecord>,
    /// For a coded unit (minor version 2 on), the checksum of its stored bytes (the first
    /// [`stored_length`](Self::stored_length) bytes at `offset`, computed as `checksum`
    /// is), so that its coded bytes can be verified without decoding them
    /// ([`stored_layout`](Self::stored_layout)); absent for a raw unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_checksum: Option<String>,
}

/// One coded chunk of a unit. The manifest writes it as the array
/// `[raw_offset, raw_len, stored_offset, stored_len, mode]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ChunkTuple", into = "ChunkTuple")]
pub struct ChunkRecord {
    /// Offset of the chunk's raw bytes in the unit: chunk `i` starts at `i * 4 MiB`.
    pub raw_offset: u64,
    /// Raw bytes of the chunk: 4 MiB, less for the unit's last chunk.
    pub raw_len: u64,
    /// Offset of the chunk's stored bytes, relative to the unit's offset in the file: 0 for
    /// the first chunk, the previous chunk's end rounded up to 4096 for the others.
    pub stored_offset: u64,
    /// Stored bytes of the chunk.
    pub stored_len: u64,
    /// How the chunk is stored.
    pub mode: ChunkMode,
}

type ChunkTuple = (u64, u64, u64, u64, ChunkMode);

impl From<ChunkTuple> for ChunkRecord {
    fn from(t: ChunkTuple) -> Self {
        ChunkRecord {
            raw_offset: t.0,
            raw_len: t.1,
            stored_offset: t.2,
            stored_len: t.3,
            mode: t.4,
        }
    }
}

impl From<ChunkRecord> for ChunkTuple {
    fn from(c: ChunkRecord) -> Self {
        (
            c.raw_offset,
            c.raw_len,
            c.stored_offset,
            c.stored_len,
            c.mode,
        )
    }
}

impl UnitRecord {
    /// True when the unit is stored with a codec (its bytes on disk are not its raw bytes).
    pub fn is_coded(&self) -> bool {
        self.codec != CODEC_RAW
    }

    /// Bytes of the unit's data on disk, without the final padding: `length` for a raw
    /// unit, the end of the last stored chunk for a coded one.
    pub fn stored_length(&self) -> u64 {
        match self.chunks.last() {
            Some(c) if self.is_coded() => c.stored_offset + c.stored_len,
            _ => self.length,
        }
    }

    /// The checksum as a number.
    pub fn checksum_value(&self) -> u64 {
        u64::from_str_radix(&self.checksum, 16).unwrap_or(0)
    }

    /// Read layout of the unit's stored bytes as they lie in the file at `path`, for a
    /// reader that decodes them itself (a GPU): one aligned extent of `padded_length`
    /// bytes into a buffer of that size, verified against `stored_checksum`, with no
    /// tensors (their bytes exist only once decoded). `None` for a raw unit, or a coded one
    /// written before stored checksums (minor version 2).
    ///
    /// As for [`layout`](Self::layout): call it only on a validated record.
    pub(crate) fn stored_layout(&self, path: &Path) -> Option<UnitLayout> {
        let value = parse_hex64(self.stored_checksum.as_deref()?)?;
        if !self.is_coded() {
            return None;
        }
        Some(UnitLayout {
            name: self.name.clone(),
            files: vec![path.to_path_buf()],
            extents: vec![Extent {
                file: 0,
                file_offset: self.offset,
                len: self.padded_length,
                dest_offset: 0,
            }],
            chunks: Vec::new(),
            buffer_len: self.padded_length,
            tensors: Vec::new(),
            checksum: Some(ExpectedChecksum {
                value,
                covered: self.stored_length(),
            }),
        })
    }

    /// Read layout of the unit in the store file at `path`, checksum verified: one aligned
    /// extent, read whole, for a raw unit; its chunks, each read and decoded on its own,
    /// for a coded one. The buffer has the unit's raw length rounded up to 4096 either way.
    ///
    /// File offsets are added unchecked: call it only on a record whose chunk table and
    /// range in the file have been checked, as [`Manifest::validate`] does before calling it.
    pub(crate) fn layout(&self, path: &Path) -> UnitLayout {
        let (extents, chunks) = if self.is_coded() {
            let chunks = self
                .chunks
                .iter()
                .map(|c| CodedChunk {
                    file: 0,
                    file_offset: self.offset + c.stored_offset,
                    stored_len: c.stored_len,
                    dest_offset: c.raw_offset,
                    raw_len: c.raw_len,
                    mode: c.mode,
                })
                .collect();
            (Vec::new(), chunks)
        } else {
            let extent = Extent {
                file: 0,
                file_offset: self.offset,
                len: self.padded_length,
                dest_offset: 0,
            };
            (vec![extent], Vec::new())
        };
        UnitLayout {
            name: self.name.clone(),
            files: vec![path.to_path_buf()],
            extents,
            chunks,
            buffer_len: align_up(self.length, BLOCK),
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorSlot {
                    name: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    offset: t.offset,
                    nbytes: t.nbytes,
                    digest: t.digest_value(),
                })
                .collect(),
            checksum: Some(ExpectedChecksum {
                value: self.checksum_value(),
                covered: self.length,
            }),
        }
    }
}

/// The manifest: everything about a store but the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "tensorstream-store".
    pub format: String,
    /// Format version, equal to the header's.
    pub version: u32,
    /// Minor version: 0 (absent) for stores without tensor digests, 1 when every tensor
    /// records its `digest`.
    #[serde(default)]
    pub minor_version: u32,
    /// Identifies the model the store was written for.
    pub fingerprint: String,
    /// Checksum scheme, "xxh3-64-chunked-4MiB" in v1.
    pub checksum_algorithm: String,
    /// Free-form string metadata (the writer's version, the model class, ...).
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The units, in file order.
    pub units: Vec<UnitRecord>,
}

/// Name of the checksum scheme of v1.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64-chunked-4MiB";

impl Manifest {
    /// Validate every count, range and size against the header and the file length.
    pub(crate) fn validate(&self, path: &Path, data_end: u64) -> Result<()> {
        let bad = |reason: String| Error::format("store", path, reason);
        if self.format != "tensorstream-store" {
            return Err(bad(format!(
                "manifest format is '{}', expected 'tensorstream-store'",
                self.format
            )));
        }
        if self.version != FORMAT_VERSION {
            return Err(bad(format!(
                "manifest version {} differs from header version {FORMAT_VERSION}",
                self.version
            )));
        }
        if self.checksum_algorithm != CHECKSUM_ALGORITHM {
            return Err(bad(format!(
                "unknown checksum algorithm '{}'",
                self.checksum_algorithm
            )));
        }
        if self.units.len() > MAX_UNITS {
            return Err(bad(format!(
                "{} units, more than the limit of {MAX_UNITS}",
                self.units.len()
            )));
        }
        let mut names = HashSet::with_capacity(self.units.len());
        let mut prev_end = BLOCK;
        for u in &self.units {
            if !names.insert(u.name.as_str()) {
                return Err(bad(format!("unit '{}' appears twice", u.name)));
            }
            if u.codec != CODEC_RAW && u.codec != CODEC_BYTEGROUP {
                return Err(bad(format!(
                    "unit '{}' uses codec '{}', which this build cannot decode (known: {CODEC_RAW}, {CODEC_BYTEGROUP})",
                    u.name, u.codec
                )));
            }
            if u.checksum.len() != 16 || u64::from_str_radix(&u.checksum, 16).is_err() {
                return Err(bad(format!(
                    "unit '{}' has a malformed checksum '{}'",
                    u.name, u.checksum
                )));
            }
            match (&u.stored_checksum, u.is_coded()) {
                (Some(c), true) if parse_hex64(c).is_none() => {
                    return Err(bad(format!(
                        "unit '{}' has a malformed stored checksum '{c}', expected 16 lowercase hex digits",
                        u.name
                    )))
                }
                (Some(_), false) => {
                    return Err(bad(format!(
                        "unit '{}' is raw but records a stored checksum",
                        u.name
                    )))
                }
                (None, true) if self.minor_version >= 2 => {
                    return Err(bad(format!(
                        "coded unit '{}' has no stored checksum, which minor version {} requires",
                        u.name, self.minor_version
                    )))
                }
                _ => {}
            }
            if u.offset % BLOCK != 0 {
                return Err(bad(format!(
                    "unit '{}' starts at {}, not a multiple of {BLOCK}",
                    u.name, u.offset
                )));
            }
            if u.offset < prev_end {
                return Err(bad(format!(
                    "unit '{}' at {} overlaps the previous data ending at {prev_end}",
                    u.name, u.offset
                )));
            }
            // Checked: a hostile length near 2^64 must not overflow the rounding.
            let stored_end = if u.is_coded() {
                validate_chunks(path, u)?
            } else {
                if !u.chunks.is_empty() {
                    return Err(bad(format!(
                        "unit '{}' is raw but records {} coded chunks",
                        u.name,
                        u.chunks.len()
                    )));
                }
                u.length
            };
            let expect_padded = stored_end
                .checked_add(BLOCK - 1)
                .map(|x| super::align_down(x, BLOCK));
            if u.length == 0 || Some(u.padded_length) != expect_padded {
                return Err(bad(format!(
                    "unit '{}' has length {} and padded length {}, expected a nonzero length and its {stored_end} bytes on disk padded to a multiple of {BLOCK} ({})",
                    u.name,
                    u.length,
                    u.padded_length,
                    expect_padded.map_or("more than 2^64".to_string(), |p| p.to_string())
                )));
            }
            let end = u.offset.checked_add(u.padded_length).filter(|&e| e <= data_end).ok_or_else(|| {
                bad(format!(
                    "unit '{}' spans {}..{}+{}, past the end of the data at {data_end} (truncated file?)",
                    u.name, u.offset, u.offset, u.padded_length
                ))
            })?;
            prev_end = end;
            // The unit's layout, as the store hands it out, must pass the engine's own check
            // (which also bounds each coded chunk's stored length by its raw length).
            u.layout(path)
                .validate()
                .map_err(|reason| bad(format!("unit '{}': {reason}", u.name)))?;
            validate_tensors(path, u, self.minor_version)?;
        }
        Ok(())
    }
}

/// Check a coded unit's chunk table; returns the end of its stored bytes (relative to the
/// unit). The table is fully determined by the unit's length but for the stored lengths
/// and modes, and every position is checked against that, so a hostile table can neither
/// overlap chunks nor leave raw bytes uncovered. The stored lengths are bounded here only
/// by arithmetic that cannot wrap; their sizes against each chunk's mode are checked with
/// the rest of the unit's layout ([`UnitLayout::validate`]), which keeps a reader from
/// allocating more than a chunk.
fn validate_chunks(path: &Path, u: &UnitRecord) -> Result<u64> {
    let bad = |reason: String| Error::format("store", path, format!("unit '{}': {reason}", u.name));
    let expect = u.length.div_ceil(CODEC_CHUNK);
    if u.length == 0 || expect > MAX_CHUNKS_PER_UNIT || u.chunks.len() as u64 != expect {
        return Err(bad(format!(
            "codec {} with length {} needs {expect} chunks of {CODEC_CHUNK} bytes (at most {MAX_CHUNKS_PER_UNIT}), the manifest records {}",
            u.codec,
            u.length,
            u.chunks.len()
        )));
    }
    let mut stored_end = 0u64;
    for (i, c) in u.chunks.iter().enumerate() {
        let raw_offset = i as u64 * CODEC_CHUNK;
        let raw_len = CODEC_CHUNK.min(u.length - raw_offset);
        // Checked: a hostile stored length near 2^64 must not wrap the next offset around.
        let stored_offset = stored_end
            .checked_add(BLOCK - 1)
            .map(|x| super::align_down(x, BLOCK));
        if c.raw_offset != raw_offset
            || c.raw_len != raw_len
            || Some(c.stored_offset) != stored_offset
        {
            return Err(bad(format!(
                "chunk {i} records raw {}+{}, stored at {}; expected raw {raw_offset}+{raw_len}, stored at {}",
                c.raw_offset,
                c.raw_len,
                c.stored_offset,
                stored_offset.map_or("more than 2^64".to_string(), |o| o.to_string())
            )));
        }
        stored_end = c.stored_offset.checked_add(c.stored_len).ok_or_else(|| {
            bad(format!(
                "chunk {i} stored at {}+{} ends past 2^64",
                c.stored_offset, c.stored_len
            ))
        })?;
    }
    Ok(stored_end)
}

fn validate_tensors(path: &Path, u: &UnitRecord, minor_version: u32) -> Result<()> {
    let bad = |reason: String| Error::format("store", path, format!("unit '{}': {reason}", u.name));
    if u.tensors.is_empty() || u.tensors.len() > MAX_TENSORS_PER_UNIT {
        return Err(bad(format!(
            "{} tensors, expected 1 to {MAX_TENSORS_PER_UNIT}",
            u.tensors.len()
        )));
    }
    let mut names = HashSet::with_capacity(u.tensors.len());
    let mut prev_end = 0u64;
    for t in &u.tensors {
        if !names.insert(t.name.as_str()) {
            return Err(bad(format!("tensor '{}' appears twice", t.name)));
        }
        match &t.digest {
            Some(d) if parse_hex64(d).is_none() => {
                return Err(bad(format!(
                    "tensor '{}' has a malformed digest '{d}', expected 16 lowercase hex digits",
                    t.name
                )))
            }
            None if minor_version >= 1 => {
                return Err(bad(format!(
                    "tensor '{}' has no digest, which minor version {minor_version} requires",
                    t.name
                )))
            }
            _ => {}
        }
        if t.shape.len() > MAX_DIMS {
            return Err(bad(format!(
                "tensor '{}' has {} dimensions, more than {MAX_DIMS}",
                t.name,
                t.shape.len()
            )));
        }
        let want = t.dtype.nbytes(&t.shape);
        if want != Some(t.nbytes) {
            return Err(bad(format!(
                "tensor '{}' records {} bytes, but {} of shape {:?} needs {}",
                t.name,
                t.nbytes,
                t.dtype,
                t.shape,
                want.map_or("more than 2^64".to_string(), |w| w.to_string())
            )));
        }
        if t.offset % TENSOR_ALIGN != 0 || t.offset < prev_end {
            return Err(bad(format!(
                "tensor '{}' at offset {} is unaligned or overlaps the previous tensor ending at {prev_end}",
                t.name, t.offset
            )));
        }
        prev_end = t
            .offset
            .checked_add(t.nbytes)
            .filter(|&e| e <= u.length)
            .ok_or_else(|| {
                bad(format!(
                    "tensor '{}' spans {}+{}, past the unit length {}",
                    t.name, t.offset, t.nbytes, u.length
                ))
            })?;
    }
    Ok(())
}
