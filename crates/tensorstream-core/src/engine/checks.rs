//! Checks: the checks of a request's bytes once its jobs are done, against the unit's
//! checksum (from the digests of its checksum chunks) and the digests its tensors record
//! (from the digests of their parts); and the parts of those tensors, found at submit.

use super::pieces::Piece;
use crate::error::{Error, Result};
use crate::store::{chunked_checksum_combine, ExpectedChecksum, UnitLayout, CHECKSUM_CHUNK};
use std::path::PathBuf;

/// One checksum chunk of a tensor that records a digest: bytes `lo..hi` of the
/// destination, 4 MiB of the tensor (less for its last). The job that completes its last
/// bytes hashes it, so tensors are hashed in parallel, each byte once, whatever the jobs'
/// boundaries.
pub(super) struct TensorPart {
    pub lo: u64,
    pub hi: u64,
}

/// A tensor whose digest is verified; its parts are `parts[first..first + count]`.
struct TensorDigest {
    name: String,
    offset: u64,
    nbytes: u64,
    expected: u64,
    first: usize,
    count: usize,
}

/// The tensors of a checksummed request that record digests.
pub(super) struct TensorChecks {
    /// In destination order, without overlap (so both ends are sorted).
    pub parts: Vec<TensorPart>,
    tensors: Vec<TensorDigest>,
}

impl TensorChecks {
    /// The parts of `layout`'s tensors, or None when no tensor records a digest. A tensor
    /// with a digest must lie in the bytes the pieces fill, after the previous one.
    pub fn new(layout: &UnitLayout, pieces: &[Piece]) -> Result<Option<Self>> {
        let bad =
            |reason: String| Error::InvalidArgument(format!("unit '{}': {reason}", layout.name));
        let mut parts = Vec::new();
        let mut tensors = Vec::new();
        let mut prev_end = 0u64;
        for t in &layout.tensors {
            let Some(expected) = t.digest else { continue };
            let end = t
                .offset
                .checked_add(t.nbytes)
                .filter(|&e| e <= layout.buffer_len && t.offset >= prev_end)
                .ok_or_else(|| {
                    bad(format!(
                        "tensor '{}' at {}+{} lies outside the {}-byte buffer or before the previous tensor with a digest (ending at {prev_end})",
                        t.name, t.offset, t.nbytes, layout.buffer_len
                    ))
                })?;
            prev_end = end;
            let first = parts.len();
            let mut lo = t.offset;
            while lo < end {
                let hi = end.min(lo + CHECKSUM_CHUNK);
                parts.push(TensorPart { lo, hi });
                lo = hi;
            }
            tensors.push(TensorDigest {
                name: t.name.clone(),
                offset: t.offset,
                nbytes: t.nbytes,
                expected,
                first,
                count: parts.len() - first,
            });
        }
        if tensors.is_empty() {
            return Ok(None);
        }
        let checks = TensorChecks { parts, tensors };
        // Every part must be filled by the pieces, whole: it is hashed once they are done.
        let mut covered = vec![0u64; checks.parts.len()];
        for p in pieces {
            for i in checks.overlapping(p.dest_offset, p.dest_offset + p.len) {
                let part = &checks.parts[i];
                covered[i] += part.hi.min(p.dest_offset + p.len) - part.lo.max(p.dest_offset);
            }
        }
        if let Some(i) =
            (0..covered.len()).find(|&i| covered[i] != checks.parts[i].hi - checks.parts[i].lo)
        {
            let part = &checks.parts[i];
            let t = checks
                .tensors
                .iter()
                .find(|t| (t.first..t.first + t.count).contains(&i))
                .expect("every part belongs to a tensor");
            return Err(bad(format!(
                "tensor '{}' has bytes {}..{} that the layout does not fill",
                t.name, part.lo, part.hi
            )));
        }
        Ok(Some(checks))
    }

    /// Indices of the parts that overlap destination bytes `lo..hi`.
    pub fn overlapping(&self, lo: u64, hi: u64) -> std::ops::Range<usize> {
        let start = self.parts.partition_point(|p| p.hi <= lo);
        let end = self.parts.partition_point(|p| p.lo < hi);
        start..end.max(start)
    }

    /// The error of the first tensor whose parts' digests (`part_digests`, one per part)
    /// do not combine to its recorded digest; `source` is the file and offset of the
    /// request's first range.
    pub fn mismatch(
        &self,
        part_digests: &[u64],
        unit: &str,
        source: &(PathBuf, u64),
    ) -> Option<Error> {
        for t in &self.tensors {
            let actual = chunked_checksum_combine(&part_digests[t.first..t.first + t.count]);
            if actual != t.expected {
                return Some(Error::Checksum {
                    path: source.0.clone(),
                    unit: unit.to_string(),
                    tensor: Some(t.name.clone()),
                    offset: source.1.saturating_add(t.offset),
                    len: t.nbytes,
                    expected: t.expected,
                    actual,
                });
            }
        }
        None
    }
}

/// The error of a request whose checksum chunks' digests do not combine to the expected
/// checksum; `source` is the file and offset of the request's first range.
pub(super) fn checksum_mismatch(
    expected: ExpectedChecksum,
    digests: &[u64],
    unit: &str,
    source: &(PathBuf, u64),
) -> Option<Error> {
    let actual = chunked_checksum_combine(digests);
    if actual == expected.value {
        return None;
    }
    Some(Error::Checksum {
        path: source.0.clone(),
        unit: unit.to_string(),
        tensor: None,
        offset: source.1,
        len: expected.covered,
        expected: expected.value,
        actual,
    })
}
