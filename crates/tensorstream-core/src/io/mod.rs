//! I/O backends: each reads byte ranges of a file into memory the caller provides.
//!
//! The engine splits requests into chunks and calls a backend from several worker threads
//! at once, so backends are `Send + Sync` and keep their open files internally. The file
//! helpers the backends and the parsers share (opening only regular files, positional reads
//! that retry short reads) live here too.

mod aligned;
mod faults;
mod file;
mod mmap;
mod pread;

pub use aligned::AlignedBuf;
pub use faults::{FaultPlan, FaultyBackend};
pub use mmap::MmapBackend;
pub use pread::PreadBackend;

pub(crate) use file::{open_regular, read_full};

use crate::error::{Error, Result};
use std::path::Path;

/// Counters every backend keeps about slower paths it had to take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Bytes read through the page cache although direct I/O was asked for.
    pub buffered_fallback_bytes: u64,
    /// Files on which the filesystem refused O_DIRECT (tmpfs, some network filesystems).
    pub direct_refused_files: u64,
}

/// A way of reading file ranges into caller memory.
pub trait ReadBackend: Send + Sync {
    /// Short name shown in statistics ("mmap", "pread" (O_DIRECT), "pread-buffered").
    fn name(&self) -> String;

    /// Fill `dst` with the bytes of `path` starting at `offset`.
    ///
    /// Reading past the end of the file is an error (`UnexpectedEof`), never a silent
    /// short read.
    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Counters about fallbacks taken so far.
    fn stats(&self) -> BackendStats {
        BackendStats::default()
    }

    /// Open (and keep open) `path` now, so that later reads see this file even if the path
    /// is replaced by another one (an atomic rename) before the first read.
    fn preopen(&self, _path: &Path) -> Result<()> {
        Ok(())
    }

    /// Forget open files and mappings (after a store is rewritten, say).
    fn close_all(&self) {}
}

impl<T: ReadBackend + ?Sized> ReadBackend for std::sync::Arc<T> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        (**self).read_into(path, offset, dst)
    }
    fn stats(&self) -> BackendStats {
        (**self).stats()
    }
    fn preopen(&self, path: &Path) -> Result<()> {
        (**self).preopen(path)
    }
    fn close_all(&self) {
        (**self).close_all()
    }
}

/// Drop the page cache's copy of a file, so that the next read comes from the disk.
/// Benchmarks use it to measure cold reads.
pub fn drop_page_cache(path: &Path) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", 0, 0, e))?;
    // Dirty pages are not dropped by DONTNEED; make them clean first.
    f.sync_all()
        .map_err(|e| Error::io(path, "fsync", 0, 0, e))?;
    // SAFETY: the descriptor is open for the duration of the call; fadvise reads no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(Error::io(
            path,
            "posix_fadvise",
            0,
            0,
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}

pub(crate) fn eof(path: &Path, offset: u64, len: u64, got: u64) -> Error {
    Error::io(
        path,
        "pread",
        offset,
        len,
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("file ended after {got} of {len} bytes"),
        ),
    )
}
