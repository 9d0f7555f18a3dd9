//! The sharded index (`model.safetensors.index.json`) as the input, in a checkpoint
//! directory that holds two valid shards, a subdirectory with a third, a symlink to a file
//! outside the directory, and, outside, a valid safetensors file the index must never reach.
//! Whatever the view accepts must read only files inside the checkpoint directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tensorstream_core::store::SafetensorsView;
use tensorstream_fuzz::{check_and_read, expect_typed, scratch};

fn shard(path: &Path, names: &[&str]) {
    // Each tensor: U8, 4 elements, consecutive.
    let mut header = String::from("{");
    for (i, n) in names.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""{n}":{{"dtype":"U8","shape":[4],"data_offsets":[{},{}]}}"#,
            4 * i,
            4 * i + 4
        ));
    }
    header.push('}');
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend((0..4 * names.len()).map(|i| i as u8));
    std::fs::write(path, b).expect("write shard");
}

/// (checkpoint dir, its canonical form)
fn setup() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let root = scratch().join("index");
        let ckpt = root.join("ckpt");
        std::fs::create_dir_all(ckpt.join("sub")).expect("dirs");
        shard(&root.join("outside.safetensors"), &["a.w", "x.secret"]);
        shard(
            &ckpt.join("model-00001-of-00002.safetensors"),
            &["a.w", "a.v"],
        );
        shard(&ckpt.join("model-00002-of-00002.safetensors"), &["b.w"]);
        shard(&ckpt.join("sub").join("c.safetensors"), &["c.w"]);
        let link = ckpt.join("link.safetensors");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(root.join("outside.safetensors"), &link).expect("symlink");
        let inner_link = ckpt.join("inner.safetensors");
        let _ = std::fs::remove_file(&inner_link);
        std::os::unix::fs::symlink("model-00002-of-00002.safetensors", &inner_link)
            .expect("symlink");
        let canon = ckpt.canonicalize().expect("canonical");
        (ckpt, canon)
    })
}

fuzz_target!(|data: &[u8]| {
    let (ckpt, canon) = setup();
    std::fs::write(ckpt.join("model.safetensors.index.json"), data).expect("write input");
    match SafetensorsView::open(ckpt) {
        Ok(view) => {
            let mut lens = Vec::new();
            for f in view.files() {
                let c = f.canonicalize().expect("accepted shard exists");
                assert!(
                    c.starts_with(canon),
                    "index reached {} outside {}",
                    c.display(),
                    canon.display()
                );
                lens.push(std::fs::metadata(f).expect("stat").len());
            }
            assert!(
                !view.tensors().contains_key("x.secret"),
                "a tensor from outside was exposed"
            );
            let names: Vec<String> = view.tensors().keys().cloned().collect();
            if !names.is_empty() {
                let layout = view
                    .layout("unit", &names)
                    .expect("layout of listed tensors");
                check_and_read(&layout, &lens);
            }
        }
        Err(e) => expect_typed(&e),
    }
});
