//! Store writer, store reader and safetensors view.

use crate::errors::IntoPyResult;
use crate::types::{CHECKPOINT_TENSOR, CHUNK, TENSOR, UNIT, UNIT_CODEC};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::time::Instant;
use tensorstream_core::codec;
use tensorstream_core::store::{self, DType, SafetensorsView, Store, StoreWriter, UnitLayout};

/// The read layout of one unit: where its bytes are and where each tensor lands.
#[pyclass(name = "Layout", module = "tensorstream._core", frozen)]
#[derive(Clone)]
pub struct PyLayout {
    pub inner: UnitLayout,
}

#[pymethods]
impl PyLayout {
    /// Unit name.
    #[getter]
    fn name(&self) -> &str {
        &self.inner.name
    }
    /// Bytes the destination buffer must have.
    #[getter]
    fn buffer_len(&self) -> u64 {
        self.inner.buffer_len
    }
    /// Bytes read from files to load this unit (stored bytes, for a coded unit).
    #[getter]
    fn bytes_to_read(&self) -> u64 {
        self.inner.bytes_to_read()
    }
    /// Bytes the unit has once read (and decoded) into its buffer.
    #[getter]
    fn raw_bytes(&self) -> u64 {
        self.inner.raw_bytes()
    }
    /// True when the unit is stored coded: it is decoded on read and cannot be mapped in place.
    #[getter]
    fn coded(&self) -> bool {
        self.inner.is_coded()
    }
    /// TensorEntry(name, dtype, shape, offset, nbytes, digest) of each tensor, offsets in the
    /// buffer; digest: 16 hex digits of the tensor's checksum, or None where the source
    /// records none (a checkpoint, a store written before tensor digests).
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.inner
            .tensors
            .iter()
            .map(|t| {
                let entry = (
                    t.name.clone(),
                    t.dtype.name().to_string(),
                    t.shape.clone(),
                    t.offset,
                    t.nbytes,
                    t.digest.map(|d| format!("{d:016x}")),
                );
                TENSOR.make(py, entry)
            })
            .collect()
    }
    /// A copy of this layout without checksum verification (for data already verified).
    fn without_checksum(&self) -> PyLayout {
        let mut inner = self.inner.clone();
        inner.checksum = None;
        PyLayout { inner }
    }
    /// The layout that reads only the byte ranges `ranges` ((offset, length) of the
    /// buffer) to where they lie in it, without checksum (checksums cover whole units);
    /// ValueError where a range is coded or lies outside the unit's bytes.
    fn select(&self, ranges: Vec<(u64, u64)>) -> PyResult<PyLayout> {
        match self.inner.select(&ranges) {
            Some(inner) => Ok(PyLayout { inner }),
            None => Err(PyValueError::new_err(format!(
                "{}: the ranges {ranges:?} are not all stored raw within the unit",
                self.inner.name
            ))),
        }
    }
}

fn parse_dtype(s: &str) -> PyResult<DType> {
    s.parse::<DType>().map_err(PyValueError::new_err)
}

/// Writes a store atomically (temporary file, fsync, rename).
#[pyclass(name = "StoreWriter", module = "tensorstream._core")]
pub struct PyStoreWriter {
    inner: Option<StoreWriter>,
}

impl PyStoreWriter {
    fn w(&mut self) -> PyResult<&mut StoreWriter> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("store writer already finished or aborted"))
    }
}

#[pymethods]
impl PyStoreWriter {
    #[new]
    fn new(path: &str, fingerprint: &str) -> PyResult<Self> {
        Ok(PyStoreWriter {
            inner: Some(StoreWriter::create(path, fingerprint).py()?),
        })
    }

    fn set_metadata(&mut self, key: &str, value: &str) -> PyResult<()> {
        self.w()?.set_metadata(key, value);
        Ok(())
    }

    /// Code the units begun from now on in coded chunks with `code`'s code ("bytegroup":
    /// Huffman/zstd planes decoded on the CPU, zstd `level` for the planes zstd codes;
    /// "table": the GPU-decodable table code) on `threads` threads (0: the machine's
    /// cores, at most 8), or store them raw with `level=None`.
    #[pyo3(signature = (level, threads=0, code="bytegroup"))]
    fn set_compression(&mut self, level: Option<i32>, threads: usize, code: &str) -> PyResult<()> {
        let family = code_family(code)?;
        self.w()?.set_compression(level, threads, family).py()
    }

    /// Measure the codec on `nbytes` of memory at `ptr` (elements `width` bytes wide):
    /// code it at `level` on `threads` threads, then decode it with each thread count of
    /// `decode_threads`, checking the bytes. Returns raw and stored sizes and seconds.
    ///
    /// The caller guarantees `ptr` is valid for `nbytes` reads during the call.
    #[staticmethod]
    #[pyo3(signature = (ptr, nbytes, width, level, threads, decode_threads, code="bytegroup"))]
    #[allow(clippy::too_many_arguments)]
    fn codec_benchmark<'py>(
        py: Python<'py>,
        ptr: usize,
        nbytes: usize,
        width: u64,
        level: i32,
        threads: usize,
        decode_threads: Vec<usize>,
        code: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let family = code_family(code)?;
        if ptr == 0 || nbytes == 0 {
            return Err(PyValueError::new_err(
                "codec_benchmark needs a non-empty buffer",
            ));
        }
        check_span(ptr, nbytes)?;
        let (stored, coded_chunks, chunks, encode_s, decode_s) = py
            .detach(move || -> Result<_, String> {
                // SAFETY: the caller's contract: ptr is valid for nbytes reads during the call.
                let raw = unsafe { std::slice::from_raw_parts(ptr as *const u8, nbytes) };
                let t = Instant::now();
                let coded = codec::encode_parallel(family, raw, width, level, threads)
                    .map_err(|e| e.to_string())?;
                let encode_s = t.elapsed().as_secs_f64();
                let stored: usize = coded.iter().map(|c| c.1.len()).sum();
                let coded_chunks = coded
                    .iter()
                    .filter(|c| c.0 != codec::ChunkMode::Raw)
                    .count();
                // Touched before the clock starts: page faults are not decoding.
                let mut out = vec![1u8; nbytes];
                let mut decode_s = Vec::new();
                for &n in &decode_threads {
                    let t = Instant::now();
                    codec::decode_parallel(&coded, &mut out, n)?;
                    decode_s.push((n, t.elapsed().as_secs_f64()));
                    if out[..] != raw[..] {
                        return Err("decoded bytes differ from the input".into());
                    }
                }
                Ok((stored, coded_chunks, coded.len(), encode_s, decode_s))
            })
            .map_err(PyValueError::new_err)?;
        let d = PyDict::new(py);
        d.set_item("raw_bytes", nbytes)?;
        d.set_item("stored_bytes", stored)?;
        d.set_item("chunks", chunks)?;
        d.set_item("coded_chunks", coded_chunks)?;
        d.set_item("encode_seconds", encode_s)?;
        d.set_item("decode_seconds", decode_s)?;
        Ok(d)
    }

    fn set_fingerprint(&mut self, fingerprint: &str) -> PyResult<()> {
        self.w()?.set_fingerprint(fingerprint);
        Ok(())
    }

    fn begin_unit(&mut self, name: &str) -> PyResult<()> {
        self.w()?.begin_unit(name).py()
    }

    /// Append a tensor from raw memory.
    ///
    /// The caller guarantees that `ptr` points to `nbytes` readable bytes that stay alive
    /// and unchanged during the call (the Python layer passes a contiguous CPU tensor it holds).
    fn add_tensor(
        &mut self,
        py: Python<'_>,
        name: &str,
        dtype: &str,
        shape: Vec<u64>,
        ptr: usize,
        nbytes: usize,
    ) -> PyResult<()> {
        let dtype = parse_dtype(dtype)?;
        if nbytes > 0 {
            check_span(ptr, nbytes)
                .map_err(|e| PyValueError::new_err(format!("tensor '{name}': {e}")))?;
        }
        let w = self.w()?;
        let addr = ptr;
        py.detach(move || {
            let data: &[u8] = if nbytes == 0 {
                &[]
            } else {
                // SAFETY: the caller's contract (documented above): ptr is valid for nbytes
                // reads for the duration of this call.
                unsafe { std::slice::from_raw_parts(addr as *const u8, nbytes) }
            };
            w.add_tensor(name, dtype, &shape, data)
        })
        .py()
    }

    fn end_unit(&mut self) -> PyResult<()> {
        self.w()?.end_unit().py()
    }

    /// Write the manifest and header, fsync and rename into place. Returns the final path.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| PyValueError::new_err("store writer already finished or aborted"))?;
        let p = py.detach(move || w.finish()).py()?;
        Ok(p.to_string_lossy().into_owned())
    }

    /// Abandon the store: the temporary file is removed and nothing appears at the target.
    fn abort(&mut self) {
        self.inner = None;
    }
}

/// A validated, read-only store.
#[pyclass(name = "Store", module = "tensorstream._core", frozen)]
pub struct PyStore {
    pub inner: Store,
}

#[pymethods]
impl PyStore {
    /// Open and validate a store; with `fingerprint`, also refuse one made for another model.
    #[new]
    #[pyo3(signature = (path, fingerprint=None))]
    fn new(py: Python<'_>, path: &str, fingerprint: Option<&str>) -> PyResult<Self> {
        let inner = py
            .detach(|| match fingerprint {
                Some(f) => Store::open_for(path, f),
                None => Store::open(path),
            })
            .py()?;
        Ok(PyStore { inner })
    }

    #[getter]
    fn path(&self) -> String {
        self.inner.path().to_string_lossy().into_owned()
    }
    #[getter]
    fn fingerprint(&self) -> &str {
        &self.inner.manifest().fingerprint
    }
    #[getter]
    fn file_len(&self) -> u64 {
        self.inner.file_len()
    }
    #[getter]
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in &self.inner.manifest().metadata {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    /// UnitEntry(name, offset, length, padded_length, codec, checksum) of each unit.
    fn units<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.inner
            .manifest()
            .units
            .iter()
            .map(|u| {
                let entry = (
                    u.name.clone(),
                    u.offset,
                    u.length,
                    u.padded_length,
                    u.codec.clone(),
                    u.checksum.clone(),
                );
                UNIT.make(py, entry)
            })
            .collect()
    }
    /// UnitCodec(name, codec, raw_length, stored_length, chunks) of each unit.
    fn unit_codecs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.inner
            .manifest()
            .units
            .iter()
            .map(|u| {
                let entry = (
                    u.name.clone(),
                    u.codec.clone(),
                    u.length,
                    u.stored_length(),
                    u.chunks.len(),
                );
                UNIT_CODEC.make(py, entry)
            })
            .collect()
    }
    /// Raw bytes of all units.
    #[getter]
    fn raw_bytes(&self) -> u64 {
        self.inner.manifest().units.iter().map(|u| u.length).sum()
    }
    /// Bytes all units occupy on disk, without padding (their raw bytes for raw units).
    #[getter]
    fn stored_bytes(&self) -> u64 {
        self.inner
            .manifest()
            .units
            .iter()
            .map(|u| u.stored_length())
            .sum()
    }
    /// Number of units stored with a codec.
    #[getter]
    fn coded_units(&self) -> usize {
        self.inner
            .manifest()
            .units
            .iter()
            .filter(|u| u.is_coded())
            .count()
    }
    /// The fingerprint recomputed from the manifest, with `tensorstream.units.fingerprint`'s
    /// formula: sha256 of "tensorstream-v1|<model_class>", then per unit "|unit:<name>" and
    /// per tensor "|<name>:<dtype>:<shape list>:<digest>", first 32 hex digits. Raises
    /// StoreCorruptedError for a store whose tensors record no digest.
    fn manifest_fingerprint(&self, model_class: &str) -> PyResult<String> {
        self.inner.manifest_fingerprint(model_class).py()
    }
    /// Index of a unit by name, or None.
    fn unit_index(&self, name: &str) -> Option<usize> {
        self.inner.unit_index(name)
    }
    /// Read layout of unit `i`.
    fn layout(&self, i: usize) -> PyResult<PyLayout> {
        Ok(PyLayout {
            inner: self.inner.layout(i).py()?,
        })
    }
    /// Read layout of unit `i`'s stored (coded) bytes as they lie in the file, verified
    /// against its stored checksum and not decoded, for a decoder of their own (the GPU);
    /// None for a raw unit or one written before stored checksums.
    fn stored_layout(&self, i: usize) -> PyResult<Option<PyLayout>> {
        Ok(self
            .inner
            .stored_layout(i)
            .py()?
            .map(|inner| PyLayout { inner }))
    }
    /// ChunkEntry(raw_offset, raw_len, stored_offset, stored_len, mode) of each coded chunk
    /// of unit `i` (empty for a raw unit).
    fn chunks<'py>(&self, py: Python<'py>, i: usize) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let units = &self.inner.manifest().units;
        let u = units.get(i).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unit index {i} out of range ({} units)",
                units.len()
            ))
        })?;
        u.chunks
            .iter()
            .map(|c| {
                let entry = (
                    c.raw_offset,
                    c.raw_len,
                    c.stored_offset,
                    c.stored_len,
                    c.mode.name(),
                );
                CHUNK.make(py, entry)
            })
            .collect()
    }
}

/// The code family called `code`: "bytegroup" or "table".
fn code_family(code: &str) -> PyResult<codec::CodeFamily> {
    codec::CodeFamily::parse(code).ok_or_else(|| {
        PyValueError::new_err(format!("unknown code '{code}' (known: bytegroup, table)"))
    })
}

/// Code `data` (any length) as the writer does, in chunks of 4 MiB of `width`-byte
/// elements with `code`'s code: (mode, stored bytes) per chunk. For tests and tools.
#[pyfunction]
#[pyo3(signature = (data, width, code="bytegroup", level=3))]
pub fn codec_encode(
    py: Python<'_>,
    data: Vec<u8>,
    width: u64,
    code: &str,
    level: i32,
) -> PyResult<Vec<(&'static str, Py<pyo3::types::PyBytes>)>> {
    let family = code_family(code)?;
    let coded = py
        .detach(move || codec::encode_all_with(family, &data, width, level))
        .py()?;
    Ok(coded
        .into_iter()
        .map(|(mode, bytes)| (mode.name(), pyo3::types::PyBytes::new(py, &bytes).unbind()))
        .collect())
}

/// Decode one chunk's stored bytes, stored with `mode` ("raw", "bg2", "tb2", ...), into
/// its `raw_len` bytes, as the I/O workers do. A chunk that does not decode raises
/// StoreCorruptedError saying why. For tests and tools.
#[pyfunction]
pub fn codec_decode(
    py: Python<'_>,
    mode: &str,
    stored: Vec<u8>,
    raw_len: usize,
) -> PyResult<Py<pyo3::types::PyBytes>> {
    let m = codec::ChunkMode::parse(mode)
        .ok_or_else(|| PyValueError::new_err(format!("unknown chunk mode '{mode}'")))?;
    // Checked before the output is allocated: a chunk never decodes to more than this.
    if raw_len as u64 > codec::CODEC_CHUNK {
        return Err(PyValueError::new_err(format!(
            "a chunk decodes to at most {} bytes, not {raw_len}",
            codec::CODEC_CHUNK
        )));
    }
    let out = py
        .detach(move || -> Result<Vec<u8>, String> {
            let mut dec = codec::Decoder::new().map_err(|e| e.to_string())?;
            let mut out = vec![0u8; raw_len];
            dec.decode(m, &stored, &mut out)?;
            Ok(out)
        })
        .map_err(|reason| {
            crate::errors::to_py(tensorstream_core::Error::Format {
                kind: "chunk",
                path: "<memory>".into(),
                reason: format!("{mode} chunk of {raw_len} raw bytes does not decode: {reason}"),
            })
        })?;
    Ok(pyo3::types::PyBytes::new(py, &out).unbind())
}

/// A read-only view of a safetensors checkpoint (file, directory or sharded index).
#[pyclass(name = "SafetensorsView", module = "tensorstream._core", frozen)]
pub struct PySafetensorsView {
    inner: SafetensorsView,
}

#[pymethods]
impl PySafetensorsView {
    #[new]
    fn new(py: Python<'_>, path: &str) -> PyResult<Self> {
        Ok(PySafetensorsView {
            inner: py.detach(|| SafetensorsView::open(path)).py()?,
        })
    }
    /// name -> CheckpointTensor(dtype, shape, file, offset, nbytes), offset absolute in the file.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, t) in self.inner.tensors() {
            let file = self.inner.files()[t.file].to_string_lossy().into_owned();
            let entry = (t.dtype.name(), t.shape.clone(), file, t.offset, t.nbytes);
            d.set_item(name, CHECKPOINT_TENSOR.make(py, entry)?)?;
        }
        Ok(d)
    }
    fn files(&self) -> Vec<String> {
        self.inner
            .files()
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }
    /// Read layout for a unit made of the named tensors.
    fn layout(&self, unit: &str, names: Vec<String>) -> PyResult<PyLayout> {
        Ok(PyLayout {
            inner: self.inner.layout(unit, &names).py()?,
        })
    }
}

/// The buffer bytes a raw unit of tensors of these sizes (in order) takes in a store, known
/// before the store is written.
#[pyfunction]
pub fn store_unit_buffer_len(tensor_nbytes: Vec<u64>) -> u64 {
    store::unit_buffer_len(&tensor_nbytes)
}

/// xxh3-based checksum of raw memory, as a store records it (for fingerprints).
///
/// The caller guarantees `ptr` is valid for `nbytes` reads during the call.
/// A null `ptr` with bytes to read, or a length no allocation can have, is refused.
#[pyfunction]
pub fn checksum(py: Python<'_>, ptr: usize, nbytes: usize) -> PyResult<u64> {
    if nbytes == 0 {
        return Ok(store::chunked_checksum(&[]));
    }
    check_span(ptr, nbytes)?;
    Ok(py.detach(move || {
        // SAFETY: the caller's contract: ptr is valid for nbytes reads during the call.
        let data = unsafe { std::slice::from_raw_parts(ptr as *const u8, nbytes) };
        store::chunked_checksum(data)
    }))
}

/// Refuse a memory span that cannot be valid: a null address, or one whose end overflows
/// the address space or exceeds what a Rust slice may span (`isize::MAX`).
fn check_span(ptr: usize, nbytes: usize) -> PyResult<()> {
    if ptr == 0 {
        return Err(PyValueError::new_err(format!(
            "null data pointer for {nbytes} bytes"
        )));
    }
    if nbytes > isize::MAX as usize || ptr.checked_add(nbytes).is_none() {
        return Err(PyValueError::new_err(format!(
            "{nbytes} bytes at {ptr:#x} is not a span of memory"
        )));
    }
    Ok(())
}
