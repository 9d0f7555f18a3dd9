//! Helpers shared by the fuzz targets: a per-process scratch directory on tmpfs, and the
//! invariants every accepted input must satisfy (layouts in bounds, reads in bounds).
//!
//! The parsers under test take paths, so each input is written to a file first. The
//! scratch directory lives on `/dev/shm` when it exists (no disk I/O per execution).

pub mod semantics;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tensorstream_core::codec::{Decoder, CODEC_CHUNK};
use tensorstream_core::io::{AlignedBuf, PreadBackend, ReadBackend};
use tensorstream_core::store::{chunked_checksum, UnitLayout};
use tensorstream_core::Error;

/// A scratch directory private to this process, removed by nobody (tmpfs, tiny).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("tensorstream-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    })
}

/// Every error a parser returns on bad input must be a typed format or I/O error.
pub fn expect_typed(e: &Error) {
    match e {
        Error::Format { .. } | Error::Io { .. } | Error::Checksum { .. } => {}
        other => panic!("unexpected error kind for bad input: {other:?}"),
    }
}

/// Check a layout against the files it reads, then read it with the pread backend (decoding
/// coded chunks) and verify its checksum when it has one. Returns the filled buffer and
/// whether the checksum matched (None: no checksum, or the unit was too large to read).
///
/// Panics (a fuzz crash) when an extent or coded chunk lies outside its file, destination
/// ranges overlap or leave the buffer, a chunk decodes to more than a codec chunk, a tensor
/// lies outside the bytes the layout fills, or an in-bounds read fails.
pub fn check_and_read(
    layout: &UnitLayout,
    file_lens: &[u64],
) -> Option<(AlignedBuf, Option<bool>)> {
    assert_eq!(layout.files.len(), file_lens.len());
    let mut dest: Vec<(u64, u64)> = Vec::new();
    let mut total = 0u64;
    let mut check_src = |file: usize, off: u64, len: u64, what: &dyn std::fmt::Debug| {
        assert!(file < layout.files.len(), "{what:?} names file {file}");
        let end = off.checked_add(len).expect("source end overflows");
        assert!(
            end <= file_lens[file],
            "{what:?} past the end of its file ({})",
            file_lens[file]
        );
        total += len;
    };
    for e in &layout.extents {
        check_src(e.file, e.file_offset, e.len, e);
        dest.push((
            e.dest_offset,
            e.dest_offset
                .checked_add(e.len)
                .expect("dest end overflows"),
        ));
    }
    for c in &layout.chunks {
        check_src(c.file, c.file_offset, c.stored_len, c);
        assert!(
            c.raw_len <= CODEC_CHUNK,
            "chunk {c:?} decodes to more than {CODEC_CHUNK} bytes"
        );
        dest.push((
            c.dest_offset,
            c.dest_offset
                .checked_add(c.raw_len)
                .expect("dest end overflows"),
        ));
    }
    dest.sort();
    for w in dest.windows(2) {
        assert!(w[1].0 >= w[0].1, "destination ranges overlap: {w:?}");
    }
    for &(_, e) in &dest {
        assert!(
            e <= layout.buffer_len,
            "a destination range ends past the buffer ({})",
            layout.buffer_len
        );
    }
    // Contiguous destination ranges, merged: a tensor may span several coded chunks.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in &dest {
        match merged.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    for t in &layout.tensors {
        assert_eq!(
            t.dtype.nbytes(&t.shape),
            Some(t.nbytes),
            "tensor {t:?}: nbytes"
        );
        let end = t
            .offset
            .checked_add(t.nbytes)
            .expect("tensor end overflows");
        assert!(
            end <= layout.buffer_len,
            "tensor {t:?} past the buffer ({})",
            layout.buffer_len
        );
        if t.nbytes > 0 {
            assert!(
                merged.iter().any(|&(s, e)| t.offset >= s && end <= e),
                "tensor {t:?} not inside the bytes the layout fills"
            );
        }
    }
    if let Some(c) = layout.checksum {
        assert!(
            c.covered <= layout.buffer_len,
            "checksum covers past the buffer"
        );
    }
    // Every source range lies inside its file (checked above), so reads are bounded by the input.
    let _ = total;
    if layout.buffer_len > 64 << 20 {
        return None;
    }
    let backend = PreadBackend::new(false);
    let mut buf = AlignedBuf::new(layout.buffer_len.max(1) as usize);
    for e in &layout.extents {
        let s = e.dest_offset as usize;
        let r = backend.read_into(
            &layout.files[e.file],
            e.file_offset,
            &mut buf[s..s + e.len as usize],
        );
        if let Err(err) = r {
            panic!("in-bounds read of {e:?} failed: {err}");
        }
    }
    let mut decoded_ok = true;
    if !layout.chunks.is_empty() {
        let mut dec = Decoder::new().expect("decoder");
        for c in &layout.chunks {
            let mut stored = vec![0u8; c.stored_len as usize];
            if let Err(err) = backend.read_into(&layout.files[c.file], c.file_offset, &mut stored) {
                panic!("in-bounds read of {c:?} failed: {err}");
            }
            let d = c.dest_offset as usize;
            // Corrupted coded bytes give an error string, never a panic.
            if dec
                .decode(c.mode, &stored, &mut buf[d..d + c.raw_len as usize])
                .is_err()
            {
                decoded_ok = false;
            }
        }
    }
    let matched = layout
        .checksum
        .map(|c| decoded_ok && chunked_checksum(&buf[..c.covered as usize]) == c.value);
    Some((buf, matched))
}
