//! Opening and validating a store. Nothing is trusted: the header, the manifest's size and
//! checksum, every count, range and size are checked before the store is handed out.

use super::format::{Header, Manifest, HEADER_LEN, MAX_MANIFEST_BYTES};
use super::{UnitLayout, BLOCK};
use crate::error::{Error, Result};
use crate::io::{open_regular, read_full};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A validated, read-only store.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    manifest: Manifest,
    index: HashMap<String, usize>,
    file_len: u64,
}

impl Store {
    /// Open and validate the store at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = open_regular(&path, "store")?;
        let file_len = file
            .metadata()
            .map_err(|e| Error::io(&path, "stat", 0, 0, e))?
            .len();
        let mut head = [0u8; HEADER_LEN];
        let n = read_full(&file, &path, 0, &mut head)?;
        let header = Header::decode(&path, &head[..n])?;
        let bad = |reason: String| Error::format("store", &path, reason);
        if header.file_len != file_len {
            return Err(bad(format!(
                "the header records {} bytes but the file has {file_len}: truncated, or still being written",
                header.file_len
            )));
        }
        if header.manifest_len > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "manifest of {} bytes exceeds the limit of {MAX_MANIFEST_BYTES}",
                header.manifest_len
            )));
        }
        let manifest_end = header.manifest_offset.checked_add(header.manifest_len);
        if header.manifest_offset < BLOCK || manifest_end != Some(file_len) {
            return Err(bad(format!(
                "manifest range {}+{} does not end the {file_len}-byte file after the first block",
                header.manifest_offset, header.manifest_len
            )));
        }
        let mut json = vec![0u8; header.manifest_len as usize];
        let got = read_full(&file, &path, header.manifest_offset, &mut json)?;
        if got != json.len() {
            return Err(bad(format!("manifest: read {got} of {} bytes", json.len())));
        }
        let actual = xxhash_rust::xxh3::xxh3_64(&json);
        if actual != header.manifest_checksum {
            return Err(bad(format!(
                "manifest checksum mismatch: expected {:016x}, got {actual:016x}",
                header.manifest_checksum
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&json)
            .map_err(|e| bad(format!("manifest is not valid: {e}")))?;
        manifest.validate(&path, header.manifest_offset)?;
        let index = manifest
            .units
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect();
        Ok(Store {
            path,
            manifest,
            index,
            file_len,
        })
    }

    /// Open the store and check that it was written for the model with `fingerprint`.
    pub fn open_for(path: impl AsRef<Path>, fingerprint: &str) -> Result<Self> {
        let store = Self::open(path)?;
        if store.manifest.fingerprint != fingerprint {
            return Err(Error::FingerprintMismatch {
                path: store.path.clone(),
                expected: fingerprint.to_string(),
                found: store.manifest.fingerprint.clone(),
            });
        }
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Index of the unit called `name`.
    pub fn unit_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Read layout of unit `i`, checksum verified: one aligned extent, read whole, for a raw
    /// unit; its chunks, each read and decoded on its own, for a coded one. The buffer has
    /// the unit's raw length rounded up to 4096 either way.
    pub fn layout(&self, i: usize) -> Result<UnitLayout> {
        let u = self.manifest.units.get(i).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unit index {i} out of range ({} units in {})",
                self.manifest.units.len(),
                self.path.display()
            ))
        })?;
        Ok(u.layout(&self.path))
    }
}
