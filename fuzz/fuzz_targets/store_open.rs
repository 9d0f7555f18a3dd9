//! The whole store file as the input: header, data and manifest. Whatever `Store::open`
//! accepts must describe only byte ranges inside the file; everything else is a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream_core::store::Store;
use tensorstream_fuzz::{check_and_read, expect_typed, scratch};

fuzz_target!(|data: &[u8]| {
    let path = scratch().join("input.tstore");
    std::fs::write(&path, data).expect("write input");
    match Store::open(&path) {
        Ok(store) => {
            assert_eq!(store.file_len(), data.len() as u64);
            for i in 0..store.manifest().units.len() {
                let layout = store.layout(i).expect("layout of a listed unit");
                check_and_read(&layout, &[store.file_len()]);
            }
        }
        Err(e) => expect_typed(&e),
    }
});
