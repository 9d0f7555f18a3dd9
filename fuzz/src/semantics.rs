//! The `store_semantics` fuzz target's body, shared with its replay test
//! (`crates/tensorstream-core/tests/fuzz_regressions.rs` includes this file by path, so it
//! uses nothing but `tensorstream_core`, `serde_json`, `memmap2` and `xxhash_rust`).
//!
//! The input drives a generator instead of being the file: it picks the units, tensors,
//! dtypes, shapes and codec of a valid store written by `StoreWriter`, then a list of
//! hostile manifest edits (names swapped or duplicated, dtypes relabelled, shapes, sizes or
//! offsets changed, tensors overlapping or out of range, entries reordered or dropped,
//! digests and checksums changed, removed or malformed, the minor version changed). The
//! edited manifest is written back with a correct header (manifest checksum recomputed), so
//! every execution reaches `Store::open` with a structurally valid file. Whatever it
//! accepts, every unit is read through the engine into a buffer (and faulted in from a
//! mapping): a read either fails with a typed error or gives bytes that match the unit's
//! checksum and every digest of its tensors.

use serde_json::{json, Value};
use std::path::Path;
use tensorstream_core::io::AlignedBuf;
use tensorstream_core::store::{chunked_checksum, DType, Store, StoreWriter, UnitLayout};
use tensorstream_core::{Engine, Error, Priority};

/// Reads bytes off the input; zeros once it is exhausted.
struct Input<'a> {
    data: &'a [u8],
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| (acc << 8) | self.u8() as u64)
    }
    fn below(&mut self, n: usize) -> usize {
        self.u8() as usize % n.max(1)
    }
    fn done(&self) -> bool {
        self.data.is_empty()
    }
}

/// Deterministic bytes for a tensor: a pseudo-random (or compressible) block of at most
/// 4 KiB, repeated, so that a big tensor costs little to make.
fn fill(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let block = make_block(seed, len.min(4096), compressible);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let take = block.len().min(len - out.len());
        out.extend_from_slice(&block[..take]);
    }
    // The repeats differ from each other in their first byte.
    for (k, i) in (0..len).step_by(4096).enumerate() {
        out[i] = out[i].wrapping_add(k as u8);
    }
    out
}

fn make_block(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            if compressible {
                return ((i as u64).wrapping_mul(seed) % 13) as u8;
            }
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Hostile values for a number field.
fn number(inp: &mut Input<'_>, current: u64) -> Value {
    let v = match inp.below(10) {
        0 => 0,
        1 => current.wrapping_add(1 + inp.below(255) as u64),
        2 => current.wrapping_sub(1 + inp.below(255) as u64),
        3 => current.wrapping_add(64 * (1 + inp.below(8) as u64)),
        4 => current.wrapping_sub(64 * (1 + inp.below(8) as u64)),
        5 => u64::MAX - inp.below(4) as u64,
        6 => 1 << (inp.below(64)),
        7 => current.wrapping_add(4096),
        8 => inp.u16() as u64,
        _ => inp.u64(),
    };
    json!(v)
}

/// Apply one hostile edit to the manifest, chosen by the input.
fn edit(m: &mut Value, inp: &mut Input<'_>) {
    let n_units = m["units"].as_array().map_or(0, Vec::len);
    if n_units == 0 {
        return;
    }
    let u = inp.below(n_units);
    let op = inp.u8();
    if op % 32 >= 28 {
        // Manifest-level and unit-level edits, picked by the op's top three bits.
        match op / 32 {
            0 => {
                let v = inp.below(3);
                m["minor_version"] = json!(v);
            }
            1 => {
                m.as_object_mut().map(|o| o.remove("minor_version"));
            }
            2 => {
                let v = inp.u64();
                m["units"][u]["checksum"] = json!(format!("{v:016x}"));
            }
            3 if n_units > 1 => {
                let w = (u + 1 + inp.below(n_units - 1)) % n_units;
                let (a, b) = (m["units"][u]["name"].take(), m["units"][w]["name"].take());
                m["units"][u]["name"] = b;
                m["units"][w]["name"] = a;
            }
            4 if n_units > 1 => {
                // Whole tensor lists swapped between units.
                let w = (u + 1 + inp.below(n_units - 1)) % n_units;
                let (a, b) = (
                    m["units"][u]["tensors"].take(),
                    m["units"][w]["tensors"].take(),
                );
                m["units"][u]["tensors"] = b;
                m["units"][w]["tensors"] = a;
            }
            5 => {
                let cur = m["units"][u]["length"].as_u64().unwrap_or(0);
                m["units"][u]["length"] = number(inp, cur);
            }
            _ => {}
        }
        return;
    }
    let Some(ts) = m["units"][u]["tensors"].as_array_mut() else {
        return;
    };
    let n = ts.len();
    if n == 0 {
        return;
    }
    let a = inp.below(n);
    let b = inp.below(n);
    let dtypes = DType::ALL;
    match op % 28 {
        // Names swapped, with or without their digests, or duplicated.
        0 | 1 => {
            let (x, y) = (ts[a]["name"].take(), ts[b]["name"].take());
            ts[a]["name"] = y;
            ts[b]["name"] = x;
            if op % 28 == 1 {
                let (x, y) = (ts[a]["digest"].take(), ts[b]["digest"].take());
                ts[a]["digest"] = y;
                ts[b]["digest"] = x;
            }
        }
        2 => ts[a]["name"] = ts[b]["name"].clone(),
        // Dtypes relabelled: of the same size (nbytes stays consistent) or any.
        3 | 4 => {
            let cur: Option<DType> = ts[a]["dtype"].as_str().and_then(|s| s.parse().ok());
            let pick = dtypes[inp.below(dtypes.len())];
            let same = dtypes
                .iter()
                .copied()
                .filter(|d| cur.is_some_and(|c| d.size() == c.size()))
                .nth(inp.below(4));
            let d = if op % 28 == 3 {
                same.unwrap_or(pick)
            } else {
                pick
            };
            ts[a]["dtype"] = json!(d.name());
        }
        5 => ts[a]["dtype"] = json!(["F33", "", "f32", "BF16 "][inp.below(4)]),
        // Shapes inconsistent with nbytes, or consistent with another dtype.
        6 => {
            let dims: Vec<u64> = (0..inp.below(4)).map(|_| inp.below(40) as u64).collect();
            ts[a]["shape"] = json!(dims);
        }
        7 => {
            let nb = ts[a]["nbytes"].as_u64().unwrap_or(0);
            ts[a]["shape"] = json!([nb]);
            ts[a]["dtype"] = json!("U8");
        }
        8 => {
            let nb = ts[a]["nbytes"].as_u64().unwrap_or(0);
            ts[a]["shape"] = json!([nb / 2]);
            ts[a]["dtype"] = json!("BF16");
        }
        9 => ts[a]["shape"] = json!([u64::MAX, 2]),
        // Sizes and offsets: overlapping, unaligned, out of range, wrapping.
        10 | 11 => {
            let cur = ts[a]["nbytes"].as_u64().unwrap_or(0);
            ts[a]["nbytes"] = number(inp, cur);
        }
        12..=14 => {
            let cur = ts[a]["offset"].as_u64().unwrap_or(0);
            ts[a]["offset"] = number(inp, cur);
        }
        15 => ts[a]["offset"] = ts[b]["offset"].clone(),
        // Offsets swapped (with their names and digests: a consistent swap, out of order).
        16 => {
            let (x, y) = (ts[a]["offset"].take(), ts[b]["offset"].take());
            ts[a]["offset"] = y;
            ts[b]["offset"] = x;
        }
        // Entries reordered, duplicated, dropped.
        17 => ts.swap(a, b),
        18 => {
            let t = ts[a].clone();
            ts.insert(b, t);
        }
        19 => {
            ts.remove(a);
        }
        // Digests wrong, removed, malformed, copied from another tensor.
        20 | 21 => {
            let v = inp.u64();
            ts[a]["digest"] = json!(format!("{v:016x}"));
        }
        22 => {
            ts[a].as_object_mut().map(|o| o.remove("digest"));
        }
        23 => {
            ts[a]["digest"] = [
                json!("0123456789ABCDEF"),
                json!("+123456789abcdef"),
                json!("abc"),
                json!(""),
                json!(null),
                json!(7),
                json!("0x23456789abcdef"),
                json!("0123456789abcdef0"),
            ][inp.below(8)]
            .clone()
        }
        24 => ts[a]["digest"] = ts[b]["digest"].clone(),
        // Other keys: unknown ones, wrong types.
        25 => ts[a]["extra"] = json!(inp.u8()),
        26 => ts[a]["nbytes"] = json!(-1),
        _ => {
            // Names and dtypes of two tensors swapped together.
            for k in ["name", "dtype"] {
                let (x, y) = (ts[a][k].take(), ts[b][k].take());
                ts[a][k] = y;
                ts[b][k] = x;
            }
        }
    }
}

/// Write the store the input describes to `path`, then the manifest edited by the rest of
/// the input with a correct header. Returns false when the input describes no store.
fn build(path: &Path, inp: &mut Input<'_>) -> bool {
    let flags = inp.u8();
    let Ok(mut w) = StoreWriter::create(path, "fuzz") else {
        return false;
    };
    if flags & 1 != 0
        && w.set_compression(Some(1), 1, tensorstream_core::codec::CodeFamily::Bytegroup)
            .is_err()
    {
        return false;
    }
    let n_units = 1 + inp.below(3);
    for ui in 0..n_units {
        if w.begin_unit(&format!("u{ui}")).is_err() {
            return false;
        }
        let n_tensors = 1 + inp.below(4);
        for ti in 0..n_tensors {
            let dtype = DType::ALL[inp.below(DType::ALL.len())];
            let mut shape: Vec<u64> = (0..inp.below(3))
                .map(|_| 1 + inp.below(24) as u64)
                .collect();
            // Now and then (flags 2, 16, 32 and 64, one input in 16: writing, coding and
            // reading 4 MiB costs a hundred small inputs) a tensor over two checksum
            // chunks, read by several jobs.
            if flags & 0x72 == 0x72 && ui == 0 && ti == 0 {
                shape = vec![(4 << 20) / dtype.size() + inp.u16() as u64];
            }
            let nbytes = dtype.nbytes(&shape).unwrap_or(0) as usize;
            let data = fill(inp.u8() as u64 + 1, nbytes, flags & 4 != 0);
            // Names repeat across units, and within one if the input says so (refused).
            let name = format!("t{}", if flags & 8 != 0 { ti % 2 } else { ti });
            if w.add_tensor(&name, dtype, &shape, &data).is_err() {
                return false;
            }
        }
        if w.end_unit().is_err() {
            return false;
        }
    }
    if w.finish().is_err() {
        return false;
    }
    let Ok(file) = std::fs::read(path) else {
        return false;
    };
    let off = u64::from_le_bytes(file[16..24].try_into().expect("8 bytes")) as usize;
    let Ok(mut m) = serde_json::from_slice::<Value>(&file[off..]) else {
        return false;
    };
    let mut edits = 0;
    while !inp.done() && edits < 16 {
        edit(&mut m, inp);
        edits += 1;
    }
    let json = serde_json::to_vec(&m).expect("a Value serializes");
    let mut out = file[..off].to_vec();
    out.extend_from_slice(&json);
    let file_len = out.len() as u64;
    out[24..32].copy_from_slice(&(json.len() as u64).to_le_bytes());
    out[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&json).to_le_bytes());
    out[40..48].copy_from_slice(&file_len.to_le_bytes());
    std::fs::write(path, out).is_ok()
}

fn expect_typed(e: &Error) {
    match e {
        Error::Format { .. } | Error::Io { .. } | Error::Checksum { .. } => {}
        other => panic!("unexpected error kind for a hostile store: {other:?}"),
    }
}

/// A read that succeeded must have given bytes that the manifest vouches for: the unit's
/// checksum and every tensor's digest.
fn check_bytes(layout: &UnitLayout, buf: &[u8]) {
    if let Some(c) = layout.checksum {
        assert_eq!(
            chunked_checksum(&buf[..c.covered as usize]),
            c.value,
            "unit '{}' read without error but its checksum does not match",
            layout.name
        );
    }
    for t in &layout.tensors {
        if let Some(d) = t.digest {
            let (lo, hi) = (t.offset as usize, (t.offset + t.nbytes) as usize);
            assert_eq!(
                chunked_checksum(&buf[lo..hi]),
                d,
                "unit '{}' read without error but tensor '{}' does not match its digest",
                layout.name,
                t.name
            );
        }
    }
}

/// Run one input: build the store at `path`, open it, read every unit through `engine`
/// into a buffer, and fault in every raw unit from a mapping of the file. The engine's
/// backend is told to close its files first (it would read the previous input's file).
pub fn run(engine: &Engine, path: &Path, data: &[u8]) {
    let mut inp = Input { data };
    if !build(path, &mut inp) {
        return;
    }
    // The backend keeps files open by path: the store just written is a new file there.
    engine.backend().close_all();
    let store = match Store::open(path) {
        Ok(s) => s,
        Err(e) => return expect_typed(&e),
    };
    match store.manifest_fingerprint("fuzz.Model") {
        Ok(f) => assert_eq!(f.len(), 32),
        Err(e) => expect_typed(&e),
    }
    let file = std::fs::File::open(path).expect("open the store just opened");
    // SAFETY: the file is this process's scratch file; nobody changes it while mapped.
    let mapping = unsafe { memmap2::Mmap::map(&file) }.ok();
    for i in 0..store.manifest().units.len() {
        let layout = store.layout(i).expect("layout of a listed unit");
        let mut buf = AlignedBuf::new(layout.buffer_len as usize);
        // SAFETY: buf outlives the wait and nobody else touches it meanwhile.
        let r = unsafe { engine.submit(&layout, buf.as_mut_ptr(), buf.len(), Priority::Demand) }
            .and_then(|t| engine.wait(&t));
        match r {
            Ok(()) => check_bytes(&layout, &buf),
            Err(e) => expect_typed(&e),
        }
        let rec = &store.manifest().units[i];
        if let Some(m) = &mapping {
            if rec.is_coded() || rec.offset + rec.padded_length > m.len() as u64 {
                continue;
            }
            // SAFETY: the mapping covers the unit's padded bytes (checked above) and lives
            // until the wait returns.
            let ptr = unsafe { m.as_ptr().add(rec.offset as usize) };
            // SAFETY: as above.
            let r = unsafe { engine.submit_populate(&layout, ptr, Priority::Demand) }
                .and_then(|t| engine.wait(&t));
            match r {
                Ok(()) => {
                    // SAFETY: the unit's buffer_len bytes lie inside the mapping.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(ptr, layout.buffer_len as usize) };
                    check_bytes(&layout, bytes);
                }
                Err(e) => expect_typed(&e),
            }
        }
    }
}
