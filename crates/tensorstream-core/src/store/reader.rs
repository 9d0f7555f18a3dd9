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

    /// The fingerprint of the model the manifest describes, computed as `offload()`
    /// computes a model's (`tensorstream.units.fingerprint`): SHA-256 over
    /// `tensorstream-v1|<model_class>`, then per unit in manifest order `|unit:<name>`, and
    /// per tensor in manifest order `|<name>:<dtype>:<shape>:<digest>` (shape as a Python
    /// list, `[2048, 2048]`; digest as 16 hex digits), as 32 lowercase hex digits.
    ///
    /// Unlike the recorded [`fingerprint`](Manifest::fingerprint), it follows the manifest:
    /// a renamed, swapped or relabelled tensor changes it, and reading a unit checks every
    /// tensor's bytes against its digest. A store without tensor digests (minor version 0)
    /// has none: a format error (the store cannot vouch for its names and dtypes).
    pub fn manifest_fingerprint(&self, model_class: &str) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::fmt::Write;
        let mut h = Sha256::new();
        h.update(format!("tensorstream-v1|{model_class}").as_bytes());
        let mut piece = String::new();
        for u in &self.manifest.units {
            h.update(format!("|unit:{}", u.name).as_bytes());
            for t in &u.tensors {
                let digest = t.digest_value().ok_or_else(|| {
                    Error::format(
                        "store",
                        &self.path,
                        format!(
                            "unit '{}' tensor '{}' records no digest (a store of minor version {} written before tensor digests): its fingerprint cannot be recomputed; rewrite the store",
                            u.name, t.name, self.manifest.minor_version
                        ),
                    )
                })?;
                piece.clear();
                let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
                write!(
                    piece,
                    "|{}:{}:[{}]:{digest:016x}",
                    t.name,
                    t.dtype.name(),
                    shape.join(", ")
                )
                .expect("writing to a String");
                h.update(piece.as_bytes());
            }
        }
        let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(hex[..32].to_string())
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

    /// Read layout of unit `i`'s stored (coded) bytes, verified without decoding them, for
    /// a reader that decodes them itself; `None` for a raw unit or one written before
    /// stored checksums (minor version 2). The chunk table in the
    /// manifest ([`Manifest::units`]) says where each chunk lies in that buffer.
    pub fn stored_layout(&self, i: usize) -> Result<Option<UnitLayout>> {
        let u = self.manifest.units.get(i).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unit index {i} out of range ({} units in {})",
                self.manifest.units.len(),
                self.path.display()
            ))
        })?;
        Ok(u.stored_layout(&self.path))
    }
}
