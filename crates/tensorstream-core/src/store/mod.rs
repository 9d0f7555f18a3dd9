//! On-disk sources of unit data: TensorStream's own store format and a read-only view of
//! safetensors checkpoints. Both describe each unit as a [`UnitLayout`]: the byte ranges
//! to read and where each tensor lands in the destination buffer.

mod checksum;
mod dtype;
mod format;
mod layout;
mod reader;
mod safetensors;
mod writer;

pub use checksum::{
    chunked_checksum, combine as chunked_checksum_combine, ChunkedHasher, CHECKSUM_CHUNK,
};
pub use dtype::DType;
pub use format::{
    ChunkRecord, Manifest, TensorRecord, UnitRecord, FORMAT_MINOR_VERSION, FORMAT_VERSION, MAGIC,
    MAX_CHUNKS_PER_UNIT,
};
pub use layout::{CodedChunk, ExpectedChecksum, Extent, TensorSlot, UnitLayout};
pub use reader::Store;
pub use safetensors::{SafetensorsView, TensorLocation};
pub use writer::{unit_buffer_len, StoreWriter};

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
