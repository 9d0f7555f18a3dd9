//! A unit's read layout: the byte ranges the engine reads (or reads and decodes) and where
//! each lands in the destination buffer, with the one check that makes a layout safe to
//! serve ([`UnitLayout::validate`]), shared by the engine and the store reader.

use super::{DType, CHECKSUM_CHUNK};
use crate::codec::{ChunkMode, CODEC_CHUNK};
use std::path::PathBuf;

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
    /// Checksum of the tensor's bytes (see [`chunked_checksum`](super::chunked_checksum)),
    /// when the source records one; verified with the unit's checksum.
    pub digest: Option<u64>,
}

/// Checksum recorded for a unit, verified chunk by chunk as the data arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedChecksum {
    /// The unit's checksum (see [`chunked_checksum`](super::chunked_checksum)).
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

    /// The layout that reads only the byte ranges `ranges` (offset, length) of the
    /// destination buffer, each to where it lies in the whole unit: an expert's slices of a
    /// fused expert tensor. Checksums cover whole units, so it carries none. None when
    /// part of a range is coded (a coded chunk decodes only whole) or lies outside the
    /// unit's bytes.
    pub fn select(&self, ranges: &[(u64, u64)]) -> Option<UnitLayout> {
        let raw_chunks = self.chunks.iter().filter(|c| c.mode == ChunkMode::Raw);
        let pieces: Vec<Extent> = self
            .extents
            .iter()
            .cloned()
            .chain(raw_chunks.map(|c| Extent {
                file: c.file,
                file_offset: c.file_offset,
                len: c.raw_len,
                dest_offset: c.dest_offset,
            }))
            .collect();
        let mut extents = Vec::new();
        for &(offset, len) in ranges {
            let end = offset.checked_add(len)?;
            let mut covered = 0;
            for p in &pieces {
                let lo = offset.max(p.dest_offset);
                let hi = end.min(p.dest_offset + p.len);
                if lo < hi {
                    extents.push(Extent {
                        file: p.file,
                        file_offset: p.file_offset + (lo - p.dest_offset),
                        len: hi - lo,
                        dest_offset: lo,
                    });
                    covered += hi - lo;
                }
            }
            if covered != len {
                return None;
            }
        }
        Some(UnitLayout {
            extents,
            chunks: Vec::new(),
            checksum: None,
            ..self.clone()
        })
    }

    /// Check that the engine can fill a buffer of [`buffer_len`](Self::buffer_len) bytes
    /// from this layout without writing outside it or racing with itself; returns the reason when it cannot.
    /// The engine checks every layout submitted to it, and [`Store::open`](super::Store::open)
    /// checks each unit's layout, so a store never hands out a layout the engine refuses.
    ///
    /// - Every extent and coded chunk names one of [`files`](Self::files) and ends inside
    ///   the buffer (ends computed without overflow).
    /// - A coded chunk decodes to 1 to [`CODEC_CHUNK`] bytes and is stored in exactly its
    ///   raw length when stored raw, in 1 to raw length - 1 bytes when coded (a chunk that
    ///   a codec does not shrink is stored raw). Decoding thus never reads or writes more
    ///   than a codec chunk.
    /// - Destination ranges do not overlap: workers write them concurrently.
    /// - A checksum covers either one extent at offset 0, at least `covered` long, with no
    ///   coded chunks, or coded chunks alone that tile the covered bytes one checksum chunk
    ///   each, so that each worker hashes exactly the chunk it decoded.
    ///
    /// Source ranges are not checked against the files' lengths: the engine does not know
    /// them, a read past the end of a file fails its request with an I/O error, and a
    /// store bounds its units by its file itself.
    pub(crate) fn validate(&self) -> std::result::Result<(), String> {
        let files = self.files.len();
        let ends_inside = |offset: u64, len: u64| {
            offset
                .checked_add(len)
                .is_some_and(|end| end <= self.buffer_len)
        };
        for (i, c) in self.chunks.iter().enumerate() {
            if c.file >= files || !ends_inside(c.dest_offset, c.raw_len) {
                return Err(format!(
                    "coded chunk {i} lies outside the {}-byte buffer or the {files} files ({c:?})",
                    self.buffer_len
                ));
            }
            let stored_ok = match c.mode {
                ChunkMode::Raw => c.stored_len == c.raw_len,
                ChunkMode::Grouped { .. } | ChunkMode::Table { .. } => {
                    c.stored_len > 0 && c.stored_len < c.raw_len
                }
            };
            if !(1..=CODEC_CHUNK).contains(&c.raw_len) || !stored_ok {
                return Err(format!(
                    "coded chunk {i} decodes to {} bytes stored in {} as {}; expected 1 to {CODEC_CHUNK} raw bytes, stored in {}",
                    c.raw_len,
                    c.stored_len,
                    c.mode,
                    match c.mode {
                        ChunkMode::Raw => format!("{} bytes", c.raw_len),
                        ChunkMode::Grouped { .. } | ChunkMode::Table { .. } =>
                            format!("1 to {} bytes", c.raw_len.saturating_sub(1)),
                    }
                ));
            }
        }
        for (i, e) in self.extents.iter().enumerate() {
            if e.file >= files || !ends_inside(e.dest_offset, e.len) {
                return Err(format!(
                    "extent {i} lies outside the {}-byte buffer or the {files} files ({e:?})",
                    self.buffer_len
                ));
            }
        }
        // Cannot overflow: every end was checked above.
        let mut spans: Vec<(u64, u64)> = self
            .extents
            .iter()
            .map(|e| (e.dest_offset, e.dest_offset + e.len))
            .chain(
                self.chunks
                    .iter()
                    .map(|c| (c.dest_offset, c.dest_offset + c.raw_len)),
            )
            .collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(format!(
                "destination ranges {}..{} and {}..{} overlap",
                w[0].0, w[0].1, w[1].0, w[1].1
            ));
        }
        if let Some(c) = self.checksum {
            let single = self.chunks.is_empty()
                && self.extents.len() == 1
                && self.extents[0].dest_offset == 0
                && self.extents[0].len >= c.covered;
            let tiled = self.extents.is_empty()
                && self.chunks.len() as u64 == c.covered.div_ceil(CHECKSUM_CHUNK)
                && self.chunks.iter().enumerate().all(|(k, ch)| {
                    let lo = k as u64 * CHECKSUM_CHUNK;
                    ch.dest_offset == lo && ch.raw_len == CHECKSUM_CHUNK.min(c.covered - lo)
                });
            if !single && !tiled {
                return Err(format!(
                    "a checksum over {} bytes needs one extent at offset 0, or coded chunks that tile the checksummed bytes",
                    c.covered
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB4: u64 = CODEC_CHUNK;

    fn chunk(k: u64, raw_len: u64, stored_len: u64, mode: ChunkMode) -> CodedChunk {
        CodedChunk {
            file: 0,
            file_offset: k * (MIB4 + 4096),
            stored_len,
            dest_offset: k * MIB4,
            raw_len,
            mode,
        }
    }

    /// A coded unit of two chunks, the second short, checksummed over its raw bytes.
    fn coded() -> UnitLayout {
        let len = MIB4 + 1000;
        UnitLayout {
            name: "u".into(),
            files: vec![PathBuf::from("f")],
            extents: vec![],
            chunks: vec![
                chunk(0, MIB4, 1000, ChunkMode::Grouped { width: 2 }),
                chunk(1, 1000, 1000, ChunkMode::Raw),
            ],
            buffer_len: len.next_multiple_of(4096),
            tensors: vec![],
            checksum: Some(ExpectedChecksum {
                value: 0,
                covered: len,
            }),
        }
    }

    #[test]
    fn select_reads_only_the_ranges() {
        let raw = UnitLayout {
            extents: vec![Extent {
                file: 0,
                file_offset: 4096,
                len: 10_000,
                dest_offset: 0,
            }],
            chunks: vec![],
            buffer_len: 12_288,
            checksum: None,
            ..coded()
        };
        let sel = raw.select(&[(100, 50), (9_000, 1_000)]).unwrap();
        assert_eq!(sel.bytes_to_read(), 1_050);
        assert_eq!(sel.extents[0].file_offset, 4196);
        assert_eq!(sel.extents[1].dest_offset, 9_000);
        assert!(sel.checksum.is_none());
        sel.validate().unwrap();
        assert!(
            raw.select(&[(9_990, 20)]).is_none(),
            "past the unit's bytes"
        );
        // A coded chunk decodes whole: no range of it can be read alone; a raw chunk can.
        assert!(coded().select(&[(0, 10)]).is_none());
        let tail = coded().select(&[(MIB4 + 10, 20)]).unwrap();
        assert_eq!(tail.extents[0].file_offset, MIB4 + 4096 + 10);
    }

    #[test]
    fn store_shaped_layouts_pass() {
        coded().validate().unwrap();
        let raw = UnitLayout {
            extents: vec![Extent {
                file: 0,
                file_offset: 4096,
                len: 8192,
                dest_offset: 0,
            }],
            chunks: vec![],
            buffer_len: 8192,
            checksum: Some(ExpectedChecksum {
                value: 0,
                covered: 5000,
            }),
            ..coded()
        };
        raw.validate().unwrap();
    }

    #[test]
    fn chunk_sizes_follow_the_store_rule() {
        // One chunk in a roomy buffer, no checksum: only the chunk's own rules apply.
        let reason = |edit: &dyn Fn(&mut CodedChunk)| {
            let mut l = coded();
            l.chunks.truncate(1);
            l.checksum = None;
            l.buffer_len = 4 * MIB4;
            edit(&mut l.chunks[0]);
            l.validate().err().unwrap_or_default()
        };
        assert_eq!(reason(&|_| {}), "");
        let size = |r: String| r.contains("decodes to");
        // A coded chunk must be smaller than its raw bytes (the engine used to take up to
        // a whole codec chunk), and nonempty.
        assert!(size(reason(&|c| c.stored_len = c.raw_len)));
        assert!(size(reason(&|c| c.stored_len = 0)));
        // A chunk stored raw is exactly its raw length.
        assert!(size(reason(&|c| c.mode = ChunkMode::Raw)));
        assert_eq!(
            reason(&|c| {
                c.mode = ChunkMode::Raw;
                c.stored_len = c.raw_len;
            }),
            ""
        );
        // Raw lengths are 1 to a codec chunk.
        assert!(size(reason(&|c| {
            c.raw_len = 0;
            c.stored_len = 0;
            c.mode = ChunkMode::Raw;
        })));
        assert!(size(reason(&|c| c.raw_len = MIB4 + 1)));
        // Inside the files and the buffer.
        assert!(reason(&|c| c.file = 1).contains("outside"));
        assert!(reason(&|c| c.dest_offset = u64::MAX - 10).contains("outside"));
        assert!(reason(&|c| c.dest_offset = 3 * MIB4 + 1).contains("outside"));
    }

    #[test]
    fn overlaps_and_untiled_checksums_are_refused() {
        let mut l = coded();
        l.checksum = None;
        l.chunks[1].dest_offset -= 1;
        assert!(l.validate().is_err(), "overlapping chunks");
        let mut l = coded();
        l.chunks.swap(0, 1);
        assert!(l.validate().is_err(), "chunks out of checksum order");
        let mut l = coded();
        l.checksum = None;
        l.chunks.swap(0, 1);
        l.validate().unwrap();
    }
}
