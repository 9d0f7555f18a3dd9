//! Atomic store writer: data goes to a temporary file next to the target, which is
//! fsynced and renamed over the target only once the manifest and header are complete.
//! A crash at any point leaves either no store or the previous one, never a store that
//! looks valid with wrong bytes.

use super::checksum::chunked_checksum;
use super::checksum::ChunkedHasher;
use super::format::{
    ChunkRecord, Header, Manifest, TensorRecord, UnitRecord, CHECKSUM_ALGORITHM,
    FORMAT_MINOR_VERSION, FORMAT_VERSION, HEADER_LEN,
};
use super::{align_up, DType, BLOCK};
use crate::codec::{ChunkMode, CodeFamily, Encoder, CODEC_BYTEGROUP, CODEC_CHUNK, CODEC_RAW};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes a store, unit by unit, tensor by tensor, in constant memory.
///
/// ```no_run
/// use tensorstream_core::store::{DType, StoreWriter};
/// let mut w = StoreWriter::create("model.tstore", "fingerprint")?;
/// w.begin_unit("layers.0")?;
/// w.add_tensor("weight", DType::F32, &[2, 2], &[0u8; 16])?;
/// w.end_unit()?;
/// w.finish()?;
/// # Ok::<(), tensorstream_core::Error>(())
/// ```
pub struct StoreWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    /// A descriptor of the temporary file holding its exclusive flock (see `create`).
    lock: Option<File>,
    out: Option<BufWriter<File>>,
    pos: u64,
    fingerprint: String,
    metadata: BTreeMap<String, String>,
    units: Vec<UnitRecord>,
    open_unit: Option<OpenUnit>,
    renamed: bool,
    compression: Option<Compression>,
}

struct OpenUnit {
    record: UnitRecord,
    hasher: ChunkedHasher,
    /// Raw bytes of the unit so far.
    raw_len: u64,
    /// Set for a unit being coded.
    coded: Option<CodedUnit>,
}

/// A unit being coded: raw bytes wait in `staging` until a batch of chunks is full, then
/// the batch is coded in parallel and written in order.
struct CodedUnit {
    /// Raw bytes of the chunks not yet written; they start at chunk `record.chunks.len()`.
    staging: Vec<u8>,
    /// Stored offset (relative to the unit) where the next chunk goes, a multiple of 4096.
    stored_pos: u64,
    /// The checksum of the stored bytes so far (the unit's `stored_checksum`).
    stored_hasher: ChunkedHasher,
    /// Zeros after the last chunk written: stored bytes once another chunk follows it.
    pending_pad: u64,
}

/// The writer's codec settings and one encoder per coding thread.
struct Compression {
    family: CodeFamily,
    encoders: Vec<Encoder>,
}

/// Writers align tensors to 256 bytes, more than the 64 the format requires: GPU kernels
/// then see the same alignment as in a fresh allocation, so they pick the same code paths.
pub const WRITE_TENSOR_ALIGN: u64 = 256;

/// The buffer a raw unit needs when read from a store, for tensors of these sizes in this
/// order, as `add_tensor` lays them out (each at a `WRITE_TENSOR_ALIGN` offset) and the
/// reader pads them (to 4 KiB): a unit's size in a store, known before writing it.
pub fn unit_buffer_len(tensor_nbytes: &[u64]) -> u64 {
    let raw = tensor_nbytes
        .iter()
        .fold(0, |pos, &n| align_up(pos, WRITE_TENSOR_ALIGN) + n);
    align_up(raw, BLOCK)
}

const ZEROS: [u8; BLOCK as usize] = [0u8; BLOCK as usize];

impl StoreWriter {
    /// Start writing a store that will appear at `path` when [`finish`](Self::finish) returns.
    pub fn create(path: impl AsRef<Path>, fingerprint: &str) -> Result<Self> {
        let final_path = path.as_ref().to_path_buf();
        let file_name = final_path
            .file_name()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "store path {} has no file name",
                    final_path.display()
                ))
            })?
            .to_string_lossy()
            .into_owned();
        // A name no other writer uses: two writers for one target, in this process or in
        // another one with the same pid (containers sharing a filesystem), must not share
        // (and truncate, or delete) each other's temporary file. The name stays
        // `.<name>.tmp-<n>-<pid>`, but what tells a live writer is its lock: the file is
        // held under an exclusive flock from creation until rename or removal, so a
        // cleaner that can take the lock (LOCK_EX|LOCK_NB) knows its writer is gone.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let (tmp_path, file) = loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let tmp_path =
                final_path.with_file_name(format!(".{file_name}.tmp-{n}-{}", std::process::id()));
            let file = match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&tmp_path, "create", 0, 0, e)),
            };
            match lock_new_file(&tmp_path, &file) {
                Ok(true) => break (tmp_path, file),
                Ok(false) => {}
                Err(e) => {
                    // Unlocked, it would look abandoned: do not leave it behind.
                    let _ = std::fs::remove_file(&tmp_path);
                    return Err(e);
                }
            }
            // A cleaner took the unlocked file in the instant between creating and
            // locking it (and removes it): try another name.
        };
        // A second descriptor of the same open file keeps the lock (flock locks belong to
        // the open file, released when its last descriptor closes) after the writing one
        // is closed, until the file is renamed into place or removed.
        let lock = file
            .try_clone()
            .map_err(|e| Error::io(&tmp_path, "dup", 0, 0, e))?;
        let mut w = StoreWriter {
            final_path,
            tmp_path,
            lock: Some(lock),
            out: Some(BufWriter::with_capacity(8 << 20, file)),
            pos: 0,
            fingerprint: fingerprint.to_string(),
            metadata: BTreeMap::new(),
            units: Vec::new(),
            open_unit: None,
            renamed: false,
            compression: None,
        };
        // The header block is written last; until then the file has no magic.
        w.write_raw(&ZEROS)?;
        Ok(w)
    }

    /// Replace the fingerprint, for writers that learn it while writing (a conversion
    /// hashes the tensors as it copies them).
    pub fn set_fingerprint(&mut self, fingerprint: &str) {
        self.fingerprint = fingerprint.to_string();
    }

    /// Record a free-form metadata entry in the manifest.
    pub fn set_metadata(&mut self, key: &str, value: &str) {
        self.metadata.insert(key.to_string(), value.to_string());
    }

    /// Code the units begun from now on in coded chunks with `family`'s code (zstd `level`
    /// for the planes zstd codes, 1 to 22; the table code records it and uses none), on
    /// `threads` threads (0: the machine's cores, at most 8); or, with `None`, store them
    /// raw. Records the choice in the metadata (`compression`: "none" or the family's name,
    /// `compression_level`).
    pub fn set_compression(
        &mut self,
        level: Option<i32>,
        threads: usize,
        family: CodeFamily,
    ) -> Result<()> {
        let Some(level) = level else {
            self.compression = None;
            self.metadata.insert("compression".into(), "none".into());
            self.metadata.remove("compression_level");
            return Ok(());
        };
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
        } else {
            threads.min(64)
        };
        let encoders = (0..threads)
            .map(|_| Encoder::new(level))
            .collect::<Result<Vec<_>>>()?;
        self.compression = Some(Compression { family, encoders });
        self.metadata
            .insert("compression".into(), family.name().into());
        self.metadata
            .insert("compression_level".into(), level.to_string());
        Ok(())
    }

    /// The temporary file being written (for diagnostics and tests). It is named
    /// `.<target name>.tmp-<n>-<pid>` and held under an exclusive flock until it is renamed
    /// into place or removed.
    pub fn temp_path(&self) -> &Path {
        &self.tmp_path
    }

    fn write_raw(&mut self, data: &[u8]) -> Result<()> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| Error::InvalidArgument("store writer already finished".into()))?;
        out.write_all(data)
            .map_err(|e| Error::io(&self.tmp_path, "write", self.pos, data.len() as u64, e))?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Zeros in the file, outside any unit's raw bytes (padding to a block).
    fn write_zeros(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let k = n.min(BLOCK);
            self.write_raw(&ZEROS[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    /// Append raw bytes to the open unit: hashed, then written as they are (a raw unit) or
    /// staged for coding.
    fn emit(&mut self, mut data: &[u8]) -> Result<()> {
        let unit = self.open_unit.as_mut().expect("emit inside a unit");
        unit.hasher.update(data);
        unit.raw_len += data.len() as u64;
        if unit.coded.is_none() {
            return self.write_raw(data);
        }
        let batch = self.batch_bytes();
        while !data.is_empty() {
            let staging = &mut self
                .open_unit
                .as_mut()
                .expect("open")
                .coded
                .as_mut()
                .expect("coded")
                .staging;
            let take = (batch - staging.len()).min(data.len());
            staging.extend_from_slice(&data[..take]);
            data = &data[take..];
            if staging.len() == batch {
                self.flush_chunks()?;
            }
        }
        Ok(())
    }

    /// Raw zero bytes of the open unit (padding between tensors).
    fn emit_zeros(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            let k = n.min(BLOCK);
            self.emit(&ZEROS[..k as usize])?;
            n -= k;
        }
        Ok(())
    }

    fn batch_bytes(&self) -> usize {
        self.compression.as_ref().map_or(1, |c| c.encoders.len()) * CODEC_CHUNK as usize
    }

    /// Code the staged chunks (in parallel, one per encoder) and write them in order.
    fn flush_chunks(&mut self) -> Result<()> {
        let mut unit = self.open_unit.take().expect("flush inside a unit");
        let r = self.flush_unit_chunks(&mut unit);
        self.open_unit = Some(unit);
        r
    }

    fn flush_unit_chunks(&mut self, unit: &mut OpenUnit) -> Result<()> {
        let coded = unit.coded.as_mut().expect("coded unit");
        if coded.staging.is_empty() {
            return Ok(());
        }
        let comp = self
            .compression
            .as_mut()
            .expect("a coded unit has compression");
        let first = unit.record.chunks.len() as u64 * CODEC_CHUNK;
        let pieces: Vec<(&[u8], u64)> = coded
            .staging
            .chunks(CODEC_CHUNK as usize)
            .enumerate()
            .map(|(i, raw)| {
                let lo = first + i as u64 * CODEC_CHUNK;
                (
                    raw,
                    chunk_width(&unit.record.tensors, lo, lo + raw.len() as u64),
                )
            })
            .collect();
        let family = comp.family;
        let encoders = &mut comp.encoders[..pieces.len()];
        let modes: Vec<Result<Option<ChunkMode>>> = if pieces.len() == 1 {
            vec![encoders[0].encode_with(family, pieces[0].0, pieces[0].1)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = encoders
                    .iter_mut()
                    .zip(&pieces)
                    .map(|(enc, &(raw, width))| {
                        s.spawn(move || enc.encode_with(family, raw, width))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("encoder thread panicked"))
                    .collect()
            })
        };
        for (k, ((raw, _), mode)) in pieces.iter().zip(modes).enumerate() {
            let (mode, bytes): (ChunkMode, &[u8]) = match mode? {
                Some(m) => (m, comp.encoders[k].coded()),
                None => (ChunkMode::Raw, raw),
            };
            let pending = std::mem::replace(&mut coded.pending_pad, 0);
            coded.stored_hasher.update(&ZEROS[..pending as usize]);
            coded.stored_hasher.update(bytes);
            let out = self.out.as_mut().expect("not finished");
            out.write_all(bytes)
                .map_err(|e| Error::io(&self.tmp_path, "write", self.pos, bytes.len() as u64, e))?;
            self.pos += bytes.len() as u64;
            let pad = align_up(self.pos, BLOCK) - self.pos;
            let out = self.out.as_mut().expect("not finished");
            out.write_all(&ZEROS[..pad as usize])
                .map_err(|e| Error::io(&self.tmp_path, "write", self.pos, pad, e))?;
            self.pos += pad;
            unit.record.chunks.push(ChunkRecord {
                raw_offset: unit.record.chunks.len() as u64 * CODEC_CHUNK,
                raw_len: raw.len() as u64,
                stored_offset: coded.stored_pos,
                stored_len: bytes.len() as u64,
                mode,
            });
            coded.stored_pos += bytes.len() as u64 + pad;
            coded.pending_pad = pad;
        }
        coded.staging.clear();
        Ok(())
    }

    /// Start a unit. Units are written in order; each starts on a 4 KiB boundary.
    pub fn begin_unit(&mut self, name: &str) -> Result<()> {
        if let Some(u) = &self.open_unit {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' is still open",
                u.record.name
            )));
        }
        if self.units.iter().any(|u| u.name == name) {
            return Err(Error::InvalidArgument(format!(
                "unit '{name}' was already written"
            )));
        }
        debug_assert_eq!(self.pos % BLOCK, 0);
        let coded = self.compression.is_some().then(|| CodedUnit {
            staging: Vec::with_capacity(self.batch_bytes()),
            stored_pos: 0,
            stored_hasher: ChunkedHasher::default(),
            pending_pad: 0,
        });
        self.open_unit = Some(OpenUnit {
            record: UnitRecord {
                name: name.to_string(),
                offset: self.pos,
                length: 0,
                padded_length: 0,
                codec: if coded.is_some() {
                    CODEC_BYTEGROUP
                } else {
                    CODEC_RAW
                }
                .into(),
                checksum: String::new(),
                tensors: Vec::new(),
                chunks: Vec::new(),
                stored_checksum: None,
            },
            hasher: ChunkedHasher::default(),
            raw_len: 0,
            coded,
        });
        Ok(())
    }

    /// Append a tensor to the open unit. `data` must hold exactly the tensor's bytes.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[u64],
        data: &[u8],
    ) -> Result<()> {
        let unit = self.open_unit.as_ref().ok_or_else(|| {
            Error::InvalidArgument(format!("tensor '{name}' added outside a unit"))
        })?;
        let want = dtype.nbytes(shape);
        if want != Some(data.len() as u64) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}' of unit '{}': {dtype} of shape {shape:?} needs {want:?} bytes, got {}",
                unit.record.name,
                data.len()
            )));
        }
        if unit.record.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{name}' appears twice in unit '{}'",
                unit.record.name
            )));
        }
        let rel = unit.raw_len;
        let pad = align_up(rel, WRITE_TENSOR_ALIGN) - rel;
        self.emit_zeros(pad)?;
        let offset = rel + pad;
        // Recorded before the bytes, so chunks coded while they stream in see its dtype.
        let unit = self.open_unit.as_mut().expect("checked above");
        unit.record.tensors.push(TensorRecord {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            offset,
            nbytes: data.len() as u64,
            // Exactly what `_core.checksum` returns for these bytes (fingerprints use it).
            digest: Some(format!("{:016x}", chunked_checksum(data))),
        });
        self.emit(data)?;
        let unit = self.open_unit.as_mut().expect("checked above");
        unit.record.length = unit.raw_len;
        Ok(())
    }

    /// Close the open unit and pad the file to the next 4 KiB boundary.
    pub fn end_unit(&mut self) -> Result<()> {
        let unit = self
            .open_unit
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("end_unit without begin_unit".into()))?;
        if unit.record.tensors.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' has no tensors",
                unit.record.name
            )));
        }
        if unit.record.length == 0 {
            // A unit of zero bytes has nothing to read or verify, and readers refuse it.
            return Err(Error::InvalidArgument(format!(
                "unit '{}' holds no bytes: all its tensors are zero-sized",
                unit.record.name
            )));
        }
        if unit.coded.is_some() {
            self.flush_chunks()?;
        }
        let OpenUnit {
            mut record,
            hasher,
            coded,
            ..
        } = self.open_unit.take().expect("checked above");
        record.checksum = format!("{:016x}", hasher.finish());
        if record.chunks.iter().all(|c| c.mode == ChunkMode::Raw) {
            // Nothing shrank: every chunk went to the file as it is, 4 MiB after 4 MiB,
            // which is exactly a raw unit. Recording it as one keeps it mappable in place.
            record.codec = CODEC_RAW.into();
            record.chunks.clear();
        } else if let Some(c) = coded {
            record.stored_checksum = Some(format!("{:016x}", c.stored_hasher.finish()));
        }
        record.padded_length = align_up(record.stored_length(), BLOCK);
        let pad = align_up(self.pos, BLOCK) - self.pos;
        self.write_zeros(pad)?;
        debug_assert_eq!(self.pos, record.offset + record.padded_length);
        self.units.push(record);
        Ok(())
    }

    /// Write the manifest and header, fsync, and rename the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some(u) = &self.open_unit {
            return Err(Error::InvalidArgument(format!(
                "unit '{}' is still open",
                u.record.name
            )));
        }
        let manifest = Manifest {
            format: "tensorstream-store".into(),
            version: FORMAT_VERSION,
            minor_version: FORMAT_MINOR_VERSION,
            fingerprint: self.fingerprint.clone(),
            checksum_algorithm: CHECKSUM_ALGORITHM.into(),
            metadata: std::mem::take(&mut self.metadata),
            units: std::mem::take(&mut self.units),
        };
        let json = serde_json::to_vec(&manifest)
            .map_err(|e| Error::InvalidArgument(format!("manifest encoding: {e}")))?;
        let manifest_offset = self.pos;
        self.write_raw(&json)?;
        let header = Header {
            manifest_offset,
            manifest_len: json.len() as u64,
            manifest_checksum: xxhash_rust::xxh3::xxh3_64(&json),
            file_len: self.pos,
        };
        let out = self.out.take().expect("not finished yet");
        let mut file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp_path, "write", self.pos, 0, e.into_error()))?;
        let io = |op, e| Error::io(&self.tmp_path, op, 0, HEADER_LEN as u64, e);
        // Data first, then the header that makes the file valid, each made durable in turn.
        file.sync_data().map_err(|e| io("fsync", e))?;
        file.seek(SeekFrom::Start(0)).map_err(|e| io("seek", e))?;
        file.write_all(&header.encode())
            .map_err(|e| io("write header", e))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        drop(file);
        std::fs::rename(&self.tmp_path, &self.final_path)
            .map_err(|e| Error::io(&self.final_path, "rename", 0, 0, e))?;
        self.renamed = true;
        // The file is no longer a temporary one: release its lock.
        self.lock = None;
        if let Some(dir) = self.final_path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.final_path.clone())
    }
}

/// The grouping width for raw bytes `lo..hi` of a unit: the element size of the dtype that
/// covers most of them (ties go to the wider one). Padding counts for nothing.
fn chunk_width(tensors: &[TensorRecord], lo: u64, hi: u64) -> u64 {
    let mut by_size = [0u64; 4]; // element sizes 1, 2, 4, 8
    for t in tensors.iter().rev() {
        let end = t.offset + t.nbytes;
        if end <= lo {
            break; // tensors are in offset order: the rest lie before the chunk
        }
        let overlap = end.min(hi).saturating_sub(t.offset.max(lo));
        by_size[t.dtype.size().trailing_zeros() as usize] += overlap;
    }
    let best = (0..4).max_by_key(|&k| by_size[k]).unwrap_or(0);
    1 << best
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        // An unfinished or failed writer leaves nothing behind.
        // The file is removed while its lock is still held (the fields drop after this).
        if !self.renamed {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Take the exclusive flock of a file just created at `path`. Returns false when the file
/// is no longer the one at `path` or a cleaner holds its lock: the lock went to whoever
/// found the file unlocked first, and that one removes it.
fn lock_new_file(path: &Path, file: &File) -> Result<bool> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    // SAFETY: flock on a descriptor we own; it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        return Err(Error::io(path, "flock", 0, 0, e));
    }
    let ours = file
        .metadata()
        .map_err(|e| Error::io(path, "stat", 0, 0, e))?;
    Ok(match std::fs::symlink_metadata(path) {
        Ok(m) => m.dev() == ours.dev() && m.ino() == ours.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(Error::io(path, "stat", 0, 0, e)),
    })
}
