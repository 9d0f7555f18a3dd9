//! Read throughput of the engine, unit by unit, into reused page-aligned buffers.
//!
//! ```text
//! # write a store of 16 units of 256 MiB (4 GiB) of pseudo-random data
//! cargo run --release -p tensorstream-core --example read_bench -- write bench/out/b.tstore
//! # read every unit of a store, or of a safetensors checkpoint (file, index or directory)
//! cargo run --release -p tensorstream-core --example read_bench -- read bench/out/b.tstore \
//!     --backend odirect --threads 8 --cold
//! ```
//!
//! `read` prints a human line and a machine line starting with `RESULT`, which
//! `bench/io_read.sh` parses. GB/s are 10^9 bytes per second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tensorstream_core::io::{drop_page_cache, AlignedBuf, MmapBackend, PreadBackend, ReadBackend};
use tensorstream_core::store::{DType, SafetensorsView, Store, StoreWriter, UnitLayout, MAGIC};
use tensorstream_core::{Engine, EngineConfig, Priority, Ticket};

const USAGE: &str = "usage:
  read_bench write STORE [--units N (16)] [--unit-mib M (256)] [--tensors-per-unit T (4)]
  read_bench read PATH [--backend odirect|pread|mmap (odirect)] [--threads N (4)]
                       [--chunk-mib M (8)] [--bufs B (2)] [--cold] [--no-verify]
                       [--no-tensor-digests: verify unit checksums only]
                       [--unit-mib M (256): unit size when grouping a safetensors checkpoint]
  read_bench drop-cache FILE...";

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("read_bench: {e}");
        std::process::exit(1);
    }
}

struct Args {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Args {
    fn parse() -> Self {
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut it = std::env::args().skip(1).peekable();
        while let Some(a) = it.next() {
            if let Some(name) = a.strip_prefix("--") {
                let takes_value = !matches!(name, "cold" | "no-verify" | "no-tensor-digests");
                let v = if takes_value { it.next() } else { None };
                flags.push((name.to_string(), v));
            } else {
                positional.push(a);
            }
        }
        Args { positional, flags }
    }

    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    fn get<T: std::str::FromStr>(&self, name: &str, default: T) -> AnyResult<T> {
        match self.flags.iter().rev().find(|(n, _)| n == name) {
            None => Ok(default),
            Some((_, Some(v))) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse '{v}'").into()),
            Some((_, None)) => Err(format!("--{name} needs a value").into()),
        }
    }

    fn get_str(&self, name: &str, default: &str) -> String {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
            .unwrap_or_else(|| default.to_string())
    }
}

fn run() -> AnyResult<()> {
    let args = Args::parse();
    match args.positional.first().map(String::as_str) {
        Some("write") if args.positional.len() == 2 => write(&args),
        Some("read") if args.positional.len() == 2 => read(&args),
        Some("drop-cache") => {
            for f in &args.positional[1..] {
                drop_page_cache(Path::new(f))?;
            }
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

/// Fill `buf` with cheap pseudo-random data (splitmix64), different for every seed.
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

fn write(args: &Args) -> AnyResult<()> {
    let path = PathBuf::from(&args.positional[1]);
    let units: usize = args.get("units", 16)?;
    let unit_mib: u64 = args.get("unit-mib", 256)?;
    let per_unit: u64 = args.get("tensors-per-unit", 4)?;
    let tensor_bytes = (unit_mib << 20) / per_unit;
    let elems = tensor_bytes / 2;
    let start = Instant::now();
    let mut w = StoreWriter::create(&path, "read-bench")?;
    w.set_metadata("writer", "read_bench");
    let mut data = vec![0u8; (elems * 2) as usize];
    for u in 0..units {
        w.begin_unit(&format!("model.layers.{u}"))?;
        for t in 0..per_unit {
            fill(&mut data, (u as u64) << 32 | t);
            w.add_tensor(&format!("w{t}"), DType::BF16, &[elems], &data)?;
        }
        w.end_unit()?;
    }
    w.finish()?;
    let len = std::fs::metadata(&path)?.len();
    println!(
        "wrote {} ({units} units, {:.2} GB) in {:.1} s",
        path.display(),
        len as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn is_store(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut magic, 0))
            .is_ok()
        && magic == MAGIC
}

/// The units to read: a store's units, or a checkpoint's tensors in file order, grouped
/// into units of about `unit_bytes`.
fn layouts(path: &Path, unit_bytes: u64) -> AnyResult<(Vec<UnitLayout>, Vec<PathBuf>)> {
    if is_store(path) {
        let store = Store::open(path)?;
        let layouts = (0..store.manifest().units.len())
            .map(|i| store.layout(i))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((layouts, vec![path.to_path_buf()]));
    }
    let view = SafetensorsView::open(path)?;
    let mut tensors: Vec<(&String, _)> = view.tensors().iter().collect();
    tensors.sort_by_key(|(_, l)| (l.file, l.offset));
    let mut layouts = Vec::new();
    let mut group: Vec<String> = Vec::new();
    let mut group_bytes = 0;
    for (name, loc) in tensors {
        if !group.is_empty() && group_bytes + loc.nbytes > unit_bytes {
            layouts.push(view.layout(&format!("unit{}", layouts.len()), &group)?);
            group.clear();
            group_bytes = 0;
        }
        group.push(name.clone());
        group_bytes += loc.nbytes;
    }
    if !group.is_empty() {
        layouts.push(view.layout(&format!("unit{}", layouts.len()), &group)?);
    }
    Ok((layouts, view.files().to_vec()))
}

fn read(args: &Args) -> AnyResult<()> {
    let path = PathBuf::from(&args.positional[1]);
    let backend_name = args.get_str("backend", "odirect");
    let threads: usize = args.get("threads", 4)?;
    let chunk_mib: u64 = args.get("chunk-mib", 8)?;
    let nbufs: usize = args.get("bufs", 2)?;
    let unit_mib: u64 = args.get("unit-mib", 256)?;
    let (mut layouts, files) = layouts(&path, unit_mib << 20)?;
    if args.has("no-verify") {
        for l in &mut layouts {
            l.checksum = None;
        }
    }
    if args.has("no-tensor-digests") {
        for t in layouts.iter_mut().flat_map(|l| l.tensors.iter_mut()) {
            t.digest = None;
        }
    }
    let backend: Arc<dyn ReadBackend> = match backend_name.as_str() {
        "odirect" => Arc::new(PreadBackend::new(true)),
        "pread" => Arc::new(PreadBackend::new(false)),
        "mmap" => Arc::new(MmapBackend::new()),
        other => return Err(format!("unknown backend '{other}'\n{USAGE}").into()),
    };
    let engine = Engine::new(
        backend,
        EngineConfig {
            num_threads: threads,
            chunk_bytes: chunk_mib << 20,
        },
    )?;
    let max_len = layouts.iter().map(|l| l.buffer_len).max().unwrap_or(0) as usize;
    let mut bufs: Vec<AlignedBuf> = (0..nbufs.max(1))
        .map(|_| AlignedBuf::new(max_len))
        .collect();
    for b in &mut bufs {
        // Fault the pages in now, so that the timed loop measures I/O, not page faults.
        b.fill(1);
    }
    if args.has("cold") {
        for f in &files {
            drop_page_cache(f)?;
        }
    }
    let bytes: u64 = layouts.iter().map(UnitLayout::bytes_to_read).sum();
    let mut inflight: Vec<Option<Ticket>> = (0..bufs.len()).map(|_| None).collect();
    let start = Instant::now();
    for (i, layout) in layouts.iter().enumerate() {
        let slot = i % bufs.len();
        if let Some(t) = inflight[slot].take() {
            engine.wait(&t)?;
        }
        let buf = &mut bufs[slot];
        // SAFETY: the buffer is not touched again until this ticket has been waited for
        // (above, before its slot is reused, or below).
        let t = unsafe { engine.submit(layout, buf.as_mut_ptr(), buf.len(), Priority::Demand) }?;
        inflight[slot] = Some(t);
    }
    for t in inflight.into_iter().flatten() {
        engine.wait(&t)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let gbps = bytes as f64 / secs / 1e9;
    let stats = engine.stats();
    println!(
        "{backend_name}: {} units, {:.2} GB in {secs:.2} s = {gbps:.2} GB/s ({threads} threads, {chunk_mib} MiB chunks, {} buffers{}{}); buffered fallback {} bytes",
        layouts.len(),
        bytes as f64 / 1e9,
        bufs.len(),
        if args.has("cold") { ", cold" } else { "" },
        if layouts.iter().any(|l| l.checksum.is_some()) { ", checksums verified" } else { "" },
        stats.backend.buffered_fallback_bytes
    );
    println!(
        "RESULT backend={backend_name} threads={threads} chunk_mib={chunk_mib} bytes={bytes} secs={secs:.4} gbps={gbps:.3} fallback_bytes={}",
        stats.backend.buffered_fallback_bytes
    );
    Ok(())
}
