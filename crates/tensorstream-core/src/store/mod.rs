//! On-disk sources of unit data: TensorStream's own store format and a read-only view of
//! safetensors checkpoints. Both describe each unit as a [`UnitLayout`]: the byte ranges
//! to read and where each tensor lands in the destination buffer.

mod checksum;
mod dtype;
mod format;
mod reader;
mod safetensors;
mod writer;

pub use checksum::{
    chunked_checksum, combine as chunked_checksum_combine, ChunkedHasher, CHECKSUM_CHUNK,
};
pub use dtype::DType;
pub use format::{
    ChunkRecord, Manifest, TensorRecord, UnitRecord, FORMAT_VERSION, MAGIC, MAX_CHUNKS_PER_UNIT,
};
pub use reader::Store;
pub use safetensors::{SafetensorsView, TensorLocation};
pub use writer::StoreWriter;

use crate::codec::ChunkMode;
use std::path::PathBuf;

/// Alignment of units inside a store file and of O_DIRECT reads.
pub const BLOCK: u64 = 4096;
/// Alignment of tensors inside a unit.
pub const TENSOR_ALIGN: u64 = 64;

/// Round `x` up to a multiple of `a` (a power of two).
pub const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Round `x` down to a multiple of `a` (a power of two).
pub const fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

/// One contiguous byte range of a file, and where it goes in the destination buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Index into [`UnitLayout::files`].
    pub file: usize,
    /// Byte offset in the file.
    pub file_offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Byte offset in the destination buffer.
    pub dest_offset: u64,
}

/// One coded chunk of a unit: stored bytes in a file, decoded into a range of the
/// destination buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodedChunk {
    /// Index into [`UnitLayout::files`].
    pub file: usize,
    /// Byte offset of the stored bytes in the file. Stores start every chunk on a 4096
    /// boundary and pad its end to one, so a reader may widen the read to 4096 bounds.
    pub file_offset: u64,
    /// Stored bytes.
    pub stored_len: u64,
    /// Byte offset in the destination buffer where the decoded bytes go.
    pub dest_offset: u64,
    /// Decoded (raw) bytes, at most [`crate::codec::CODEC_CHUNK`].
    pub raw_len: u64,
    /// How the chunk is stored.
    pub mode: ChunkMode,
}

/// Where one tensor lives inside a unit's destination buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// Tensor name, relative to the unit for a store, or the full checkpoint name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Byte offset in the destination buffer.
    pub offset: u64,
    /// Size in bytes.
    pub nbytes: u64,
}

/// Checksum recorded for a unit, verified chunk by chunk as the data arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedChecksum {
    /// The unit's checksum (see [`chunked_checksum`]).
    pub value: u64,
    /// Number of leading bytes of the destination buffer that the checksum covers.
    pub covered: u64,
}

/// Everything the engine needs to read one unit into a caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitLayout {
    /// Unit name, used in errors and statistics.
    pub name: String,
    /// Files the extents refer to.
    pub files: Vec<PathBuf>,
    /// Byte ranges to read. Extents never overlap in the destination.
    pub extents: Vec<Extent>,
    /// Coded chunks to read and decode (a unit stored with a codec); empty for raw data.
    /// Chunks never overlap each other or the extents in the destination.
    pub chunks: Vec<CodedChunk>,
    /// Size the destination buffer must have.
    pub buffer_len: u64,
    /// Tensors inside the destination buffer.
    pub tensors: Vec<TensorSlot>,
    /// Checksum to verify, when the source records one.
    pub checksum: Option<ExpectedChecksum>,
}

impl UnitLayout {
    /// Bytes moved from disk to read this unit.
    pub fn bytes_to_read(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum::<u64>()
            + self.chunks.iter().map(|c| c.stored_len).sum::<u64>()
    }

    /// Bytes the unit has once decoded, in the destination buffer.
    pub fn raw_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum::<u64>()
            + self.chunks.iter().map(|c| c.raw_len).sum::<u64>()
    }

    /// True when some of the unit's bytes are coded, so they cannot be mapped in place.
    pub fn is_coded(&self) -> bool {
        self.chunks.iter().any(|c| c.mode != ChunkMode::Raw)
    }
}
