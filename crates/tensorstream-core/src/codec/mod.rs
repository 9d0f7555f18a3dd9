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
//!
//! Here: the registry of codecs and chunk modes (their names and limits), and the
//! [`Encoder`] and [`Decoder`] that hand each chunk to its code. The `bytegroup` module
//! holds the byte-grouped code (the choice of [`PlaneCoder`] per plane, a grouped chunk's
//! header and planes), helped by [`huffman`], [`split`] and the grouping itself (`group`);
//! [`table`] the table code; `bench` whole buffers coded or decoded in one call
//! ([`encode_all`], [`decode_parallel`] and the like), for tests, tools and benchmarks.

mod bench;
mod bytegroup;
mod group;
pub mod huffman;
pub mod split;
pub mod table;

pub use bench::{decode_all, decode_parallel, encode_all, encode_all_with, encode_parallel};
pub use bytegroup::PlaneCoder;
pub use group::{group, interleave, ungroup};

use crate::error::{Error, Result};
use crate::store::CHECKSUM_CHUNK;
use bytegroup::{GroupedDecoder, GroupedEncoder};
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

/// Codes chunks. One per writer thread; it keeps its zstd context and scratch memory.
pub struct Encoder {
    level: i32,
    grouped: GroupedEncoder,
    out: Vec<u8>,
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
        let grouped = GroupedEncoder::new(level)?;
        Ok(Encoder {
            level,
            grouped,
            out: Vec::new(),
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
        self.grouped.encode(raw, w, &mut self.out)?;
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

/// Decodes chunks. One per I/O worker; it keeps its zstd context and plane scratch.
pub struct Decoder {
    grouped: GroupedDecoder,
}

impl Decoder {
    /// A decoder.
    pub fn new() -> Result<Self> {
        Ok(Decoder {
            grouped: GroupedDecoder::new()?,
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
        match mode {
            ChunkMode::Raw => {
                if stored.len() != dst.len() {
                    return Err(format!(
                        "raw chunk of {} stored bytes for {} raw bytes",
                        stored.len(),
                        dst.len()
                    ));
                }
                dst.copy_from_slice(stored);
                Ok(())
            }
            ChunkMode::Grouped { width } if matches!(width, 1 | 2 | 4 | 8) => {
                self.grouped.decode(width as usize, stored, dst)
            }
            ChunkMode::Grouped { width } => Err(format!("invalid grouping width {width}")),
            ChunkMode::Table { width } => table::decode(stored, width as usize, dst),
        }
    }
}
