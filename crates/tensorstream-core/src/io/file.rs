//! File helpers shared by the parsers (store reader, safetensors view) and the pread
//! backend: opening only regular files, and positional reads that retry short reads.

use crate::error::{Error, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Open a file only if it is a regular file: a FIFO or device would block or never end.
/// `kind` names what the file should be in the format error (e.g. "store").
pub(crate) fn open_regular(path: &Path, kind: &'static str) -> Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    // Opened non-blocking, so that a FIFO or a device does not hang the open, and the
    // handle checked, not the path: nothing can be swapped in between check and use.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io(path, "open", 0, 0, e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", 0, 0, e))?;
    if !meta.is_file() {
        return Err(Error::format(kind, path, "not a regular file"));
    }
    // Regular files ignore O_NONBLOCK; clear it anyway, so the handle is an ordinary one.
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function owns, with flags it read just before.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Read until `buf` is full or the file ends, retrying short reads and EINTR; returns the
/// bytes read.
pub(crate) fn read_full(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(
                    path,
                    "pread",
                    offset + done as u64,
                    (buf.len() - done) as u64,
                    e,
                ))
            }
        }
    }
    Ok(done)
}

/// Read exactly `buf.len()` bytes; a file that ends first is an `UnexpectedEof` I/O error.
pub(crate) fn read_exact_at(file: &File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    let got = read_full(file, path, offset, buf)?;
    if got < buf.len() {
        return Err(super::eof(path, offset, buf.len() as u64, got as u64));
    }
    Ok(())
}
