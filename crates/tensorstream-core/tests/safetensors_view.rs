//! The read-only view of safetensors checkpoints: sharded checkpoints written by the
//! `safetensors` crate, read through the engine with both backends, and hostile checkpoints.

mod common;

use common::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use tensorstream_core::store::{DType, SafetensorsView, UnitLayout, BLOCK};
use tensorstream_core::{Engine, Error};

fn st_dtype(d: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match d {
        DType::BOOL => S::BOOL,
        DType::U8 => S::U8,
        DType::I8 => S::I8,
        DType::F8E4M3 => S::F8_E4M3,
        DType::F8E5M2 => S::F8_E5M2,
        DType::I16 => S::I16,
        DType::U16 => S::U16,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I32 => S::I32,
        DType::U32 => S::U32,
        DType::F32 => S::F32,
        DType::I64 => S::I64,
        DType::U64 => S::U64,
        DType::F64 => S::F64,
    }
}

/// Write `shards` with the safetensors crate, plus a `model.safetensors.index.json`.
fn write_checkpoint(dir: &Path, shards: &[Vec<TensorData>]) {
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, tensors) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|t| {
                let shape = t.shape.iter().map(|&d| d as usize).collect();
                let v = safetensors::tensor::TensorView::new(st_dtype(t.dtype), shape, &t.data)
                    .expect("valid tensor view");
                (t.name.clone(), v)
            })
            .collect();
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &dir.join(&file)).unwrap();
        for t in tensors {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// Structural checks of a layout: aligned extents inside their files, disjoint in the
/// destination, every tensor inside the extent that carries it.
fn check_layout(view: &SafetensorsView, layout: &UnitLayout) {
    let lens: Vec<u64> = view
        .files()
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    let mut dest_end = 0;
    for e in &layout.extents {
        assert_eq!(e.file_offset % BLOCK, 0, "{e:?}");
        assert_eq!(e.dest_offset % BLOCK, 0, "{e:?}");
        assert!(e.dest_offset >= dest_end, "extents overlap in the buffer");
        assert!(
            e.file_offset + e.len <= lens[e.file],
            "extent past its file"
        );
        dest_end = e.dest_offset + e.len;
    }
    assert!(dest_end <= layout.buffer_len);
    assert_eq!(layout.buffer_len % BLOCK, 0);
    assert!(layout.checksum.is_none());
    for slot in &layout.tensors {
        let loc = &view.tensors()[&slot.name];
        assert!(
            layout.extents.iter().any(|e| {
                slot.offset >= e.dest_offset
                    && slot.offset + slot.nbytes <= e.dest_offset + e.len
                    && e.file == loc.file
                    && e.file_offset + (slot.offset - e.dest_offset) == loc.offset
            }),
            "tensor {} is not carried by an extent at its file offset",
            slot.name
        );
    }
}

/// Read every unit through both backends and compare each tensor with the original bytes.
fn read_and_compare(view: &SafetensorsView, units: &[(String, Vec<&TensorData>)]) {
    for (bname, backend) in backends() {
        let engine: Engine = engine(backend, 2);
        for (unit, tensors) in units {
            let names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
            let layout = view.layout(unit, &names).unwrap();
            check_layout(view, &layout);
            assert_eq!(layout.tensors.len(), tensors.len());
            let buf = read_unit(&engine, &layout).unwrap();
            for t in tensors {
                let slot = layout.tensors.iter().find(|s| s.name == t.name).unwrap();
                assert_eq!(slot.dtype, t.dtype);
                assert_eq!(slot.shape, t.shape);
                assert_eq!(slot.nbytes, t.data.len() as u64);
                let got = &buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize];
                assert!(
                    got == &t.data[..],
                    "{bname}: unit {unit}, tensor {}",
                    t.name
                );
            }
        }
        let s = engine.stats();
        assert_eq!(s.failed, 0);
        if s.backend.direct_refused_files == 0 {
            assert_eq!(
                s.backend.buffered_fallback_bytes, 0,
                "{bname}: no buffered fallback"
            );
        }
    }
}

#[test]
fn sharded_checkpoint_reads_back_through_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let t = TensorData::new;
    let shards = vec![
        vec![
            t("a.w", DType::F32, &[3, 5], 1),
            t("a.b", DType::U8, &[7], 2),
            t("b.w", DType::BF16, &[13, 3], 3),
            // A tensor no unit below reads, wide enough to split a unit into two extents.
            // F32 sorts between I64 and BF16 in the file (safetensors orders by dtype).
            t("gap", DType::F32, &[(512 << 10) + 5], 4),
            t("c.w", DType::I64, &[5], 5),
        ],
        vec![
            t("a.norm", DType::F16, &[11], 6),
            t("b.b", DType::BOOL, &[3], 7),
            t("b.n", DType::F8E4M3, &[1, 9], 8),
            t("c.b", DType::F64, &[2], 9),
            t("zero", DType::F32, &[0, 4], 10),
            t("scalar", DType::I32, &[], 11),
        ],
        vec![
            // Several engine chunks long, at an unaligned offset.
            t("huge", DType::U8, &[(5 << 20) + 3], 12),
            t("c.n", DType::I16, &[17], 13),
            t("f8", DType::F8E5M2, &[3], 14),
        ],
    ];
    write_checkpoint(dir.path(), &shards);
    let view = SafetensorsView::open(dir.path()).unwrap();
    assert_eq!(view.files().len(), 3);
    assert_eq!(
        view.metadata().get("format").map(String::as_str),
        Some("pt")
    );
    let all: Vec<&TensorData> = shards.iter().flatten().collect();
    assert_eq!(view.tensors().len(), all.len());
    let unaligned = view
        .tensors()
        .values()
        .filter(|l| l.offset % BLOCK != 0)
        .count();
    assert!(unaligned >= all.len() - 1, "offsets should be unaligned");
    for t in &all {
        let loc = &view.tensors()[&t.name];
        assert_eq!(
            (loc.dtype, &loc.shape, loc.nbytes),
            (t.dtype, &t.shape, t.data.len() as u64)
        );
    }
    let pick = |names: &[&str]| -> Vec<&TensorData> {
        names
            .iter()
            .map(|n| *all.iter().find(|t| t.name == *n).unwrap())
            .collect()
    };
    let units = vec![
        ("a".to_string(), pick(&["a.w", "a.b", "a.norm"])),
        ("b".to_string(), pick(&["b.w", "b.b", "b.n", "c.w"])),
        (
            "c".to_string(),
            pick(&["c.b", "c.n", "huge", "zero", "scalar"]),
        ),
        ("f8".to_string(), pick(&["f8"])),
        ("all".to_string(), all.clone()),
    ];
    let b_layout = view
        .layout(
            "b",
            &units[1]
                .1
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    assert!(
        b_layout.extents.len() >= 3,
        "a 2 MiB gap splits a file's tensors: {:?}",
        b_layout.extents
    );
    read_and_compare(&view, &units);

    // The same files open one by one, and through the index file itself.
    let one = SafetensorsView::open(&view.files()[2]).unwrap();
    assert_eq!(one.tensors().len(), 3);
    read_and_compare(&one, &[("f8".to_string(), pick(&["f8", "huge"]))]);
    let via_index = SafetensorsView::open(dir.path().join("model.safetensors.index.json")).unwrap();
    assert_eq!(via_index.tensors().len(), all.len());

    assert!(matches!(
        view.layout("x", &["missing".to_string()]),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn single_file_checkpoint_directory_opens() {
    let dir = tempfile::tempdir().unwrap();
    let t = TensorData::new("w", DType::F32, &[9, 9], 1);
    let v = safetensors::tensor::TensorView::new(st_dtype(t.dtype), vec![9, 9], &t.data).unwrap();
    safetensors::serialize_to_file(vec![("w", v)], None, &dir.path().join("model.safetensors"))
        .unwrap();
    let view = SafetensorsView::open(dir.path()).unwrap();
    read_and_compare(&view, &[("u".to_string(), vec![&t])]);
}

fn tensor_strategy() -> impl Strategy<Value = (DType, Vec<u64>, u64, usize)> {
    (
        (0..DType::ALL.len()).prop_map(|i| DType::ALL[i]),
        prop::collection::vec(prop_oneof![1 => Just(0u64), 8 => 1u64..40], 0..3),
        any::<u64>(),
        0..3usize,
    )
}

#[test]
fn random_sharded_checkpoints_read_back() {
    let mut runner = runner(24);
    let shards_strategy =
        prop::collection::vec(prop::collection::vec(tensor_strategy(), 1..6), 1..4);
    runner
        .run(&shards_strategy, |spec| {
            let dir = tempfile::tempdir().unwrap();
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); 3];
            let mut shards = Vec::new();
            let mut k = 0;
            for (si, tensors) in spec.iter().enumerate() {
                let mut shard = Vec::new();
                for (ti, (d, shape, seed, group)) in tensors.iter().enumerate() {
                    shard.push(TensorData::new(&format!("s{si}.t{ti}"), *d, shape, *seed));
                    groups[*group].push(k);
                    k += 1;
                }
                shards.push(shard);
            }
            write_checkpoint(dir.path(), &shards);
            let view = SafetensorsView::open(dir.path()).unwrap();
            let all: Vec<&TensorData> = shards.iter().flatten().collect();
            let units: Vec<(String, Vec<&TensorData>)> = groups
                .iter()
                .enumerate()
                .filter(|(_, g)| !g.is_empty())
                .map(|(i, g)| (format!("unit{i}"), g.iter().map(|&j| all[j]).collect()))
                .collect();
            read_and_compare(&view, &units);
            Ok(())
        })
        .unwrap();
}

// ---------------------------------------------------------------------------------------
// Hostile checkpoints
// ---------------------------------------------------------------------------------------

/// Write a safetensors file by hand: the 8-byte length `n` (which may lie), the header
/// text, and `data_len` data bytes.
fn raw_file(path: &Path, n: u64, header: &str, data_len: usize) {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, b).unwrap();
}

fn honest_file(path: &Path, header: &str, data_len: usize) {
    raw_file(path, header.len() as u64, header, data_len);
}

fn expect_format<T>(r: tensorstream_core::Result<T>, what: &str) {
    match r {
        Err(Error::Format { .. }) => {}
        Err(e) => panic!("{what}: expected a format error, got {e:?}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

fn write_index(dir: &Path, map: &[(&str, &str)]) {
    let m: BTreeMap<&str, &str> = map.iter().copied().collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({ "weight_map": m })).unwrap(),
    )
    .unwrap();
}

const ONE_TENSOR: &str = r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;

#[test]
fn index_cannot_name_files_outside_the_checkpoint() {
    let outer = tempfile::tempdir().unwrap();
    let dir = outer.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    honest_file(&outer.path().join("x.safetensors"), ONE_TENSOR, 4);
    honest_file(&dir.join("ok.safetensors"), ONE_TENSOR, 4);

    write_index(&dir, &[("w", "../x.safetensors")]);
    expect_format(SafetensorsView::open(&dir), "parent directory");

    let abs = outer.path().join("x.safetensors");
    write_index(&dir, &[("w", abs.to_str().unwrap())]);
    expect_format(SafetensorsView::open(&dir), "absolute path");

    write_index(&dir, &[("w", "./../ckpt/../x.safetensors")]);
    expect_format(SafetensorsView::open(&dir), "dotted path");

    std::os::unix::fs::symlink(&abs, dir.join("link.safetensors")).unwrap();
    write_index(&dir, &[("w", "link.safetensors")]);
    expect_format(SafetensorsView::open(&dir), "symlink leading outside");

    write_index(&dir, &[("w", "ok.safetensors")]);
    let view = SafetensorsView::open(&dir).unwrap();
    assert_eq!(view.tensors().len(), 1);
}

#[test]
fn inconsistent_indexes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    honest_file(&d.join("a.safetensors"), ONE_TENSOR, 4);
    honest_file(
        &d.join("b.safetensors"),
        r#"{"v":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        4,
    );

    write_index(d, &[("w", "b.safetensors"), ("v", "b.safetensors")]);
    expect_format(
        SafetensorsView::open(d),
        "tensor in another shard than the index says",
    );

    honest_file(&d.join("c.safetensors"), ONE_TENSOR, 4);
    write_index(d, &[("w", "a.safetensors"), ("v", "c.safetensors")]);
    expect_format(SafetensorsView::open(d), "tensor in two shards");

    std::fs::write(d.join("model.safetensors.index.json"), b"{\"metadata\":{}}").unwrap();
    expect_format(SafetensorsView::open(d), "index without weight_map");

    std::fs::write(
        d.join("model.safetensors.index.json"),
        b"{\"weight_map\":{\"w\":3}}",
    )
    .unwrap();
    expect_format(SafetensorsView::open(d), "shard name not a string");

    std::fs::write(d.join("model.safetensors.index.json"), b"not json").unwrap();
    expect_format(SafetensorsView::open(d), "index not JSON");

    write_index(d, &[("w", "missing.safetensors")]);
    assert!(matches!(SafetensorsView::open(d), Err(Error::Io { .. })));

    let empty = tempfile::tempdir().unwrap();
    expect_format(SafetensorsView::open(empty.path()), "empty directory");
}

/// A named way of writing a hostile file.
type Writer<'a> = (&'static str, Box<dyn Fn() + 'a>);

#[test]
fn hostile_safetensors_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    let cases: Vec<Writer<'_>> = vec![
        ("empty file", Box::new(|| std::fs::write(&p, b"").unwrap())),
        (
            "7 bytes",
            Box::new(|| std::fs::write(&p, [1u8; 7]).unwrap()),
        ),
        (
            "header longer than the file",
            Box::new(|| raw_file(&p, 1000, ONE_TENSOR, 4)),
        ),
        (
            "header length u64::MAX",
            Box::new(|| raw_file(&p, u64::MAX, ONE_TENSOR, 4)),
        ),
        (
            "header length over the limit",
            Box::new(|| raw_file(&p, (100 << 20) + 1, ONE_TENSOR, 4)),
        ),
        (
            "header not JSON",
            Box::new(|| honest_file(&p, "{not json", 4)),
        ),
        ("header a list", Box::new(|| honest_file(&p, "[]", 4))),
        (
            "deep nesting",
            Box::new(|| honest_file(&p, &"[".repeat(100_000), 0)),
        ),
        (
            "tensor past the end",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[1000],"data_offsets":[0,1000]}}"#,
                    10,
                )
            }),
        ),
        (
            "offsets reversed",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                    4,
                )
            }),
        ),
        (
            "offsets overflow the file",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]}}"#,
                    4,
                )
            }),
        ),
        (
            "start offset overflows",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551614,18446744073709551615]}}"#,
                    4,
                )
            }),
        ),
        (
            "nbytes mismatch",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                    8,
                )
            }),
        ),
        (
            "shape overflows",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}}"#,
                    8,
                )
            }),
        ),
        (
            "17 dimensions",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"data_offsets":[0,1]}}"#,
                    1,
                )
            }),
        ),
        (
            "negative dimension",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                    1,
                )
            }),
        ),
        (
            "unknown dtype",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"F128","shape":[1],"data_offsets":[0,16]}}"#,
                    16,
                )
            }),
        ),
        (
            "no dtype",
            Box::new(|| honest_file(&p, r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#, 1)),
        ),
        (
            "three offsets",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}"#,
                    2,
                )
            }),
        ),
        (
            "overlapping tensors",
            Box::new(|| {
                honest_file(
                    &p,
                    r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                    6,
                )
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, write) in &cases {
        write();
        let r = std::panic::catch_unwind(|| match SafetensorsView::open(&p) {
            Err(Error::Format { .. }) => Ok(()),
            Err(e) => Err(format!("expected a format error, got {e:?}")),
            Ok(_) => Err("opened".to_string()),
        });
        match r {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(format!("{name}: {why}")),
            Err(_) => failures.push(format!("{name}: PANIC")),
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}
