//! The manifest as the input, wrapped in a correct header (magic, version, manifest range,
//! manifest checksum and file length), so every execution reaches the manifest parser and
//! validator instead of stopping at the checksum.
//!
//! Input: byte 0 = data blocks (0..=255 blocks of 4 KiB), byte 1 = extra bytes before the
//! manifest (an unaligned manifest offset), the rest = the manifest JSON. The data region is
//! a sparse file filled with a byte pattern at its first block.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::FileExt;
use tensorstream_core::store::{Store, BLOCK, FORMAT_VERSION, MAGIC};
use tensorstream_fuzz::{check_and_read, expect_typed, scratch};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let blocks = data[0] as u64;
    let slack = data[1] as u64;
    let manifest = &data[2..];
    let manifest_offset = BLOCK + blocks * BLOCK + slack;
    let file_len = manifest_offset + manifest.len() as u64;

    let mut header = [0u8; 64];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&manifest_offset.to_le_bytes());
    header[24..32].copy_from_slice(&(manifest.len() as u64).to_le_bytes());
    header[32..40].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(manifest).to_le_bytes());
    header[40..48].copy_from_slice(&file_len.to_le_bytes());

    let path = scratch().join("manifest.tstore");
    let f = std::fs::File::create(&path).expect("create input");
    f.set_len(file_len).expect("set_len");
    f.write_all_at(&header, 0).expect("header");
    if blocks > 0 {
        let pattern: Vec<u8> = (0..BLOCK as usize).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&pattern, BLOCK).expect("data");
    }
    f.write_all_at(manifest, manifest_offset).expect("manifest");
    drop(f);

    match Store::open(&path) {
        Ok(store) => {
            for i in 0..store.manifest().units.len() {
                let layout = store.layout(i).expect("layout of a listed unit");
                check_and_read(&layout, &[file_len]);
            }
        }
        Err(e) => expect_typed(&e),
    }
});
