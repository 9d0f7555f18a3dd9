//! Pieces: the ranges a request is split into, and how each is filled (a read, a read and
//! decode, or a fault-in). A leaf: it knows nothing of tickets, queues or workers.

use crate::codec::ChunkMode;
use crate::store::{align_up, UnitLayout};
use std::path::PathBuf;
use std::sync::Arc;

/// How a job fills its range of the destination.
pub(super) enum JobKind {
    /// Read the range's bytes from `file` at `file_offset` (an extent's piece, or a coded
    /// chunk stored raw).
    Read {
        file: Arc<PathBuf>,
        file_offset: u64,
    },
    /// Fault in the range, which the caller has already mapped (a populate request);
    /// nothing is copied.
    Populate,
    /// A coded chunk: read its stored bytes and decode them into the range.
    Decode(StoredChunk),
}

/// Where a coded chunk's stored bytes lie, and how they are coded.
pub(super) struct StoredChunk {
    pub file: Arc<PathBuf>,
    pub file_offset: u64,
    pub stored_len: u64,
    pub mode: ChunkMode,
}

impl JobKind {
    /// True for a coded chunk, the only jobs decode workers take.
    pub fn is_decode(&self) -> bool {
        matches!(self, JobKind::Decode(_))
    }
}

/// One piece of a request: a range of the destination and how to fill it.
pub(super) struct Piece {
    /// Byte offset of the range in the destination.
    pub dest_offset: u64,
    /// Bytes of the destination this piece fills.
    pub len: u64,
    pub kind: JobKind,
}

/// Split a (validated) layout into pieces: each extent on `chunk_bytes` boundaries of
/// the destination, so that checksum chunks never straddle pieces, read or (`populate`)
/// faulted in; each coded chunk as one piece, a plain read when it is stored raw.
pub(super) fn split(layout: &UnitLayout, chunk_bytes: u64, populate: bool) -> Vec<Piece> {
    let files: Vec<Arc<PathBuf>> = layout.files.iter().map(|p| Arc::new(p.clone())).collect();
    let mut pieces = Vec::new();
    for e in &layout.extents {
        let mut off = 0;
        while off < e.len {
            let dest_offset = e.dest_offset + off;
            let boundary = align_up(dest_offset + 1, chunk_bytes);
            let len = (boundary - dest_offset).min(e.len - off);
            let kind = if populate {
                JobKind::Populate
            } else {
                JobKind::Read {
                    file: files[e.file].clone(),
                    file_offset: e.file_offset + off,
                }
            };
            pieces.push(Piece {
                dest_offset,
                len,
                kind,
            });
            off += len;
        }
    }
    for c in &layout.chunks {
        let file = files[c.file].clone();
        let kind = match c.mode {
            ChunkMode::Raw => JobKind::Read {
                file,
                file_offset: c.file_offset,
            },
            mode => JobKind::Decode(StoredChunk {
                file,
                file_offset: c.file_offset,
                stored_len: c.stored_len,
                mode,
            }),
        };
        pieces.push(Piece {
            dest_offset: c.dest_offset,
            len: c.raw_len,
            kind,
        });
    }
    pieces
}
