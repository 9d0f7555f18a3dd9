//! Structurally valid stores (valid JSON, correct manifest checksum) with hostile content:
//! the input picks a store for `StoreWriter` to write, then edits of its manifest (names
//! swapped or duplicated, dtypes relabelled, shapes against nbytes, overlapping or
//! out-of-range tensors, digests wrong). `Store::open` accepts or refuses it with a typed
//! error; every unit it accepts is read through the engine (into a buffer, and faulted in
//! from a mapping), and a read that succeeds has bytes matching the unit's checksum and
//! every tensor's digest. See `src/semantics.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tensorstream_core::io::PreadBackend;
use tensorstream_core::{Engine, EngineConfig};
use tensorstream_fuzz::{scratch, semantics};

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        Engine::new(
            Arc::new(PreadBackend::new(false)),
            EngineConfig {
                num_threads: 2,
                chunk_bytes: 4 << 20,
            },
        )
        .expect("engine")
    })
}

fuzz_target!(|data: &[u8]| {
    semantics::run(engine(), &scratch().join("semantics.tstore"), data);
});
