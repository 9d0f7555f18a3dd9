//! Helpers shared by the fuzz targets: a per-process scratch directory on tmpfs, and the
//! invariants every accepted input must satisfy (layouts in bounds, reads in bounds).
//!
//! The parsers under test take paths, so each input is written to a file first. The
//! scratch directory lives on `/dev/shm` when it exists (no disk I/O per execution).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
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

/// Check a layout against the files it reads, then read it with the pread backend and
/// verify its checksum when it has one. Returns the filled buffer.
///
/// Panics (a fuzz crash) when an extent lies outside its file, extents overlap in the
/// destination, a tensor lies outside the buffer or its extent, or a read goes wrong in a
/// way other than a typed error.
pub fn check_and_read(layout: &UnitLayout, file_lens: &[u64]) -> Option<AlignedBuf> {
    assert_eq!(layout.files.len(), file_lens.len());
    let mut dest: Vec<(u64, u64)> = Vec::new();
    let mut total = 0u64;
    for e in &layout.extents {
        assert!(e.file < layout.files.len(), "extent names file {}", e.file);
        let end = e
            .file_offset
            .checked_add(e.len)
            .expect("extent end overflows");
        assert!(
            end <= file_lens[e.file],
            "extent {e:?} past the end of its file ({})",
            file_lens[e.file]
        );
        let dend = e
            .dest_offset
            .checked_add(e.len)
            .expect("dest end overflows");
        assert!(
            dend <= layout.buffer_len,
            "extent {e:?} past the buffer ({})",
            layout.buffer_len
        );
        dest.push((e.dest_offset, dend));
        total += e.len;
    }
    dest.sort();
    for w in dest.windows(2) {
        assert!(
            w[1].0 >= w[0].1,
            "extents overlap in the destination: {w:?}"
        );
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
                dest.iter().any(|&(s, e)| t.offset >= s && end <= e),
                "tensor {t:?} not inside one extent"
            );
        }
    }
    if let Some(c) = layout.checksum {
        assert!(
            c.covered <= layout.buffer_len,
            "checksum covers past the buffer"
        );
    }
    // Everything read is bounded by the files' lengths, which are bounded by the input.
    assert!(total <= file_lens.iter().sum::<u64>());
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
    if let Some(c) = layout.checksum {
        // A mismatch is fine (the data is whatever the fuzzer wrote); a panic is not.
        let _ = chunked_checksum(&buf[..c.covered as usize]) == c.value;
    }
    Some(buf)
}
