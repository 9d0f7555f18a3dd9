//! A single safetensors file as the input (8-byte header length, JSON header, data),
//! opened as `model.safetensors` in a checkpoint directory. Whatever the view accepts must
//! place every tensor inside the file, and reading a unit made of all its tensors must give
//! back exactly the file's bytes at each tensor's offsets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tensorstream_core::store::SafetensorsView;
use tensorstream_fuzz::{check_and_read, expect_typed, scratch};

fuzz_target!(|data: &[u8]| {
    let dir = scratch().join("single");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("model.safetensors"), data).expect("write input");
    match SafetensorsView::open(&dir) {
        Ok(view) => {
            assert_eq!(view.files().len(), 1);
            let names: Vec<String> = view.tensors().keys().cloned().collect();
            for (name, loc) in view.tensors() {
                let end = loc.offset.checked_add(loc.nbytes).expect("end overflows");
                assert!(
                    end <= data.len() as u64,
                    "tensor {name} {loc:?} past the input"
                );
                assert!(loc.offset >= 8, "tensor {name} inside the length prefix");
                assert_eq!(loc.dtype.nbytes(&loc.shape), Some(loc.nbytes));
            }
            if names.is_empty() {
                return;
            }
            let layout = view
                .layout("unit", &names)
                .expect("layout of listed tensors");
            let Some((buf, _)) = check_and_read(&layout, &[data.len() as u64]) else {
                return;
            };
            for slot in &layout.tensors {
                let loc = &view.tensors()[&slot.name];
                let want = &data[loc.offset as usize..(loc.offset + loc.nbytes) as usize];
                let got = &buf[slot.offset as usize..(slot.offset + slot.nbytes) as usize];
                assert!(want == got, "tensor {} read back wrong bytes", slot.name);
            }
        }
        Err(e) => expect_typed(&e),
    }
});
