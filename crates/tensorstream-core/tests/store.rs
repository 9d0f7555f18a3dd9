//! The store format end to end: writer, validating reader, checksums verified by the engine,
//! truncated and hostile files, and the writer's atomicity.

mod common;

use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use tensorstream_core::io::{AlignedBuf, ReadBackend};
use tensorstream_core::store::{
    align_up, chunked_checksum, unit_buffer_len, DType, Store, StoreWriter, BLOCK,
    FORMAT_MINOR_VERSION, TENSOR_ALIGN,
};
use tensorstream_core::{Engine, Error};

// ---------------------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------------------

fn dtype_strategy() -> impl Strategy<Value = DType> {
    (0..DType::ALL.len()).prop_map(|i| DType::ALL[i])
}

fn shape_strategy() -> impl Strategy<Value = Vec<u64>> {
    // Zero-sized dimensions are rare but present; scalars (no dimension) too.
    prop::collection::vec(prop_oneof![1 => Just(0u64), 8 => 1u64..24], 0..4)
}

fn units_strategy() -> impl Strategy<Value = Vec<Vec<(DType, Vec<u64>, u64)>>> {
    prop::collection::vec(
        prop::collection::vec((dtype_strategy(), shape_strategy(), any::<u64>()), 1..5),
        0..5,
    )
}

/// Write the generated units. A unit whose tensors are all zero-sized must be refused by
/// `end_unit`; the test then adds a one-byte tensor to it, which must make it acceptable.
fn write_generated(
    path: &Path,
    spec: &[Vec<(DType, Vec<u64>, u64)>],
) -> Result<Vec<UnitData>, TestCaseError> {
    let mut w = StoreWriter::create(path, "fp-roundtrip").unwrap();
    w.set_metadata("writer", "tests/store.rs");
    let mut units = Vec::new();
    for (ui, tensors) in spec.iter().enumerate() {
        let mut unit = UnitData {
            name: format!("model.layers.{ui}"),
            tensors: tensors
                .iter()
                .enumerate()
                .map(|(ti, (d, s, seed))| TensorData::new(&format!("t{ti}.weight"), *d, s, *seed))
                .collect(),
        };
        w.begin_unit(&unit.name).unwrap();
        for t in &unit.tensors {
            w.add_tensor(&t.name, t.dtype, &t.shape, &t.data).unwrap();
        }
        if unit.tensors.iter().all(|t| t.data.is_empty()) {
            let r = w.end_unit();
            prop_assert!(
                matches!(r, Err(Error::InvalidArgument(_))),
                "a unit of zero-sized tensors must be refused, got {r:?}"
            );
            let filler = TensorData::new("filler", DType::U8, &[1], ui as u64);
            w.add_tensor(&filler.name, filler.dtype, &filler.shape, &filler.data)
                .unwrap();
            unit.tensors.push(filler);
        }
        w.end_unit().unwrap();
        units.push(unit);
    }
    w.finish().unwrap();
    Ok(units)
}

fn check_manifest(path: &Path, store: &Store, units: &[UnitData]) -> Result<(), TestCaseError> {
    let file = std::fs::read(path).unwrap();
    let m = store.manifest();
    prop_assert_eq!(store.file_len(), file.len() as u64);
    prop_assert_eq!(&m.fingerprint, "fp-roundtrip");
    prop_assert_eq!(
        m.metadata.get("writer").map(String::as_str),
        Some("tests/store.rs")
    );
    prop_assert_eq!(m.units.len(), units.len());
    let mut prev_end = BLOCK;
    for (i, (rec, want)) in m.units.iter().zip(units).enumerate() {
        prop_assert_eq!(&rec.name, &want.name);
        prop_assert_eq!(store.unit_index(&want.name), Some(i));
        prop_assert_eq!(rec.offset % BLOCK, 0);
        prop_assert!(rec.offset >= prev_end);
        prop_assert!(rec.length > 0);
        prop_assert_eq!(rec.padded_length, align_up(rec.length, BLOCK));
        prev_end = rec.offset + rec.padded_length;
        let data = &file[rec.offset as usize..(rec.offset + rec.length) as usize];
        prop_assert_eq!(rec.checksum_value(), chunked_checksum(data));
        prop_assert_eq!(rec.tensors.len(), want.tensors.len());
        let mut t_end = 0;
        for (t, w) in rec.tensors.iter().zip(&want.tensors) {
            prop_assert_eq!(&t.name, &w.name);
            prop_assert_eq!(t.dtype, w.dtype);
            prop_assert_eq!(&t.shape, &w.shape);
            prop_assert_eq!(t.nbytes, w.data.len() as u64);
            prop_assert_eq!(t.offset % TENSOR_ALIGN, 0);
            prop_assert!(t.offset >= t_end);
            t_end = t.offset + t.nbytes;
            prop_assert!(t_end <= rec.length);
            let at = (rec.offset + t.offset) as usize;
            prop_assert_eq!(&file[at..at + w.data.len()], &w.data[..]);
        }
        let layout = store.layout(i).unwrap();
        prop_assert_eq!(layout.buffer_len, rec.padded_length);
        prop_assert_eq!(layout.checksum.map(|c| c.covered), Some(rec.length));
        prop_assert_eq!(layout.tensors.len(), rec.tensors.len());
        for (slot, t) in layout.tensors.iter().zip(&rec.tensors) {
            prop_assert_eq!(&slot.name, &t.name);
            prop_assert_eq!(slot.offset, t.offset);
            prop_assert_eq!(slot.nbytes, t.nbytes);
        }
    }
    prop_assert!(prev_end <= file.len() as u64);
    Ok(())
}

#[test]
fn store_round_trip_through_both_backends() {
    let mut runner = runner(48);
    runner
        .run(&units_strategy(), |spec| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.tstore");
            let units = write_generated(&path, &spec)?;
            let store = Store::open(&path).unwrap();
            check_manifest(&path, &store, &units)?;
            let file = std::fs::read(&path).unwrap();
            for (bname, backend) in backends() {
                let engine = engine(backend, 2);
                for (i, want) in units.iter().enumerate() {
                    let layout = store.layout(i).unwrap();
                    // A unit's size is known before writing it (from_pretrained's budgets).
                    let sizes: Vec<u64> =
                        want.tensors.iter().map(|t| t.data.len() as u64).collect();
                    prop_assert_eq!(layout.buffer_len, unit_buffer_len(&sizes));
                    let buf = read_unit(&engine, &layout).unwrap();
                    let rec = &store.manifest().units[i];
                    let on_disk =
                        &file[rec.offset as usize..(rec.offset + rec.padded_length) as usize];
                    prop_assert!(
                        &buf[..] == on_disk,
                        "{bname}: unit {i} differs from the file"
                    );
                    for (slot, t) in layout.tensors.iter().zip(&want.tensors) {
                        let got = &buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize];
                        prop_assert!(got == &t.data[..], "{bname}: tensor {} of unit {i}", t.name);
                    }
                }
                let s = engine.stats();
                prop_assert_eq!(s.failed, 0);
                if s.backend.direct_refused_files == 0 {
                    // Aligned store extents into aligned buffers: nothing may go buffered.
                    prop_assert_eq!(s.backend.buffered_fallback_bytes, 0, "{}", bname);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn empty_store_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.tstore");
    write_store(&path, "fp", &[]).unwrap();
    let store = Store::open(&path).unwrap();
    assert!(store.manifest().units.is_empty());
    assert!(matches!(store.layout(0), Err(Error::InvalidArgument(_))));
}

/// Units larger than one checksum chunk and one engine chunk, read by several threads.
#[test]
fn multi_chunk_unit_round_trips_and_detects_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tstore");
    let units = vec![
        UnitData {
            name: "small".into(),
            tensors: vec![TensorData::new("a", DType::F32, &[3], 7)],
        },
        UnitData {
            name: "big".into(),
            tensors: vec![
                TensorData::new("head", DType::U8, &[(9 << 20) + 123], 8),
                TensorData::new("tail", DType::F16, &[1000, 3], 9),
            ],
        },
    ];
    write_store(&path, "fp", &units).unwrap();
    let store = Store::open(&path).unwrap();
    let big = store.manifest().units[1].clone();
    assert!(big.length > 2 * (4 << 20));
    for (bname, backend) in backends() {
        let engine = engine(backend, 3);
        let layout = store.layout(1).unwrap();
        let buf = read_unit(&engine, &layout).unwrap();
        for (slot, t) in layout.tensors.iter().zip(&units[1].tensors) {
            assert!(
                buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize] == t.data[..],
                "{bname}: tensor {}",
                t.name
            );
        }
        assert!(
            engine.stats().chunks >= 3,
            "{bname}: read in several chunks"
        );
    }
    // One byte in the first, one in the third checksum chunk, one in the last covered byte.
    for at in [5, (8 << 20) + 17, big.length - 1] {
        let pos = big.offset + at;
        flip(&path, pos, 0x5a);
        for (bname, backend) in backends() {
            let engine = engine(backend, 3);
            match read_unit(&engine, &store.layout(1).unwrap()) {
                Err(Error::Checksum { unit, .. }) => assert_eq!(unit, "big", "{bname}"),
                other => panic!("{bname}: byte {at} corrupted, got {:?}", other.err()),
            }
            read_unit(&engine, &store.layout(0).unwrap()).expect("the other unit still reads");
        }
        flip(&path, pos, 0x5a);
    }
}

// ---------------------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------------------

fn flip(path: &Path, pos: u64, xor: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, pos).unwrap();
    b[0] ^= xor;
    f.write_all_at(&b, pos).unwrap();
}

fn expect_checksum_error(
    engines: &[(&str, Engine)],
    store: &Store,
    i: usize,
) -> Result<(), TestCaseError> {
    let rec = &store.manifest().units[i];
    for (bname, engine) in engines {
        match read_unit(engine, &store.layout(i).unwrap()) {
            Err(Error::Checksum {
                unit,
                tensor,
                path,
                offset,
                len,
                expected,
                actual,
            }) => {
                prop_assert_eq!(&unit, &rec.name, "{}", bname);
                prop_assert_eq!(tensor, None, "{}: the unit's checksum fails first", bname);
                prop_assert_eq!(path.as_path(), store.path());
                prop_assert_eq!(offset, rec.offset);
                prop_assert_eq!(len, rec.length);
                prop_assert_eq!(expected, rec.checksum_value());
                prop_assert_ne!(expected, actual);
            }
            other => {
                return Err(TestCaseError::fail(format!(
                    "{bname}: unit {} corrupted, read gave {:?}",
                    rec.name,
                    other.err()
                )))
            }
        }
    }
    Ok(())
}

fn corruption_fixture() -> (tempfile::TempDir, Store, Vec<(&'static str, Engine)>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.tstore");
    let mut units = small_units();
    units.push(UnitData {
        name: "layers.3".into(),
        tensors: vec![
            TensorData::new("w", DType::F32, &[129, 130], 11),
            TensorData::new("b", DType::I8, &[77], 12),
        ],
    });
    write_store(&path, "fp", &units).unwrap();
    let store = Store::open(&path).unwrap();
    let engines = backends()
        .into_iter()
        .map(|(n, b)| (n, engine(b, 2)))
        .collect();
    (dir, store, engines)
}

#[test]
fn any_corrupted_byte_of_a_unit_fails_its_checksum() {
    let (_dir, store, engines) = corruption_fixture();
    let n = store.manifest().units.len();
    let mut runner = runner(64);
    runner
        .run(
            &(0..n, any::<prop::sample::Index>(), 1u8..=255),
            |(i, idx, xor)| {
                let rec = &store.manifest().units[i];
                let pos = rec.offset + idx.index(rec.length as usize) as u64;
                flip(store.path(), pos, xor);
                let r = expect_checksum_error(&engines, &store, i);
                // The other units are untouched and still read.
                let other = (i + 1) % n;
                let ok = engines
                    .iter()
                    .all(|(_, e)| read_unit(e, &store.layout(other).unwrap()).is_ok());
                flip(store.path(), pos, xor);
                r?;
                prop_assert!(ok, "unit {other} should read after unit {i} was corrupted");
                Ok(())
            },
        )
        .unwrap();
    // And with every corruption undone, everything reads again.
    for (_, e) in &engines {
        for i in 0..n {
            read_unit(e, &store.layout(i).unwrap()).unwrap();
        }
    }
}

#[test]
fn every_byte_of_a_small_unit_is_covered_by_its_checksum() {
    let (_dir, store, engines) = corruption_fixture();
    let rec = store.manifest().units[0].clone();
    assert!(rec.length < 1024, "the exhaustive loop wants a small unit");
    for at in 0..rec.length {
        flip(store.path(), rec.offset + at, 0x80);
        let r = expect_checksum_error(&engines, &store, 0);
        flip(store.path(), rec.offset + at, 0x80);
        if let Err(e) = r {
            panic!("byte {at} of unit {}: {e}", rec.name);
        }
    }
    read_unit(&engines[0].1, &store.layout(0).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// Truncated and hostile files
// ---------------------------------------------------------------------------------------

fn small_store(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("s.tstore");
    write_store(&path, "fp", &small_units()).unwrap();
    path
}

#[test]
fn every_truncation_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path());
    let full = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.tstore");
    let patched = dir.path().join("patched.tstore");
    for len in 0..full.len() {
        std::fs::write(&cut, &full[..len]).unwrap();
        let r = Store::open(&cut);
        assert!(
            matches!(r, Err(Error::Format { .. })),
            "truncated to {len} bytes: {:?}",
            r.map(|_| ())
        );
        // The same truncation with the header's file length made to agree.
        if len >= HEADER_LEN {
            let mut b = full[..len].to_vec();
            b[40..48].copy_from_slice(&(len as u64).to_le_bytes());
            std::fs::write(&patched, &b).unwrap();
            let r = Store::open(&patched);
            assert!(
                matches!(r, Err(Error::Format { .. })),
                "truncated to {len} bytes with a matching header: {:?}",
                r.map(|_| ())
            );
        }
    }
    Store::open(&path).expect("the untruncated store opens");
}

#[test]
fn missing_store_is_an_io_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.tstore");
    match Store::open(&path) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("nope.tstore"), "{e}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn store_for_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path());
    Store::open_for(&path, "fp").unwrap();
    match Store::open_for(&path, "other") {
        Err(Error::FingerprintMismatch {
            expected, found, ..
        }) => {
            assert_eq!(expected, "other");
            assert_eq!(found, "fp");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

type ManifestEdit = (&'static str, Box<dyn Fn(&mut Value)>);

fn manifest_edits() -> Vec<ManifestEdit> {
    fn unit(m: &mut Value, i: usize) -> &mut Value {
        &mut m["units"][i]
    }
    fn tensor(m: &mut Value, u: usize, t: usize) -> &mut Value {
        &mut m["units"][u]["tensors"][t]
    }
    fn num(v: &Value) -> u64 {
        v.as_u64().unwrap()
    }
    let many_tensors: Vec<Value> = (0..65_537)
        .map(|i| json!({"name": format!("t{i}"), "dtype": "U8", "shape": [0], "offset": 0, "nbytes": 0}))
        .collect();
    vec![
        (
            "wrong format name",
            Box::new(|m| m["format"] = json!("other")),
        ),
        ("manifest version 2", Box::new(|m| m["version"] = json!(2))),
        (
            "unknown checksum algorithm",
            Box::new(|m| m["checksum_algorithm"] = json!("md5")),
        ),
        (
            "no units",
            Box::new(|m| {
                m.as_object_mut().unwrap().remove("units");
            }),
        ),
        ("units not a list", Box::new(|m| m["units"] = json!(5))),
        (
            "duplicate unit",
            Box::new(|m| {
                let n = m["units"][0]["name"].clone();
                unit(m, 1)["name"] = n;
            }),
        ),
        (
            "overlapping units",
            Box::new(|m| {
                let o = m["units"][0]["offset"].clone();
                unit(m, 1)["offset"] = o;
            }),
        ),
        (
            "unit over the header",
            Box::new(|m| unit(m, 0)["offset"] = json!(0)),
        ),
        (
            "unaligned unit",
            Box::new(|m| {
                let o = num(&m["units"][0]["offset"]);
                unit(m, 0)["offset"] = json!(o + 1);
            }),
        ),
        (
            "unit past the end",
            Box::new(|m| unit(m, 2)["offset"] = json!(1u64 << 40)),
        ),
        (
            "unit offset overflows",
            Box::new(|m| unit(m, 2)["offset"] = json!(u64::MAX - 4095)),
        ),
        (
            "negative offset",
            Box::new(|m| unit(m, 2)["offset"] = json!(-4096)),
        ),
        (
            "zero length",
            Box::new(|m| {
                unit(m, 0)["length"] = json!(0);
                unit(m, 0)["padded_length"] = json!(0);
            }),
        ),
        (
            "length u64::MAX",
            Box::new(|m| {
                unit(m, 2)["length"] = json!(u64::MAX);
                unit(m, 2)["padded_length"] = json!(u64::MAX);
            }),
        ),
        (
            "length just below u64::MAX",
            Box::new(|m| {
                unit(m, 2)["length"] = json!(u64::MAX - 4000);
                unit(m, 2)["padded_length"] = json!(0);
            }),
        ),
        (
            "length 2^63",
            Box::new(|m| {
                unit(m, 2)["length"] = json!(1u64 << 63);
                unit(m, 2)["padded_length"] = json!(1u64 << 63);
            }),
        ),
        (
            "padded length too long",
            Box::new(|m| {
                let p = num(&m["units"][0]["padded_length"]);
                unit(m, 0)["padded_length"] = json!(p + 4096);
            }),
        ),
        (
            "length runs into the next unit",
            Box::new(|m| {
                let p = num(&m["units"][0]["padded_length"]);
                unit(m, 0)["length"] = json!(p + 1);
                unit(m, 0)["padded_length"] = json!(p + 4096);
            }),
        ),
        (
            "unknown codec",
            Box::new(|m| unit(m, 0)["codec"] = json!("zstd")),
        ),
        (
            "short checksum",
            Box::new(|m| unit(m, 0)["checksum"] = json!("abc")),
        ),
        (
            "non-hex checksum",
            Box::new(|m| unit(m, 0)["checksum"] = json!("zzzzzzzzzzzzzzzz")),
        ),
        (
            "negative checksum",
            Box::new(|m| unit(m, 0)["checksum"] = json!("-123456789abcdef")),
        ),
        (
            "no tensors",
            Box::new(|m| unit(m, 0)["tensors"] = json!([])),
        ),
        (
            "65537 tensors",
            Box::new(move |m| unit(m, 0)["tensors"] = json!(many_tensors.clone())),
        ),
        (
            "duplicate tensor",
            Box::new(|m| {
                let n = m["units"][1]["tensors"][0]["name"].clone();
                tensor(m, 1, 1)["name"] = n;
            }),
        ),
        (
            "tensor past the unit",
            Box::new(|m| {
                let len = num(&m["units"][0]["length"]);
                tensor(m, 0, 1)["offset"] = json!(align_up(len, 64));
            }),
        ),
        (
            "tensor offset overflows",
            Box::new(|m| tensor(m, 0, 1)["offset"] = json!(u64::MAX - 63)),
        ),
        (
            "unaligned tensor",
            Box::new(|m| tensor(m, 0, 0)["offset"] = json!(1)),
        ),
        (
            "overlapping tensors",
            Box::new(|m| {
                let o = m["units"][1]["tensors"][0]["offset"].clone();
                tensor(m, 1, 1)["offset"] = o;
            }),
        ),
        (
            "nbytes one too many",
            Box::new(|m| {
                let n = num(&m["units"][0]["tensors"][0]["nbytes"]);
                tensor(m, 0, 0)["nbytes"] = json!(n + 1);
            }),
        ),
        (
            "nbytes huge",
            Box::new(|m| tensor(m, 0, 0)["nbytes"] = json!(u64::MAX)),
        ),
        (
            "shape overflows",
            Box::new(|m| {
                tensor(m, 0, 0)["shape"] = json!([u64::MAX, 2]);
                tensor(m, 0, 0)["nbytes"] = json!(0);
            }),
        ),
        (
            "shape product overflows",
            Box::new(|m| {
                tensor(m, 0, 0)["shape"] = json!([1u64 << 32, 1u64 << 32, 2]);
                tensor(m, 0, 0)["nbytes"] = json!(0);
            }),
        ),
        (
            "shape with a zero after an overflow",
            Box::new(|m| {
                // The product is 0, but computed left to right it overflows first.
                tensor(m, 0, 0)["shape"] = json!([u64::MAX, u64::MAX, 0]);
                tensor(m, 0, 0)["nbytes"] = json!(0);
            }),
        ),
        (
            "17 dimensions",
            Box::new(|m| {
                tensor(m, 0, 0)["shape"] = json!(vec![1u64; 17]);
                tensor(m, 0, 0)["nbytes"] = json!(4);
            }),
        ),
        (
            "huge dimension count",
            Box::new(|m| {
                tensor(m, 0, 0)["shape"] = json!(vec![1; 100_000]);
                tensor(m, 0, 0)["nbytes"] = json!(4);
            }),
        ),
        (
            "negative dimension",
            Box::new(|m| tensor(m, 0, 0)["shape"] = json!([-1])),
        ),
        (
            "fractional dimension",
            Box::new(|m| tensor(m, 0, 0)["shape"] = json!([1.5])),
        ),
        (
            "unknown dtype",
            Box::new(|m| tensor(m, 0, 0)["dtype"] = json!("F128")),
        ),
        (
            "dtype not a string",
            Box::new(|m| tensor(m, 0, 0)["dtype"] = json!(3)),
        ),
    ]
}

/// A named check that returns why it failed.
type Case<'a> = (&'static str, Box<dyn Fn() -> Result<(), String> + 'a>);
/// A named change to a store header.
type HeaderPatch = (&'static str, Box<dyn Fn(&mut [u8])>);

/// Run every case, catching panics, and report all failures at once.
fn run_cases(cases: Vec<Case<'_>>) {
    let mut failures = Vec::new();
    for (name, case) in cases {
        match catch_unwind(AssertUnwindSafe(case)) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(format!("{name}: {why}")),
            Err(p) => failures.push(format!(
                "{name}: PANIC {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

fn expect_format(path: &Path) -> Result<(), String> {
    match Store::open(path) {
        Err(e @ Error::Format { .. }) => {
            let msg = e.to_string();
            if !msg.contains(&path.display().to_string()) {
                return Err(format!("error does not name the file: {msg}"));
            }
            Ok(())
        }
        Err(e) => Err(format!("expected a format error, got {e:?}")),
        Ok(_) => Err("opened".into()),
    }
}

#[test]
fn hostile_manifests_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawStore::load(&small_store(dir.path()));
    let path = dir.path().join("hostile.tstore");
    let cases = manifest_edits()
        .into_iter()
        .map(|(name, edit)| {
            let raw = &raw;
            let path = path.clone();
            let f: Box<dyn Fn() -> Result<(), String> + '_> = Box::new(move || {
                raw.write_edited(&path, |m| edit(m));
                expect_format(&path)
            });
            (name, f)
        })
        .collect();
    run_cases(cases);
    // The unmodified manifest, rewritten the same way, opens.
    raw.write_edited(&path, |_| {});
    Store::open(&path).unwrap();
}

#[test]
fn hostile_manifest_text_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawStore::load(&small_store(dir.path()));
    let path = dir.path().join("hostile.tstore");
    let good = serde_json::to_vec(&raw.manifest).unwrap();
    let texts: Vec<(&'static str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("not UTF-8", b"\xff\xfe\x00garbage".to_vec()),
        ("a list", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("half a manifest", good[..good.len() / 2].to_vec()),
        ("deep nesting", "[".repeat(100_000).into_bytes()),
        ("deep nesting in metadata", {
            let s = String::from_utf8(good.clone()).unwrap();
            s.replacen(
                "\"metadata\":{}",
                &format!("\"metadata\":{{\"a\":{}}}", "[".repeat(50_000)),
                1,
            )
            .into_bytes()
        }),
        ("dimension beyond u64", {
            let s = String::from_utf8(good.clone()).unwrap();
            s.replacen("\"shape\":[5,7]", "\"shape\":[18446744073709551616,7]", 1)
                .into_bytes()
        }),
    ];
    let cases = texts
        .into_iter()
        .map(|(name, text)| {
            let raw = &raw;
            let path = path.clone();
            let f: Box<dyn Fn() -> Result<(), String> + '_> = Box::new(move || {
                raw.write_json(&path, &text);
                expect_format(&path)
            });
            (name, f)
        })
        .collect();
    run_cases(cases);
}

#[test]
fn hostile_headers_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawStore::load(&small_store(dir.path()));
    let path = dir.path().join("hostile.tstore");
    let json = serde_json::to_vec(&raw.manifest).unwrap();
    let set64 =
        |at: usize, v: u64| move |h: &mut [u8]| h[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let set32 =
        |at: usize, v: u32| move |h: &mut [u8]| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let data_len = raw.data.len() as u64;
    let patches: Vec<HeaderPatch> = vec![
        ("bad magic", Box::new(|h: &mut [u8]| h[0] = b'X')),
        ("zero magic", Box::new(|h: &mut [u8]| h[..8].fill(0))),
        ("version 0", Box::new(set32(8, 0))),
        ("version 2", Box::new(set32(8, 2))),
        ("version u32::MAX", Box::new(set32(8, u32::MAX))),
        ("unknown flags", Box::new(set32(12, 1))),
        ("manifest_len u64::MAX", Box::new(set64(24, u64::MAX))),
        (
            "manifest_len over the limit",
            Box::new(set64(24, (64 << 20) + 1)),
        ),
        ("manifest_len 0", Box::new(set64(24, 0))),
        (
            "manifest_len one short",
            Box::new(set64(24, json.len() as u64 - 1)),
        ),
        ("manifest_offset 0", Box::new(set64(16, 0))),
        (
            "manifest_offset inside the header block",
            Box::new(set64(16, 100)),
        ),
        ("manifest_offset u64::MAX", Box::new(set64(16, u64::MAX))),
        (
            "manifest_offset + len overflows",
            Box::new(move |h: &mut [u8]| {
                set64(16, u64::MAX - 10)(h);
                set64(24, 100)(h);
            }),
        ),
        (
            "manifest starts early",
            Box::new(move |h: &mut [u8]| {
                set64(16, data_len - 8)(h);
                set64(24, json.len() as u64 + 8)(h);
            }),
        ),
        ("manifest checksum", Box::new(|h: &mut [u8]| h[32] ^= 1)),
        (
            "file_len + 1",
            Box::new(move |h: &mut [u8]| {
                let v = u64::from_le_bytes(h[40..48].try_into().unwrap());
                set64(40, v + 1)(h)
            }),
        ),
        ("file_len u64::MAX", Box::new(set64(40, u64::MAX))),
    ];
    let json = serde_json::to_vec(&raw.manifest).unwrap();
    let cases = patches
        .into_iter()
        .map(|(name, patch)| {
            let raw = &raw;
            let path = path.clone();
            let json = json.clone();
            let f: Box<dyn Fn() -> Result<(), String> + '_> = Box::new(move || {
                raw.write_with(&path, &json, |h| patch(h));
                expect_format(&path)
            });
            (name, f)
        })
        .collect();
    run_cases(cases);
}

/// Random byte flips in the header and manifest: never a panic, and whatever opens reads
/// within bounds.
#[test]
fn random_header_and_manifest_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_store(dir.path());
    let pristine = std::fs::read(&path).unwrap();
    let raw = RawStore::load(&path);
    let m_off = raw.data.len();
    let target = dir.path().join("fuzz.tstore");
    let engines: Vec<Engine> = backends().into_iter().map(|(_, b)| engine(b, 1)).collect();
    let region = HEADER_LEN + (pristine.len() - m_off);
    let mut runner = runner(64);
    runner
        .run(
            &(prop::collection::vec((0..region, 1u8..=255), 1..4)),
            |flips| {
                let mut b = pristine.clone();
                for (at, xor) in &flips {
                    let pos = if *at < HEADER_LEN {
                        *at
                    } else {
                        m_off + at - HEADER_LEN
                    };
                    b[pos] ^= xor;
                }
                std::fs::write(&target, &b).unwrap();
                for e in &engines {
                    e.backend().close_all();
                }
                match Store::open(&target) {
                    Err(Error::Format { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
                    Ok(store) => {
                        // Only unused header bytes were touched.
                        for i in 0..store.manifest().units.len() {
                            for e in &engines {
                                read_unit(e, &store.layout(i).unwrap()).unwrap();
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Numeric fields of a valid manifest set to boundary values, with a correct manifest
/// checksum: the reader must refuse or accept without panicking, and whatever it accepts
/// must read in bounds (with at worst a checksum error).
#[test]
fn manifest_numbers_at_boundaries_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let raw = RawStore::load(&small_store(dir.path()));
    let target = dir.path().join("numbers.tstore");
    let engines: Vec<Engine> = backends().into_iter().map(|(_, b)| engine(b, 1)).collect();
    let file_len = (raw.data.len() + serde_json::to_vec(&raw.manifest).unwrap().len()) as u64;
    let values = prop_oneof![
        Just(0u64),
        Just(1),
        Just(63),
        Just(64),
        Just(4095),
        Just(4096),
        Just(8192),
        Just(1 << 32),
        Just(1 << 63),
        Just(u64::MAX - 4095),
        Just(u64::MAX - 63),
        Just(u64::MAX),
        0..file_len + 8192,
    ];
    let field = prop_oneof![
        Just("offset"),
        Just("length"),
        Just("padded_length"),
        Just("t.offset"),
        Just("t.nbytes"),
        Just("t.shape"),
    ];
    let mut runner = runner(128);
    runner
        .run(
            &prop::collection::vec((0..3usize, field, values), 1..4),
            |edits| {
                raw.write_edited(&target, |m| {
                    for (u, f, v) in &edits {
                        let unit = &mut m["units"][*u];
                        match *f {
                            "t.offset" => unit["tensors"][0]["offset"] = json!(v),
                            "t.nbytes" => unit["tensors"][0]["nbytes"] = json!(v),
                            "t.shape" => unit["tensors"][0]["shape"] = json!([v]),
                            f => unit[f] = json!(v),
                        }
                    }
                });
                match Store::open(&target) {
                    Err(Error::Format { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e:?}"))),
                    Ok(store) => {
                        for i in 0..store.manifest().units.len() {
                            let layout = store.layout(i).unwrap();
                            prop_assert!(layout.buffer_len <= file_len);
                            for e in &engines {
                                e.backend().close_all();
                                match read_unit(e, &layout) {
                                    Ok(_) | Err(Error::Checksum { .. }) => {}
                                    Err(e) => {
                                        return Err(TestCaseError::fail(format!(
                                            "unit {i}: unexpected {e:?}"
                                        )))
                                    }
                                }
                            }
                        }
                    }
                }
                Ok(())
            },
        )
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn dropped_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.tstore");
    let mut w = StoreWriter::create(&target, "fp").unwrap();
    let tmp = w.temp_path().to_path_buf();
    assert!(
        tmp.exists(),
        "the temporary file is written next to the target"
    );
    assert_eq!(tmp.parent(), target.parent());
    // The contract with stale-file cleaners (python/tensorstream/offload.py): the name is
    // `.<target>.tmp-...-<pid>`, the writer's pid last.
    let name = tmp.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(".m.tstore.tmp-"), "{name}");
    assert_eq!(
        name.rsplit('-').next().unwrap(),
        std::process::id().to_string(),
        "{name}"
    );
    w.begin_unit("a").unwrap();
    w.add_tensor("x", DType::U8, &[10], &[1; 10]).unwrap();
    w.end_unit().unwrap();
    w.begin_unit("b").unwrap();
    assert!(!target.exists(), "nothing at the target before finish");
    drop(w);
    assert!(!tmp.exists(), "the temporary file is removed");
    assert!(!target.exists());
    assert!(
        dir_entries(dir.path()).is_empty(),
        "{:?}",
        dir_entries(dir.path())
    );
}

#[test]
fn finished_store_replaces_the_old_one_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.tstore");
    write_store(&target, "old", &small_units()).unwrap();

    // An abandoned rewrite leaves the old store in place.
    let mut w = StoreWriter::create(&target, "new").unwrap();
    w.begin_unit("only").unwrap();
    w.add_tensor("x", DType::F32, &[4], &[7; 16]).unwrap();
    w.end_unit().unwrap();
    assert_eq!(Store::open(&target).unwrap().manifest().fingerprint, "old");
    drop(w);
    assert_eq!(Store::open(&target).unwrap().manifest().fingerprint, "old");
    assert_eq!(dir_entries(dir.path()), ["m.tstore"]);

    // A finished rewrite replaces it.
    let mut w = StoreWriter::create(&target, "new").unwrap();
    w.begin_unit("only").unwrap();
    w.add_tensor("x", DType::F32, &[4], &[7; 16]).unwrap();
    w.end_unit().unwrap();
    assert_eq!(Store::open(&target).unwrap().manifest().fingerprint, "old");
    assert_eq!(w.finish().unwrap(), target);
    let store = Store::open(&target).unwrap();
    assert_eq!(store.manifest().fingerprint, "new");
    assert_eq!(store.manifest().units.len(), 1);
    assert_eq!(dir_entries(dir.path()), ["m.tstore"]);
}

/// Two writers for the same target in one process must not share a temporary file.
#[test]
fn concurrent_writers_for_one_target_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.tstore");
    let mut a = StoreWriter::create(&target, "a").unwrap();
    let mut b = StoreWriter::create(&target, "b").unwrap();
    assert_ne!(a.temp_path(), b.temp_path());
    for (w, n) in [(&mut a, 100u64), (&mut b, 3000)] {
        w.begin_unit("u").unwrap();
        w.add_tensor("x", DType::U8, &[n], &bytes(n, n as usize))
            .unwrap();
        w.end_unit().unwrap();
    }
    a.finish().unwrap();
    assert_eq!(Store::open(&target).unwrap().manifest().fingerprint, "a");
    b.finish().unwrap();
    let store = Store::open(&target).unwrap();
    assert_eq!(store.manifest().fingerprint, "b");
    let e = engine(backends().remove(1).1, 1);
    let buf = read_unit(&e, &store.layout(0).unwrap()).unwrap();
    assert_eq!(&buf[..3000], &bytes(3000, 3000)[..]);
    assert_eq!(dir_entries(dir.path()), ["m.tstore"]);
}

#[test]
fn writer_misuse_is_an_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.tstore");
    let inv = |r: tensorstream_core::Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
    let mut w = StoreWriter::create(&target, "fp").unwrap();
    assert!(
        inv(w.add_tensor("x", DType::U8, &[1], &[0])),
        "tensor outside a unit"
    );
    assert!(inv(w.end_unit()), "end_unit without begin_unit");
    w.begin_unit("a").unwrap();
    assert!(inv(w.begin_unit("b")), "nested unit");
    assert!(inv(w.end_unit()), "unit without tensors");
    assert!(
        inv(w.add_tensor("x", DType::F32, &[2], &[0; 7])),
        "wrong byte count"
    );
    assert!(
        inv(w.add_tensor("x", DType::F32, &[u64::MAX, 2], &[])),
        "overflowing shape"
    );
    w.add_tensor("x", DType::U8, &[2], &[1, 2]).unwrap();
    assert!(
        inv(w.add_tensor("x", DType::U8, &[2], &[1, 2])),
        "duplicate tensor"
    );
    w.end_unit().unwrap();
    assert!(inv(w.begin_unit("a")), "duplicate unit");
    w.begin_unit("zeros").unwrap();
    w.add_tensor("e", DType::F32, &[0, 3], &[]).unwrap();
    w.add_tensor("f", DType::I64, &[4, 0], &[]).unwrap();
    assert!(
        inv(w.end_unit()),
        "a unit of zero-sized tensors would be unreadable"
    );
    w.add_tensor("g", DType::U8, &[1], &[9]).unwrap();
    w.end_unit().unwrap();
    w.begin_unit("open").unwrap();
    let tmp = w.temp_path().to_path_buf();
    assert!(
        matches!(w.finish(), Err(Error::InvalidArgument(_))),
        "finish with an open unit"
    );
    assert!(
        !tmp.exists() && !target.exists(),
        "a failed finish leaves nothing"
    );

    // The unit that had to be completed reads back, zero-sized tensors included.
    let mut w = StoreWriter::create(&target, "fp").unwrap();
    w.begin_unit("zeros").unwrap();
    w.add_tensor("e", DType::F32, &[0, 3], &[]).unwrap();
    w.add_tensor("g", DType::U8, &[1], &[9]).unwrap();
    w.end_unit().unwrap();
    w.finish().unwrap();
    let store = Store::open(&target).unwrap();
    let layout = store.layout(0).unwrap();
    let e = engine(backends().remove(0).1, 1);
    let buf: AlignedBuf = read_unit(&e, &layout).unwrap();
    assert_eq!(layout.tensors[0].nbytes, 0);
    assert_eq!(buf[layout.tensors[1].offset as usize], 9);
}

#[test]
fn store_path_without_file_name_is_refused() {
    assert!(matches!(
        StoreWriter::create("/", "fp"),
        Err(Error::InvalidArgument(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Tensor digests: the manifest's names and dtypes are bound to the bytes
// ---------------------------------------------------------------------------------------

/// A store whose first unit holds two tensors of one shape (whose names can be swapped
/// without any other field changing), a small one, and a tensor over two checksum chunks.
fn digest_units() -> Vec<UnitData> {
    vec![
        UnitData {
            name: "layers.0".into(),
            tensors: vec![
                TensorData::new("q.weight", DType::F32, &[16, 16], 11),
                TensorData::new("k.weight", DType::F32, &[16, 16], 12),
                TensorData::new("norm", DType::BF16, &[16], 13),
            ],
        },
        UnitData {
            name: "layers.1".into(),
            tensors: vec![
                TensorData::new("small", DType::U8, &[100], 14),
                TensorData::new("big", DType::U8, &[9 << 20], 15),
            ],
        },
    ]
}

/// The engines reads are checked with: both backends, checksum chunks split over several
/// jobs (4 MiB) or one job (16 MiB).
fn digest_engines() -> Vec<(String, Engine)> {
    let mut v = Vec::new();
    for (bname, backend) in backends() {
        for chunk in [4u64 << 20, 16 << 20] {
            let e = Engine::new(
                backend.clone(),
                tensorstream_core::EngineConfig {
                    num_threads: 3,
                    chunk_bytes: chunk,
                },
            )
            .unwrap();
            v.push((format!("{bname}/{}MiB", chunk >> 20), e));
        }
    }
    v
}

/// Fault in unit `i` of the store from a read-only mapping of its file, as the zero-copy
/// CPU path does.
fn populate_unit(engine: &Engine, store: &Store, i: usize) -> Result<(), Error> {
    let file = std::fs::File::open(store.path()).unwrap();
    // SAFETY: the test owns the file; nobody modifies it while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let rec = &store.manifest().units[i];
    let layout = store.layout(i).unwrap();
    // SAFETY: the mapping covers the unit's padded bytes and outlives the wait.
    let t = unsafe {
        engine.submit_populate(
            &layout,
            map.as_ptr().add(rec.offset as usize),
            tensorstream_core::Priority::Demand,
        )
    }?;
    engine.wait(&t)
}

/// The tensor a read of unit `i` names in its checksum error (None: the read succeeded).
fn tensor_error(engine: &Engine, store: &Store, i: usize, populate: bool) -> Option<String> {
    let r = if populate {
        populate_unit(engine, store, i)
    } else {
        read_unit(engine, &store.layout(i).unwrap()).map(|_| ())
    };
    match r {
        Ok(()) => None,
        Err(Error::Checksum {
            unit,
            tensor: Some(t),
            ..
        }) => {
            assert_eq!(unit, store.manifest().units[i].name);
            Some(t)
        }
        Err(e) => panic!("expected a tensor checksum error, got {e}"),
    }
}

/// Python's `units.fingerprint`, written out independently: sha256 over the class, then per
/// unit and per tensor its name, dtype, shape (Python's list repr) and digest.
fn python_fingerprint(model_class: &str, units: &[UnitData]) -> String {
    use sha2::{Digest, Sha256};
    let mut s = format!("tensorstream-v1|{model_class}");
    for u in units {
        s += &format!("|unit:{}", u.name);
        for t in &u.tensors {
            s += &format!(
                "|{}:{}:{:?}:{:016x}",
                t.name,
                t.dtype,
                t.shape,
                chunked_checksum(&t.data)
            );
        }
    }
    let hex: String = Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex[..32].to_string()
}

#[test]
fn writer_records_each_tensors_digest() {
    let dir = tempfile::tempdir().unwrap();
    let units = digest_units();
    let path = write_store(&dir.path().join("d.tstore"), "fp", &units).unwrap();
    let store = Store::open(&path).unwrap();
    assert_eq!(store.manifest().minor_version, FORMAT_MINOR_VERSION);
    for (i, (rec, want)) in store.manifest().units.iter().zip(&units).enumerate() {
        let layout = store.layout(i).unwrap();
        for ((t, w), slot) in rec.tensors.iter().zip(&want.tensors).zip(&layout.tensors) {
            let d = chunked_checksum(&w.data);
            assert_eq!(t.digest.as_deref(), Some(format!("{d:016x}").as_str()));
            assert_eq!(slot.digest, Some(d));
        }
        for (name, e) in digest_engines() {
            assert_eq!(tensor_error(&e, &store, i, false), None, "{name}");
            if name.starts_with("mmap") {
                assert_eq!(tensor_error(&e, &store, i, true), None, "{name} populate");
            }
        }
    }
    // Same formula as the Python side, so a store can be checked against a model.
    let class = "transformers.models.llama.modeling_llama.LlamaForCausalLM";
    assert_eq!(
        store.manifest_fingerprint(class).unwrap(),
        python_fingerprint(class, &units)
    );
    // A scalar and a zero-sized tensor format their shapes as Python does.
    let odd = vec![UnitData {
        name: "u".into(),
        tensors: vec![
            TensorData::new("s", DType::F64, &[], 1),
            TensorData::new("e", DType::F16, &[0, 3], 2),
        ],
    }];
    let p = write_store(&dir.path().join("odd.tstore"), "fp", &odd).unwrap();
    assert_eq!(
        Store::open(&p).unwrap().manifest_fingerprint("M").unwrap(),
        python_fingerprint("M", &odd)
    );
}

/// Swap `field` between tensors `a` and `b` of unit `u` of a manifest.
fn swap_field(m: &mut Value, u: usize, a: usize, b: usize, field: &str) {
    let ts = m["units"][u]["tensors"].as_array_mut().unwrap();
    let va = ts[a][field].take();
    let vb = std::mem::replace(&mut ts[b][field], va);
    ts[a][field] = vb;
}

#[test]
fn swapped_tensor_names_fail_the_read_despite_a_recomputed_manifest_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let units = digest_units();
    let good = write_store(&dir.path().join("good.tstore"), "fp", &units).unwrap();
    let raw = RawStore::load(&good);
    let original = Store::open(&good)
        .unwrap()
        .manifest_fingerprint("M")
        .unwrap();
    // Names swapped, each keeping its own digest: the bytes at each offset are the other
    // tensor's. The header's manifest checksum is recomputed, so the store opens.
    for (u, a, b) in [(0, 0, 1), (1, 0, 1)] {
        let path = dir.path().join(format!("swap{u}.tstore"));
        raw.write_edited(&path, |m| {
            swap_field(m, u, a, b, "name");
            swap_field(m, u, a, b, "digest");
        });
        let store = Store::open(&path).expect("structurally valid");
        let swapped = &store.manifest().units[u].tensors;
        for (name, e) in digest_engines() {
            let t = tensor_error(&e, &store, u, false).expect("a tensor checksum error");
            assert!(t == swapped[a].name || t == swapped[b].name, "{name}: {t}");
            if name.starts_with("mmap") {
                assert!(
                    tensor_error(&e, &store, u, true).is_some(),
                    "{name} populate"
                );
            }
            // The other unit is untouched.
            assert_eq!(tensor_error(&e, &store, 1 - u, false), None, "{name}");
        }
        assert_ne!(store.manifest_fingerprint("M").unwrap(), original);
        // Only the names swapped (digests where they were): the reads pass, since the
        // bytes are what the digests describe, but the fingerprint tells the models apart.
        let path = dir.path().join(format!("names{u}.tstore"));
        raw.write_edited(&path, |m| swap_field(m, u, a, b, "name"));
        let store = Store::open(&path).unwrap();
        if u == 0 {
            // Same shapes: the swap is invisible to the reads.
            for (name, e) in digest_engines() {
                assert_eq!(tensor_error(&e, &store, u, false), None, "{name}");
            }
        }
        assert_ne!(store.manifest_fingerprint("M").unwrap(), original);
    }
    // A wrong digest on its own.
    let path = dir.path().join("wrong.tstore");
    raw.write_edited(&path, |m| {
        m["units"][0]["tensors"][2]["digest"] = json!("0123456789abcdef");
    });
    let store = Store::open(&path).unwrap();
    for (name, e) in digest_engines() {
        assert_eq!(
            tensor_error(&e, &store, 0, false).as_deref(),
            Some("norm"),
            "{name}"
        );
    }
    match read_unit(&digest_engines()[0].1, &store.layout(0).unwrap()) {
        Err(e @ Error::Checksum { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("tensor 'norm'") && msg.contains("layers.0"),
                "{msg}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    // Without the checksum (data already verified), nothing is verified.
    let mut layout = store.layout(0).unwrap();
    layout.checksum = None;
    read_unit(&digest_engines()[0].1, &layout).unwrap();
}

#[test]
fn coded_units_verify_tensor_digests_after_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.tstore");
    // Small integers as f32: their high bytes compress, so the unit is stored coded.
    let f32s = |n: usize, k: u32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (((i as u32 * k) % 7) as f32).to_le_bytes())
            .collect()
    };
    let (a, b) = (f32s(300_000, 3), f32s(300_000, 5));
    let mut w = StoreWriter::create(&path, "fp").unwrap();
    w.set_compression(Some(3), 2, tensorstream_core::codec::CodeFamily::Bytegroup)
        .unwrap();
    w.begin_unit("u").unwrap();
    w.add_tensor("a", DType::F32, &[300_000], &a).unwrap();
    w.add_tensor("b", DType::F32, &[300_000], &b).unwrap();
    w.end_unit().unwrap();
    w.finish().unwrap();
    let store = Store::open(&path).unwrap();
    assert!(store.manifest().units[0].is_coded());
    let e = engine(backends()[1].1.clone(), 2);
    assert_eq!(tensor_error(&e, &store, 0, false), None);
    let raw = RawStore::load(&path);
    let swapped = dir.path().join("s.tstore");
    raw.write_edited(&swapped, |m| {
        swap_field(m, 0, 0, 1, "name");
        swap_field(m, 0, 0, 1, "digest");
    });
    let store = Store::open(&swapped).unwrap();
    assert!(tensor_error(&e, &store, 0, false).is_some());
}

#[test]
fn relabelled_dtype_changes_the_manifest_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let units = digest_units();
    let good = write_store(&dir.path().join("good.tstore"), "fp", &units).unwrap();
    let original = Store::open(&good)
        .unwrap()
        .manifest_fingerprint("M")
        .unwrap();
    let raw = RawStore::load(&good);
    let path = dir.path().join("relabel.tstore");
    // F32 read as I32: same size, so nbytes still matches and the bytes are unchanged.
    raw.write_edited(&path, |m| {
        m["units"][0]["tensors"][0]["dtype"] = json!("I32")
    });
    let store = Store::open(&path).unwrap();
    assert_eq!(store.manifest().units[0].tensors[0].dtype, DType::I32);
    // The recorded fingerprint is an opaque string the edit kept; the recomputed one is
    // that of another model, which `offload()` refuses.
    assert_eq!(store.manifest().fingerprint, "fp");
    assert_ne!(store.manifest_fingerprint("M").unwrap(), original);
    let mut relabelled = units.clone();
    relabelled[0].tensors[0].dtype = DType::I32;
    assert_eq!(
        store.manifest_fingerprint("M").unwrap(),
        python_fingerprint("M", &relabelled)
    );
    // A dtype of another size with a shape that keeps nbytes: also another fingerprint.
    raw.write_edited(&path, |m| {
        m["units"][0]["tensors"][0]["dtype"] = json!("BF16");
        m["units"][0]["tensors"][0]["shape"] = json!([16, 32]);
    });
    let store = Store::open(&path).unwrap();
    assert_ne!(store.manifest_fingerprint("M").unwrap(), original);
    // The class is part of it too.
    let store = Store::open(&good).unwrap();
    assert_ne!(store.manifest_fingerprint("N").unwrap(), original);
}

#[test]
fn stores_without_tensor_digests_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let units = digest_units();
    let good = write_store(&dir.path().join("good.tstore"), "fp", &units).unwrap();
    let raw = RawStore::load(&good);
    let strip = |m: &mut Value| {
        m.as_object_mut().unwrap().remove("minor_version");
        for u in m["units"].as_array_mut().unwrap() {
            for t in u["tensors"].as_array_mut().unwrap() {
                t.as_object_mut().unwrap().remove("digest");
            }
        }
    };
    // As written before tensor digests: no minor version, no digests.
    let old = dir.path().join("old.tstore");
    raw.write_edited(&old, strip);
    let store = Store::open(&old).unwrap();
    assert_eq!(store.manifest().minor_version, 0);
    for (i, unit) in units.iter().enumerate() {
        let layout = store.layout(i).unwrap();
        assert!(layout.tensors.iter().all(|t| t.digest.is_none()));
        for (name, e) in digest_engines() {
            let buf = read_unit(&e, &layout).unwrap();
            for (slot, t) in layout.tensors.iter().zip(&unit.tensors) {
                let at = slot.offset as usize;
                assert_eq!(&buf[at..at + t.data.len()], &t.data[..], "{name}");
            }
        }
    }
    // It cannot vouch for its names and dtypes: no fingerprint from the manifest.
    match store.manifest_fingerprint("M") {
        Err(Error::Format { reason, .. }) => assert!(reason.contains("no digest"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // Minor version 0 with some digests: those are verified.
    let partial = dir.path().join("partial.tstore");
    raw.write_edited(&partial, |m| {
        m.as_object_mut().unwrap().remove("minor_version");
        m["units"][0]["tensors"][0]
            .as_object_mut()
            .unwrap()
            .remove("digest");
        m["units"][0]["tensors"][1]["digest"] = json!("0000000000000000");
    });
    let store = Store::open(&partial).unwrap();
    let e = engine(backends()[1].1.clone(), 2);
    assert_eq!(
        tensor_error(&e, &store, 0, false).as_deref(),
        Some("k.weight")
    );
    // Minor version 1 requires every digest, well formed.
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "missing",
            Box::new(|m| {
                m["units"][1]["tensors"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("digest");
            }),
        ),
        (
            "null",
            Box::new(|m| m["units"][0]["tensors"][0]["digest"] = Value::Null),
        ),
        (
            "short",
            Box::new(|m| m["units"][0]["tensors"][0]["digest"] = json!("abc")),
        ),
        (
            "upper",
            Box::new(|m| m["units"][0]["tensors"][0]["digest"] = json!("0123456789ABCDEF")),
        ),
        (
            "sign",
            Box::new(|m| m["units"][0]["tensors"][0]["digest"] = json!("+123456789abcdef")),
        ),
        (
            "number",
            Box::new(|m| m["units"][0]["tensors"][0]["digest"] = json!(12)),
        ),
    ];
    for (what, edit) in cases {
        let p = dir.path().join(format!("bad-{what}.tstore"));
        raw.write_edited(&p, |m| edit(m));
        match Store::open(&p) {
            Err(Error::Format { .. }) => {}
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writer liveness: an exclusive flock on the temporary file
// ---------------------------------------------------------------------------------------

/// Try an exclusive lock on `f` without waiting.
fn try_lock(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor the test owns.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EWOULDBLOCK), "{e}");
        return false;
    }
    // SAFETY: as above.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
    true
}

#[test]
fn the_writer_holds_an_exclusive_flock_on_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.tstore");
    // Aborted (dropped): locked all along, then removed, then unlocked.
    let mut w = StoreWriter::create(&target, "fp").unwrap();
    let tmp = w.temp_path().to_path_buf();
    let other = std::fs::File::open(&tmp).unwrap();
    assert!(!try_lock(&other), "locked from creation");
    w.begin_unit("a").unwrap();
    w.add_tensor("x", DType::U8, &[10], &[1; 10]).unwrap();
    w.end_unit().unwrap();
    assert!(!try_lock(&other), "locked while writing");
    let name = tmp.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with(".m.tstore.tmp-"), "{name}");
    drop(w);
    assert!(!tmp.exists());
    assert!(try_lock(&other), "unlocked after abort");
    // Finished: locked until renamed, unlocked after.
    let mut w = StoreWriter::create(&target, "fp").unwrap();
    let other = std::fs::File::open(w.temp_path()).unwrap();
    assert!(!try_lock(&other));
    w.begin_unit("a").unwrap();
    w.add_tensor("x", DType::U8, &[10], &[1; 10]).unwrap();
    w.end_unit().unwrap();
    assert!(!try_lock(&other));
    w.finish().unwrap();
    assert!(try_lock(&other), "unlocked once renamed");
    assert!(try_lock(&std::fs::File::open(&target).unwrap()));
    // A writer that vanished without cleaning up (here: leaked; a killed process releases
    // its locks the same way when the kernel closes its files) leaves an unlocked file
    // only once its descriptors are closed; while they are open the file reads as live.
    let w = StoreWriter::create(&target, "fp").unwrap();
    let tmp = w.temp_path().to_path_buf();
    std::mem::forget(w);
    assert!(!try_lock(&std::fs::File::open(&tmp).unwrap()));
    let _ = std::fs::remove_file(&tmp);
}
