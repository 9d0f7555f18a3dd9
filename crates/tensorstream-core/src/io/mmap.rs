//! Memory-mapped reads: the simplest backend, served by the page cache.

use super::{eof, ReadBackend};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Reads by copying out of a read-only mapping of each file.
#[derive(Default)]
pub struct MmapBackend {
    maps: Mutex<HashMap<PathBuf, Arc<Mmap>>>,
}

impl MmapBackend {
    /// A backend with no files mapped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The mapping of `path`, created on first use.
    pub fn map(&self, path: &Path) -> Result<Arc<Mmap>> {
        let mut maps = self.maps.lock().expect("mmap table poisoned");
        if let Some(m) = maps.get(path) {
            return Ok(m.clone());
        }
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", 0, 0, e))?;
        // SAFETY: the mapping is read-only. A store is replaced by rename, never modified in
        // place, so the mapped file does not change under us; checksums catch the rest.
        let m = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, "mmap", 0, 0, e))?;
        let m = Arc::new(m);
        maps.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }
}

/// Drop the pages of `len` bytes at `offset` from this process once they were copied: the
/// copy is the budget's memory, and the mapping's pages would otherwise stay resident (in
/// RSS, outside any budget) until the mapping goes. They stay in the page cache, and a later
/// read faults them in again with the same content.
fn drop_pages(m: &Mmap, offset: usize, len: usize) {
    const PAGE: usize = 4096;
    let start = offset / PAGE * PAGE;
    let end = (offset + len).div_ceil(PAGE) * PAGE;
    let end = end.min(m.len());
    if end > start {
        // SAFETY: the mapping is shared, read-only and of a file that is never modified in
        // place (see `map`): dropping its pages loses nothing, and any reader (another
        // worker copying a neighbouring range) faults the same bytes in again from the file.
        // A failure only leaves the pages resident.
        let _ = unsafe {
            m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

impl ReadBackend for MmapBackend {
    fn name(&self) -> String {
        "mmap".into()
    }

    fn read_into(&self, path: &Path, offset: u64, dst: &mut [u8]) -> Result<()> {
        let m = self.map(path)?;
        let len = dst.len() as u64;
        let avail = (m.len() as u64).saturating_sub(offset);
        if avail < len {
            return Err(eof(path, offset, len, avail));
        }
        dst.copy_from_slice(&m[offset as usize..(offset + len) as usize]);
        drop_pages(&m, offset as usize, len as usize);
        Ok(())
    }

    fn preopen(&self, path: &Path) -> Result<()> {
        self.map(path).map(|_| ())
    }

    fn close_all(&self) {
        self.maps.lock().expect("mmap table poisoned").clear();
    }
}
