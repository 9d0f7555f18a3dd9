//! A read-only view of safetensors checkpoints, single files or sharded through
//! `model.safetensors.index.json`. Tensors are streamed from where they lie: a unit's
//! tensors become a few 4 KiB-aligned extents, widened around unaligned offsets, and each
//! tensor is handed out as a sub-range of the destination buffer.

use super::{align_down, align_up, DType, Extent, TensorSlot, UnitLayout, BLOCK};
use crate::error::{Error, Result};
use crate::io::{open_regular, read_full};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Largest safetensors header accepted, checked before it is read.
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
/// Largest index file accepted.
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
/// Two tensors of a unit closer than this in a file are read as one extent.
const MERGE_GAP: u64 = 1 << 20;

/// Where one tensor of a checkpoint lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// Index into [`SafetensorsView::files`].
    pub file: usize,
    /// Absolute byte offset of the tensor's data in its file.
    pub offset: u64,
    /// Size in bytes.
    pub nbytes: u64,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
}

/// A validated view of a checkpoint's tensors.
#[derive(Debug, Clone)]
pub struct SafetensorsView {
    root: PathBuf,
    files: Vec<PathBuf>,
    file_lens: Vec<u64>,
    tensors: BTreeMap<String, TensorLocation>,
    metadata: BTreeMap<String, String>,
}

const KIND: &str = "safetensors checkpoint";

impl SafetensorsView {
    /// Open a `.safetensors` file, a `.index.json` file, or a directory holding either.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            let index = path.join("model.safetensors.index.json");
            if index.is_file() {
                return Self::open_index(&index);
            }
            let single = path.join("model.safetensors");
            if single.is_file() {
                return Self::open_files(path, vec![single]);
            }
            return Err(Error::format(
                KIND,
                path,
                "directory has neither model.safetensors.index.json nor model.safetensors",
            ));
        }
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(path);
        }
        let root = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::open_files(&root, vec![path.to_path_buf()])
    }

    fn open_index(index: &Path) -> Result<Self> {
        let root = index.parent().unwrap_or(Path::new(".")).to_path_buf();
        let len = std::fs::metadata(index)
            .map_err(|e| Error::io(index, "stat", 0, 0, e))?
            .len();
        if len > MAX_INDEX_BYTES {
            return Err(Error::format(
                KIND,
                index,
                format!("index of {len} bytes exceeds the limit of {MAX_INDEX_BYTES}"),
            ));
        }
        let text = std::fs::read(index).map_err(|e| Error::io(index, "read", 0, len, e))?;
        let v: Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(KIND, index, format!("index is not JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(KIND, index, "index has no 'weight_map' object"))?;
        let mut shard_names: Vec<String> = Vec::new();
        let mut expected: HashMap<String, String> = HashMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(
                    KIND,
                    index,
                    format!("weight_map entry '{tensor}' is not a file name"),
                )
            })?;
            if !shard_names.iter().any(|s| s == shard) {
                shard_names.push(shard.to_string());
            }
            expected.insert(tensor.clone(), shard.to_string());
        }
        shard_names.sort();
        let files = shard_names
            .iter()
            .map(|s| contained_path(&root, s, index))
            .collect::<Result<Vec<_>>>()?;
        let view = Self::open_files(&root, files)?;
        for (tensor, shard) in &expected {
            let loc = view.tensors.get(tensor).ok_or_else(|| {
                Error::format(
                    KIND,
                    index,
                    format!("index maps '{tensor}' to {shard}, which does not contain it"),
                )
            })?;
            if view.files[loc.file] != root.join(shard) {
                return Err(Error::format(
                    KIND,
                    index,
                    format!("index maps '{tensor}' to {shard}, but it is in another shard"),
                ));
            }
        }
        Ok(view)
    }

    fn open_files(root: &Path, files: Vec<PathBuf>) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut file_lens = Vec::with_capacity(files.len());
        for (fi, path) in files.iter().enumerate() {
            let (len, entries, meta) = parse_file(path, fi)?;
            file_lens.push(len);
            for (name, loc) in entries {
                if tensors.insert(name.clone(), loc).is_some() {
                    return Err(Error::format(
                        KIND,
                        path,
                        format!("tensor '{name}' appears in more than one file"),
                    ));
                }
            }
            metadata.extend(meta);
        }
        Ok(SafetensorsView {
            root: root.to_path_buf(),
            files,
            file_lens,
            tensors,
            metadata,
        })
    }

    /// The checkpoint directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The data files, in index order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorLocation> {
        &self.tensors
    }

    /// The `__metadata__` entries of all files.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Read layout for a unit made of the tensors `names`.
    ///
    /// Tensors of one file that lie within 1 MiB of each other are read as one extent,
    /// widened to 4 KiB bounds so that O_DIRECT needs no bounce buffer in the middle.
    pub fn layout(&self, unit: &str, names: &[String]) -> Result<UnitLayout> {
        let mut locs: Vec<(&String, &TensorLocation)> = Vec::with_capacity(names.len());
        for n in names {
            let loc = self.tensors.get(n).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unit '{unit}': tensor '{n}' is not in the checkpoint at {}",
                    self.root.display()
                ))
            })?;
            locs.push((n, loc));
        }
        locs.sort_by_key(|(_, l)| (l.file, l.offset));
        let mut extents: Vec<Extent> = Vec::new();
        let mut tensors = Vec::with_capacity(locs.len());
        let mut dest_end = 0u64;
        for (name, loc) in locs {
            let end = loc.offset + loc.nbytes;
            let mergeable = extents.last().is_some_and(|e: &Extent| {
                e.file == loc.file
                    && loc.offset <= e.file_offset + e.len + MERGE_GAP
                    && loc.offset >= e.file_offset
            });
            if mergeable {
                let e = extents.last_mut().expect("checked");
                let new_end = align_up(end, BLOCK)
                    .min(self.file_lens[loc.file])
                    .max(e.file_offset + e.len);
                e.len = new_end - e.file_offset;
                dest_end = e.dest_offset + e.len;
            } else {
                let start = align_down(loc.offset, BLOCK);
                let stop = align_up(end, BLOCK).min(self.file_lens[loc.file]);
                let dest_offset = align_up(dest_end, BLOCK);
                extents.push(Extent {
                    file: loc.file,
                    file_offset: start,
                    len: stop - start,
                    dest_offset,
                });
                dest_end = dest_offset + (stop - start);
            }
            let e = extents.last().expect("pushed");
            tensors.push(TensorSlot {
                name: name.clone(),
                dtype: loc.dtype,
                shape: loc.shape.clone(),
                offset: e.dest_offset + (loc.offset - e.file_offset),
                nbytes: loc.nbytes,
                digest: None,
            });
        }
        Ok(UnitLayout {
            name: unit.to_string(),
            files: self.files.clone(),
            extents,
            chunks: Vec::new(),
            buffer_len: align_up(dest_end, BLOCK),
            tensors,
            checksum: None,
        })
    }
}

/// Resolve a shard name from an index, refusing anything that leads outside `root`.
fn contained_path(root: &Path, name: &str, index: &Path) -> Result<PathBuf> {
    let p = Path::new(name);
    let plain = p.components().count() == 1
        && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
    if !plain {
        return Err(Error::format(
            KIND,
            index,
            format!("shard name '{name}' is not a plain file name inside the checkpoint directory"),
        ));
    }
    let full = root.join(p);
    // A Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`) holds symlinks to
    // `../../blobs/<hash>`: a shard may resolve inside the snapshot, or inside that cache
    // repository's blobs/ directory; nothing else outside the snapshot is allowed.
    let canon_root = root
        .canonicalize()
        .map_err(|e| Error::io(root, "canonicalize", 0, 0, e))?;
    let cache_blobs = canon_root
        .parent()
        .filter(|p| p.file_name().is_some_and(|n| n == "snapshots"))
        .and_then(Path::parent)
        .filter(|repo| {
            repo.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("models--") || n.starts_with("datasets--"))
        })
        .map(|repo| repo.join("blobs"))
        .filter(|b| b.is_dir());
    let canon = full
        .canonicalize()
        .map_err(|e| Error::io(&full, "open", 0, 0, e))?;
    let in_blobs = cache_blobs.as_ref().is_some_and(|b| canon.starts_with(b));
    if !canon.starts_with(&canon_root) && !in_blobs {
        return Err(Error::format(
            KIND,
            index,
            format!(
                "shard '{name}' resolves to {}, outside the checkpoint directory",
                canon.display()
            ),
        ));
    }
    Ok(full)
}

type Parsed = (u64, Vec<(String, TensorLocation)>, BTreeMap<String, String>);

fn parse_file(path: &Path, file: usize) -> Result<Parsed> {
    let f = open_regular(path, KIND)?;
    let file_len = f
        .metadata()
        .map_err(|e| Error::io(path, "stat", 0, 0, e))?
        .len();
    let mut head = [0u8; 8];
    if read_full(&f, path, 0, &mut head)? != 8 {
        return Err(Error::format(
            KIND,
            path,
            format!("file is {file_len} bytes, too short for the 8-byte header length"),
        ));
    }
    let n = u64::from_le_bytes(head);
    if n > MAX_HEADER_BYTES || n.checked_add(8).is_none_or(|e| e > file_len) {
        return Err(Error::format(KIND, path, format!("header length {n} is larger than the limit ({MAX_HEADER_BYTES}) or the file ({file_len} bytes)")));
    }
    let mut json = vec![0u8; n as usize];
    read_full(&f, path, 8, &mut json)?;
    parse_header(path, file, file_len, &json)
}

/// Parse and validate one safetensors header (the JSON after the 8-byte length).
pub(crate) fn parse_header(path: &Path, file: usize, file_len: u64, json: &[u8]) -> Result<Parsed> {
    let bad = |reason: String| Error::format(KIND, path, reason);
    let data_start = 8 + json.len() as u64;
    let v: Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("header is not a JSON object".into()))?;
    let mut out = Vec::with_capacity(obj.len());
    let mut meta = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            // The format allows a string-to-string map here, and nothing else.
            let m = entry
                .as_object()
                .ok_or_else(|| bad("__metadata__ is not a JSON object".into()))?;
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or_else(|| bad(format!("__metadata__ entry '{k}' is {v}, not a string")))?;
                meta.insert(k.clone(), v.to_string());
            }
            continue;
        }
        let dtype: DType = entry
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad(format!("tensor '{name}' has no dtype")))?
            .parse()
            .map_err(|e| bad(format!("tensor '{name}': {e}")))?;
        let shape: Vec<u64> = entry
            .get("shape")
            .and_then(Value::as_array)
            .filter(|a| a.len() <= super::format::MAX_DIMS)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid shape")))?;
        let offs: Vec<u64> = entry
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_u64).collect())
            .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| bad(format!("tensor '{name}' has no valid data_offsets")))?;
        let nbytes = offs[1] - offs[0];
        if dtype.nbytes(&shape) != Some(nbytes) {
            return Err(bad(format!(
                "tensor '{name}': {dtype} of shape {shape:?} does not take {nbytes} bytes"
            )));
        }
        let offset = data_start
            .checked_add(offs[0])
            .ok_or_else(|| bad(format!("tensor '{name}' offset overflows")))?;
        // Checked: hostile offsets near 2^64 must not wrap around to a small end.
        if offset.checked_add(nbytes).is_none_or(|end| end > file_len) {
            return Err(bad(format!(
                "tensor '{name}' spans {offset}+{nbytes} bytes, past the end of the {file_len}-byte file"
            )));
        }
        out.push((
            name.clone(),
            TensorLocation {
                file,
                offset,
                nbytes,
                dtype,
                shape,
            },
        ));
    }
    let mut spans: Vec<(u64, u64, &str)> = out
        .iter()
        .map(|(n, l)| (l.offset, l.offset + l.nbytes, n.as_str()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!(
                "tensors '{}' and '{}' overlap",
                w[0].2, w[1].2
            )));
        }
    }
    Ok((file_len, out, meta))
}
