//! Helpers shared by the integration tests: deterministic data, store construction, engine
//! reads into aligned buffers, and raw access to a store's header and manifest.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use tensorstream_core::io::{AlignedBuf, MmapBackend, PreadBackend, ReadBackend};
use tensorstream_core::store::{DType, StoreWriter, UnitLayout};
use tensorstream_core::{Engine, EngineConfig, Priority, Result};

/// Every test binary refuses single allocations over 256 MiB: a hostile size that slipped
/// through validation would otherwise often "succeed" (overcommit, lazily zeroed pages) and
/// go unnoticed. A refused allocation aborts the test binary, loudly.
struct LimitedAlloc;

const ALLOC_LIMIT: usize = 256 << 20;

// SAFETY: forwards to the system allocator, refusing (null) only oversized requests, which
// GlobalAlloc permits.
unsafe impl std::alloc::GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if layout.size() > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        if new > ALLOC_LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

/// Deterministic pseudo-random bytes (xorshift64*), different for every seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// One tensor to write: name, dtype, shape and its bytes.
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

impl TensorData {
    pub fn new(name: &str, dtype: DType, shape: &[u64], seed: u64) -> Self {
        let n = dtype.nbytes(shape).expect("test shapes fit") as usize;
        TensorData {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data: bytes(seed, n),
        }
    }
}

/// One unit to write.
#[derive(Debug, Clone)]
pub struct UnitData {
    pub name: String,
    pub tensors: Vec<TensorData>,
}

/// Write `units` as a store at `path`.
pub fn write_store(path: &Path, fingerprint: &str, units: &[UnitData]) -> Result<PathBuf> {
    let mut w = StoreWriter::create(path, fingerprint)?;
    for u in units {
        w.begin_unit(&u.name)?;
        for t in &u.tensors {
            w.add_tensor(&t.name, t.dtype, &t.shape, &t.data)?;
        }
        w.end_unit()?;
    }
    w.finish()
}

/// A small store of three units, the middle one spanning several 4 KiB blocks.
pub fn small_units() -> Vec<UnitData> {
    vec![
        UnitData {
            name: "layers.0".into(),
            tensors: vec![
                TensorData::new("w", DType::F32, &[5, 7], 1),
                TensorData::new("b", DType::U8, &[3], 2),
            ],
        },
        UnitData {
            name: "layers.1".into(),
            tensors: vec![
                TensorData::new("w", DType::BF16, &[33, 65], 3),
                TensorData::new("b", DType::I64, &[9], 4),
                TensorData::new("z", DType::F16, &[0, 4], 5),
            ],
        },
        UnitData {
            name: "layers.2".into(),
            tensors: vec![TensorData::new("w", DType::F64, &[3, 3], 6)],
        },
    ]
}

/// The two backends every read is checked with.
pub fn backends() -> Vec<(&'static str, Arc<dyn ReadBackend>)> {
    vec![
        ("mmap", Arc::new(MmapBackend::new()) as Arc<dyn ReadBackend>),
        ("pread", Arc::new(PreadBackend::new(true))),
    ]
}

/// An engine over `backend` with 4 MiB chunks.
pub fn engine(backend: Arc<dyn ReadBackend>, threads: usize) -> Engine {
    Engine::new(
        backend,
        EngineConfig {
            num_threads: threads,
            chunk_bytes: 4 << 20,
        },
    )
    .expect("engine starts")
}

/// Read `layout` through `engine` into a fresh aligned buffer.
pub fn read_unit(engine: &Engine, layout: &UnitLayout) -> Result<AlignedBuf> {
    let mut buf = AlignedBuf::new(layout.buffer_len as usize);
    // SAFETY: buf outlives the wait below and nobody else touches it meanwhile.
    let ticket = unsafe { engine.submit(layout, buf.as_mut_ptr(), buf.len(), Priority::Demand) }?;
    engine.wait(&ticket)?;
    Ok(buf)
}

/// Layout of a store file, as far as the tests need it.
pub const HEADER_LEN: usize = 64;

/// A store split into its data part (header and units) and its manifest.
pub struct RawStore {
    pub data: Vec<u8>,
    pub manifest: serde_json::Value,
}

impl RawStore {
    pub fn load(path: &Path) -> RawStore {
        let file = std::fs::read(path).expect("read store");
        let off = u64::from_le_bytes(file[16..24].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(file[24..32].try_into().unwrap()) as usize;
        RawStore {
            data: file[..off].to_vec(),
            manifest: serde_json::from_slice(&file[off..off + len]).expect("manifest JSON"),
        }
    }

    /// Write the store back with `json` as its manifest and a consistent header.
    pub fn write_json(&self, path: &Path, json: &[u8]) {
        self.write_with(path, json, |_| {});
    }

    /// As `write_json`, then let `patch` modify the header.
    pub fn write_with(&self, path: &Path, json: &[u8], patch: impl FnOnce(&mut [u8])) {
        let mut out = self.data.clone();
        out.extend_from_slice(json);
        let file_len = out.len() as u64;
        let h = &mut out[..HEADER_LEN];
        h[16..24].copy_from_slice(&(self.data.len() as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
        h[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(json).to_le_bytes());
        h[40..48].copy_from_slice(&file_len.to_le_bytes());
        patch(h);
        std::fs::write(path, out).expect("write store");
    }

    /// Write the store back with its manifest modified by `edit`.
    pub fn write_edited(&self, path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let mut m = self.manifest.clone();
        edit(&mut m);
        self.write_json(path, &serde_json::to_vec(&m).unwrap());
    }
}

/// A proptest runner with `cases` cases and no failure-persistence files.
pub fn runner(cases: u32) -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    })
}
