//! Regression tests from fuzzing (`fuzz/`, see docs/reliability.md) and the hostile inputs
//! that the fuzz targets cannot reach.
//!
//! - Every fuzz seed (`fuzz/seeds/<target>/`) and every input kept after a crash
//!   (`fuzz/regressions/<target>/`, none so far: 1.2 million executions per target found no
//!   crash) is replayed through the same checks as its fuzz target, on the stable toolchain:
//!   the parser answers a typed error, or a view whose every byte range lies inside its files
//!   and reads back exactly the bytes the file holds there.
//! - The `store_semantics` seeds (programs for `fuzz/src/semantics.rs`, which this file
//!   includes): structurally valid stores with hostile manifests, read through the engine;
//!   a read that succeeds matches the unit's checksum and every tensor's digest.
//! - The codec seeds (`fuzz/seeds/codec_decode/`): hostile chunks decode to an error, never
//!   a panic; coded chunks round-trip exactly.
//! - Hostile checkpoint directories: a named pipe in place of a shard or store, the Hugging
//!   Face cache layout (shards that are symlinks into `../../blobs/`, allowed), and a
//!   directory merely named `snapshots/<x>` outside the cache (symlinks out still refused).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use tensorstream_core::codec::{ChunkMode, CodeFamily, Decoder, Encoder, CODEC_CHUNK};
use tensorstream_core::io::{AlignedBuf, PreadBackend, ReadBackend};
use tensorstream_core::store::{
    chunked_checksum, SafetensorsView, Store, UnitLayout, BLOCK, FORMAT_VERSION, MAGIC,
};
use tensorstream_core::Error;

/// The body of `fuzz/fuzz_targets/store_semantics.rs`, shared with it.
#[path = "../../../fuzz/src/semantics.rs"]
mod semantics;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The seeds and kept crash inputs of one fuzz target.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for sub in ["seeds", "regressions"] {
        let dir = fuzz_dir().join(sub).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_file() {
                let data = std::fs::read(&p).unwrap();
                out.push((p, data));
            }
        }
    }
    out.sort();
    out
}

fn expect_typed(what: &Path, e: &Error) {
    assert!(
        matches!(
            e,
            Error::Format { .. } | Error::Io { .. } | Error::Checksum { .. }
        ),
        "{}: untyped error {e:?}",
        what.display()
    );
}

/// The checks of `fuzz/src/lib.rs::check_and_read`: extents and coded chunks inside their
/// files, destination ranges disjoint and inside the buffer, tensors inside the bytes the
/// layout fills; then a read of every extent and chunk (decoded). Returns the buffer and
/// whether the checksum matched.
fn check_and_read(what: &Path, layout: &UnitLayout, file_lens: &[u64]) -> (AlignedBuf, bool) {
    let ctx = what.display();
    let mut dest: Vec<(u64, u64)> = Vec::new();
    for e in &layout.extents {
        let end = e.file_offset.checked_add(e.len).expect("extent end");
        assert!(
            end <= file_lens[e.file],
            "{ctx}: extent {e:?} past its file"
        );
        dest.push((e.dest_offset, e.dest_offset + e.len));
    }
    for c in &layout.chunks {
        let end = c.file_offset.checked_add(c.stored_len).expect("chunk end");
        assert!(end <= file_lens[c.file], "{ctx}: chunk {c:?} past its file");
        assert!(c.raw_len <= CODEC_CHUNK, "{ctx}: chunk {c:?} too large");
        dest.push((c.dest_offset, c.dest_offset + c.raw_len));
    }
    dest.sort();
    for w in dest.windows(2) {
        assert!(w[1].0 >= w[0].1, "{ctx}: destination ranges overlap: {w:?}");
    }
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in &dest {
        assert!(e <= layout.buffer_len, "{ctx}: range past the buffer");
        match merged.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => merged.push((s, e)),
        }
    }
    for t in &layout.tensors {
        assert_eq!(t.dtype.nbytes(&t.shape), Some(t.nbytes), "{ctx}: {t:?}");
        let end = t.offset + t.nbytes;
        if t.nbytes > 0 {
            assert!(
                merged.iter().any(|&(s, e)| t.offset >= s && end <= e),
                "{ctx}: tensor {t:?} outside the bytes the layout fills"
            );
        }
    }
    let backend = PreadBackend::new(false);
    let mut buf = AlignedBuf::new(layout.buffer_len.max(1) as usize);
    for e in &layout.extents {
        let s = e.dest_offset as usize;
        backend
            .read_into(
                &layout.files[e.file],
                e.file_offset,
                &mut buf[s..s + e.len as usize],
            )
            .unwrap_or_else(|err| panic!("{ctx}: in-bounds read failed: {err}"));
    }
    let mut ok = true;
    let mut dec = Decoder::new().unwrap();
    for c in &layout.chunks {
        let mut stored = vec![0u8; c.stored_len as usize];
        backend
            .read_into(&layout.files[c.file], c.file_offset, &mut stored)
            .unwrap_or_else(|err| panic!("{ctx}: in-bounds read failed: {err}"));
        let d = c.dest_offset as usize;
        ok &= dec
            .decode(c.mode, &stored, &mut buf[d..d + c.raw_len as usize])
            .is_ok();
    }
    if let Some(c) = layout.checksum {
        ok &= chunked_checksum(&buf[..c.covered as usize]) == c.value;
    }
    (buf, ok)
}

#[test]
fn store_open_inputs_replay() {
    let cases = inputs("store_open");
    assert!(!cases.is_empty(), "no seeds under fuzz/seeds/store_open");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input.tstore");
    let mut opened = 0;
    for (what, data) in &cases {
        std::fs::write(&path, data).unwrap();
        match Store::open(&path) {
            Ok(store) => {
                opened += 1;
                for i in 0..store.manifest().units.len() {
                    let layout = store.layout(i).unwrap();
                    let (_, ok) = check_and_read(what, &layout, &[store.file_len()]);
                    // Seeds are valid stores: their data decodes and verifies.
                    if what.starts_with(fuzz_dir().join("seeds")) {
                        assert!(ok, "{}: unit {i} does not verify", what.display());
                    }
                }
            }
            Err(e) => expect_typed(what, &e),
        }
    }
    assert!(opened >= 1, "no valid store among the seeds");
}

#[test]
fn store_semantics_inputs_replay() {
    let cases = inputs("store_semantics");
    assert!(cases.len() >= 10, "seeds under fuzz/seeds/store_semantics");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("semantics.tstore");
    let engine = tensorstream_core::Engine::new(
        std::sync::Arc::new(PreadBackend::new(false)),
        tensorstream_core::EngineConfig {
            num_threads: 2,
            chunk_bytes: 4 << 20,
        },
    )
    .unwrap();
    for (what, data) in &cases {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            semantics::run(&engine, &path, data)
        }));
        assert!(
            r.is_ok(),
            "{}: the fuzz target's checks failed",
            what.display()
        );
    }
    // The swapped pair with its digests must be caught by the read, the plain store must
    // read: the target's oracle is not vacuous.
    for (seed, reads) in [
        ("plain", true),
        ("swap_names_and_digests", false),
        ("coded_swap_names_and_digests", false),
        ("big_swap_names_and_digests", false),
        ("old_store", true),
    ] {
        let data =
            std::fs::read(fuzz_dir().join(format!("seeds/store_semantics/{seed}.bin"))).unwrap();
        semantics::run(&engine, &path, &data);
        engine.backend().close_all();
        let store = Store::open(&path).unwrap();
        let layout = store.layout(0).unwrap();
        let mut buf = AlignedBuf::new(layout.buffer_len as usize);
        // SAFETY: buf outlives the wait; nobody else touches it.
        let r = unsafe {
            engine.submit(
                &layout,
                buf.as_mut_ptr(),
                buf.len(),
                tensorstream_core::Priority::Demand,
            )
        }
        .and_then(|t| engine.wait(&t));
        match (reads, r) {
            (true, Ok(())) => {}
            (
                false,
                Err(Error::Checksum {
                    tensor: Some(_), ..
                }),
            ) => {}
            (_, other) => panic!("{seed}: {other:?}"),
        }
    }
}

#[test]
fn store_manifest_inputs_replay() {
    let cases = inputs("store_manifest");
    assert!(!cases.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("manifest.tstore");
    let mut opened = 0;
    for (what, data) in &cases {
        if data.len() < 2 {
            continue;
        }
        // The framing of fuzz_targets/store_manifest.rs.
        let (blocks, slack, manifest) = (data[0] as u64, data[1] as u64, &data[2..]);
        let manifest_offset = BLOCK + blocks * BLOCK + slack;
        let file_len = manifest_offset + manifest.len() as u64;
        let mut header = [0u8; 64];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[16..24].copy_from_slice(&manifest_offset.to_le_bytes());
        header[24..32].copy_from_slice(&(manifest.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(manifest).to_le_bytes());
        header[40..48].copy_from_slice(&file_len.to_le_bytes());
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(file_len).unwrap();
        f.write_all_at(&header, 0).unwrap();
        f.write_all_at(manifest, manifest_offset).unwrap();
        drop(f);
        match Store::open(&path) {
            Ok(store) => {
                opened += 1;
                for i in 0..store.manifest().units.len() {
                    check_and_read(what, &store.layout(i).unwrap(), &[file_len]);
                }
            }
            Err(e) => expect_typed(what, &e),
        }
    }
    assert!(opened >= 1, "no valid manifest among the seeds");
}

#[test]
fn safetensors_header_inputs_replay() {
    let cases = inputs("safetensors_header");
    assert!(!cases.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let mut opened = 0;
    for (what, data) in &cases {
        std::fs::write(dir.path().join("model.safetensors"), data).unwrap();
        match SafetensorsView::open(dir.path()) {
            Ok(view) => {
                opened += 1;
                let names: Vec<String> = view.tensors().keys().cloned().collect();
                if names.is_empty() {
                    continue;
                }
                let layout = view.layout("unit", &names).unwrap();
                let (buf, _) = check_and_read(what, &layout, &[data.len() as u64]);
                for slot in &layout.tensors {
                    let loc = &view.tensors()[&slot.name];
                    let want = &data[loc.offset as usize..(loc.offset + loc.nbytes) as usize];
                    let got = &buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize];
                    assert_eq!(want, got, "{}: tensor {}", what.display(), slot.name);
                }
            }
            Err(e) => expect_typed(what, &e),
        }
    }
    assert!(opened >= 1);
}

/// The framing of fuzz_targets/codec_decode.rs: 0 hostile decode, 1 round trip, 2 encode
/// then corrupt.
#[test]
fn codec_decode_inputs_replay() {
    let cases = inputs("codec_decode");
    assert!(!cases.is_empty());
    let mut dec = Decoder::new().unwrap();
    let mut enc = Encoder::new(1).unwrap();
    let mut round_trips = 0;
    for (what, data) in &cases {
        if data.len() < 2 {
            continue;
        }
        let ctx = what.display();
        match data[0] % 3 {
            0 if data.len() >= 5 => {
                let mode = match data[1] % 9 {
                    0 => ChunkMode::Raw,
                    1 => ChunkMode::Grouped { width: 1 },
                    2 => ChunkMode::Grouped { width: 2 },
                    3 => ChunkMode::Grouped { width: 4 },
                    4 => ChunkMode::Grouped { width: 8 },
                    5 => ChunkMode::Grouped { width: 3 },
                    6 => ChunkMode::Grouped { width: data[1] },
                    7 => ChunkMode::Table { width: 2 },
                    _ => ChunkMode::Table { width: 4 },
                };
                let n = u32::from_le_bytes([data[2], data[3], data[4], 0]) as u64;
                let len = if n % 256 != 1 {
                    (n >> 8) % (1 << 16)
                } else {
                    CODEC_CHUNK + (n >> 8) % 16
                };
                let mut dst = vec![0u8; len as usize];
                let r = dec.decode(mode, &data[5..], &mut dst);
                assert!(
                    len <= CODEC_CHUNK || r.is_err(),
                    "{ctx}: decoded past a chunk"
                );
            }
            m @ (1 | 2) => {
                let skip = if m == 2 { 6 } else { 2 };
                if data.len() <= skip {
                    continue;
                }
                let raw = &data[skip..];
                let width = [1u64, 2, 4, 8][(data[1] % 4) as usize];
                let family = if data[1] & 4 != 0 {
                    CodeFamily::Table
                } else {
                    CodeFamily::Bytegroup
                };
                let Some(mode) = enc.encode_with(family, raw, width).unwrap() else {
                    continue;
                };
                let mut coded = enc.coded().to_vec();
                let mut out = vec![0u8; raw.len()];
                if m == 2 {
                    let pos = u16::from_le_bytes([data[2], data[3]]) as usize % coded.len();
                    coded[pos] ^= data[4].max(1);
                    if data[5] & 1 == 1 {
                        coded.truncate(pos + (data[5] >> 1) as usize);
                    }
                    let _ = dec.decode(mode, &coded, &mut out);
                } else {
                    dec.decode(mode, &coded, &mut out)
                        .unwrap_or_else(|e| panic!("{ctx}: round trip: {e}"));
                    assert!(out == raw, "{ctx}: round trip changed the bytes");
                    round_trips += 1;
                }
            }
            _ => {}
        }
    }
    assert!(round_trips >= 1, "no seed was coded");
}

/// A safetensors file of U8 tensors of 4 bytes each, consecutive.
fn shard(path: &Path, names: &[&str]) {
    let entries: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            format!(
                r#""{n}":{{"dtype":"U8","shape":[4],"data_offsets":[{},{}]}}"#,
                4 * i,
                4 * i + 4
            )
        })
        .collect();
    let header = format!("{{{}}}", entries.join(","));
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend((0..4 * names.len()).map(|i| i as u8));
    std::fs::write(path, b).unwrap();
}

#[test]
fn safetensors_index_inputs_replay() {
    let cases = inputs("safetensors_index");
    assert!(!cases.is_empty());
    // The directory of fuzz_targets/safetensors_index.rs.
    let root = tempfile::tempdir().unwrap();
    let ckpt = root.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("sub")).unwrap();
    shard(
        &root.path().join("outside.safetensors"),
        &["a.w", "x.secret"],
    );
    shard(
        &ckpt.join("model-00001-of-00002.safetensors"),
        &["a.w", "a.v"],
    );
    shard(&ckpt.join("model-00002-of-00002.safetensors"), &["b.w"]);
    shard(&ckpt.join("sub").join("c.safetensors"), &["c.w"]);
    std::os::unix::fs::symlink(
        root.path().join("outside.safetensors"),
        ckpt.join("link.safetensors"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "model-00002-of-00002.safetensors",
        ckpt.join("inner.safetensors"),
    )
    .unwrap();
    let canon = ckpt.canonicalize().unwrap();
    let mut opened = 0;
    for (what, data) in &cases {
        std::fs::write(ckpt.join("model.safetensors.index.json"), data).unwrap();
        match SafetensorsView::open(&ckpt) {
            Ok(view) => {
                opened += 1;
                let mut lens = Vec::new();
                for f in view.files() {
                    let c = f.canonicalize().unwrap();
                    assert!(
                        c.starts_with(&canon),
                        "{}: reached {}",
                        what.display(),
                        c.display()
                    );
                    lens.push(std::fs::metadata(f).unwrap().len());
                }
                assert!(!view.tensors().contains_key("x.secret"));
                let names: Vec<String> = view.tensors().keys().cloned().collect();
                if !names.is_empty() {
                    check_and_read(what, &view.layout("unit", &names).unwrap(), &lens);
                }
            }
            Err(e) => expect_typed(what, &e),
        }
    }
    assert!(opened >= 2, "the valid seeds should open");
}

/// Run `f` on a thread; None if it has not returned within `secs` (it is left blocked).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo reads it only.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

/// Release a reader blocked opening `path` (a FIFO): open it for writing, then close.
fn unblock(path: &Path) {
    let _ = std::fs::OpenOptions::new().write(true).open(path);
}

#[test]
fn named_pipe_as_shard_or_store_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    mkfifo(&d.join("model-00001-of-00001.safetensors"));
    std::fs::write(
        d.join("model.safetensors.index.json"),
        br#"{"weight_map":{"w":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    let d2 = d.clone();
    let r = within(5, move || SafetensorsView::open(&d2).map(|_| ()));
    if r.is_none() {
        unblock(&d.join("model-00001-of-00001.safetensors"));
    }
    match r {
        Some(Err(Error::Format { .. })) | Some(Err(Error::Io { .. })) => {}
        Some(other) => panic!("a FIFO shard gave {other:?}"),
        None => panic!("SafetensorsView::open blocked on a FIFO shard"),
    }

    let store = d.join("model.tstore");
    mkfifo(&store);
    let s2 = store.clone();
    let r = within(5, move || Store::open(&s2).map(|_| ()));
    if r.is_none() {
        unblock(&store);
    }
    match r {
        Some(Err(Error::Format { .. })) | Some(Err(Error::Io { .. })) => {}
        Some(other) => panic!("a FIFO store gave {other:?}"),
        None => panic!("Store::open blocked on a FIFO"),
    }
}

/// The Hugging Face cache: `models--org--name/snapshots/<commit>/` holds symlinks into
/// `../../blobs/`. `resolve_checkpoint()` hands such a snapshot directory to the view.
fn hf_cache_snapshot(root: &Path, sharded: bool) -> PathBuf {
    let repo = root.join("models--org--tiny");
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join("a".repeat(40));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    let link = |blob: &str, name: &str| {
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(name)).unwrap();
    };
    if sharded {
        shard(&blobs.join("1111"), &["model.layers.0.w"]);
        shard(&blobs.join("2222"), &["model.layers.1.w"]);
        std::fs::write(
            blobs.join("3333"),
            br#"{"weight_map":{"model.layers.0.w":"model-00001-of-00002.safetensors","model.layers.1.w":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        link("1111", "model-00001-of-00002.safetensors");
        link("2222", "model-00002-of-00002.safetensors");
        link("3333", "model.safetensors.index.json");
    } else {
        shard(&blobs.join("4444"), &["model.layers.0.w"]);
        link("4444", "model.safetensors");
    }
    snap
}

#[test]
fn hf_cache_single_file_snapshot_opens() {
    let root = tempfile::tempdir().unwrap();
    let snap = hf_cache_snapshot(root.path(), false);
    let view = SafetensorsView::open(&snap).unwrap();
    assert_eq!(view.tensors().len(), 1);
}

#[test]
fn hf_cache_sharded_snapshot_opens() {
    let root = tempfile::tempdir().unwrap();
    let snap = hf_cache_snapshot(root.path(), true);
    let view = SafetensorsView::open(&snap).unwrap();
    assert_eq!(view.tensors().len(), 2);
}

#[test]
fn snapshots_named_directory_outside_the_hf_cache_still_refuses_symlinks_out() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let ckpt = data.join("snapshots").join("mine");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::create_dir_all(data.join("other")).unwrap();
    shard(&data.join("other").join("x.safetensors"), &["w"]);
    std::os::unix::fs::symlink(
        data.join("other").join("x.safetensors"),
        ckpt.join("model-00001-of-00001.safetensors"),
    )
    .unwrap();
    std::fs::write(
        ckpt.join("model.safetensors.index.json"),
        br#"{"weight_map":{"w":"model-00001-of-00001.safetensors"}}"#,
    )
    .unwrap();
    match SafetensorsView::open(&ckpt) {
        Err(Error::Format { .. }) => {}
        other => panic!("a symlink leading out of the checkpoint directory gave {other:?}"),
    }
}
