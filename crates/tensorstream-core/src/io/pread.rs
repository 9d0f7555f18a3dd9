//! pread with O_DIRECT: reads bypass the page cache, so streaming a model does not evict
//! the pages that the rest of the machine needs, and the disk is read at full speed in
//! large aligned requests.
//!
//! O_DIRECT needs the file offset, the length and the memory address aligned to the
//! logical block size (4096 is safe everywhere). The aligned middle of a request is read
//! straight into the caller's buffer; an unaligned head or tail goes through a one-block
//! bounce buffer. A destination whose alignment cannot match the file's is read buffered,
//! and filesystems that refuse O_DIRECT (tmpfs) are read buffered; both show in the stats.

use super::file::{read_exact_at, read_full};
use super::{eof, AlignedBuf, BackendStats, ReadBackend};
use crate::error::{Error, Result};
use crate::store::{align_down, align_up, BLOCK};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct OpenedFile {
    buffered: File,
    direct: Option<File>,
}

/// Positional reads, with O_DIRECT where the filesystem allows it.
pub struct PreadBackend {
    use_direct: bool,
    files: Mutex<HashMap<PathBuf, Arc<OpenedFile>>>,
    buffered_fallback_bytes: AtomicU64,
    direct_refused_files: AtomicU64,
}

impl PreadBackend {
    /// A backend that uses O_DIRECT when `direct` is true and the filesystem allows it.
    pub fn new(direct: bool) -> Self {
        PreadBackend {
            use_direct: direct,
            files: Mutex::new(HashMap::new()),
            buffered_fallback_bytes: AtomicU64::new(0),
            direct_refused_files: AtomicU64::new(0),
        }
    }

    fn open(&self, path: &Path) -> Result<Arc<OpenedFile>> {
        let mut files = self.files.lock().expect("file table poisoned");
        if let Some(f) = files.get(path) {
            return Ok(f.clone());
        }
        let buffered = File::open(path).map_err(|e| Error::io(path, "open", 0, 0, e))?;
        let direct = if self.use_direct {
            match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(path)
            {
                Ok(f) => Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_refused_files.fetch_add(1, Ordering::Relaxed);
                    None
                }
                Err(e) => return Err(Error::io(path, "open O_DIRECT", 0, 0, e)),
            }
        } else {
            None
        };
        let f = Arc::new(OpenedFile { buffered, direct });
        files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn buffered(
        &self,
        f: &OpenedFile,
        path: &Path,
        offset: u64,
        dst: &mut [u8],
        fallback: bool,
    ) -> Result<()> {
        if fallback {
            self.buffered_fallback_bytes
                .fetch_add(dst.len() as u64, Ordering::Relaxed);
        }
        read_exact_at(&f.buffered, path, offset, dst)
    }
}

thread_local! {
    static BOUNCE: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::new(BLOCK as usize));
}

/// Copy `dst.len()` bytes at `offset` (within one aligned block) through the bounce block.
fn bounce_read(direct: &File, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
    let block = align_down(offset, BLOCK);
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let got = read_full(direct, path, block, &mut b[..])? as u64;
        let skip = offset - block;
        if got < skip + dst.len() as u64 {
            return Err(eof(
                path,
                offset,
                dst.len() as u64,
                got.saturating_sub(skip),
            ));
        }
        dst.copy_from_slice(&b[skip as usize..skip as usize + dst.len()]);
        Ok(())
    })
}

impl ReadBackend for PreadBackend {
    fn name(&self) -> String {
        if self.use_direct {
            "pread".into()
        } else {
            "pread-buffered".into()
        }
    }

    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        let f = self.open(path)?;
        let Some(direct) = f.direct.as_ref() else {
            return self.buffered(&f, path, offset, dst, self.use_direct);
        };
        let len = dst.len() as u64;
        let end = offset + len;
        let mid_start = align_up(offset, BLOCK);
        let mid_end = align_down(end, BLOCK).max(mid_start);
        let head = (mid_start - offset).min(len) as usize;
        let mid_ptr = dst.as_ptr() as u64 + head as u64;
        if !mid_ptr.is_multiple_of(BLOCK) {
            // The buffer's alignment differs from the file's: no direct read can land in it.
            return self.buffered(&f, path, offset, dst, true);
        }
        let (head_buf, rest) = dst.split_at_mut(head);
        let (mid_buf, tail_buf) = rest.split_at_mut((mid_end - mid_start) as usize);
        if !head_buf.is_empty() {
            bounce_read(direct, path, offset, head_buf)?;
        }
        if !mid_buf.is_empty() {
            match read_exact_at(direct, path, mid_start, mid_buf) {
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                    // Some filesystems accept the O_DIRECT open and refuse the read.
                    self.buffered(&f, path, mid_start, mid_buf, true)?;
                }
                r => r?,
            }
        }
        if !tail_buf.is_empty() {
            bounce_read(direct, path, mid_end, tail_buf)?;
        }
        Ok(())
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            buffered_fallback_bytes: self.buffered_fallback_bytes.load(Ordering::Relaxed),
            direct_refused_files: self.direct_refused_files.load(Ordering::Relaxed),
        }
    }

    fn preopen(&self, path: &Path) -> Result<()> {
        self.open(path).map(|_| ())
    }

    fn close_all(&self) {
        self.files.lock().expect("file table poisoned").clear();
    }
}
