//! The I/O backends on their own: any byte range of a file, into a destination of any
//! alignment, reads back exactly; O_DIRECT takes the bounce path for unaligned heads and
//! tails and falls back (visibly) only when the destination cannot be aligned.

mod common;

use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use tensorstream_core::io::{AlignedBuf, MmapBackend, PreadBackend, ReadBackend};
use tensorstream_core::Error;

#[test]
fn any_range_into_any_alignment_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    let len = 3 * 4096 * 5 + 1234;
    let data = bytes(42, len);
    std::fs::write(&path, &data).unwrap();
    let direct = Arc::new(PreadBackend::new(true));
    let others: Vec<(&str, Arc<dyn ReadBackend>)> = vec![
        ("mmap", Arc::new(MmapBackend::new())),
        ("pread-buffered", Arc::new(PreadBackend::new(false))),
        ("pread", direct.clone()),
    ];
    let strategy = (0..len, 0..20_000usize, any::<bool>(), 0..4096usize);
    runner(256)
        .run(&strategy, |(offset, want, congruent, shift)| {
            let n = want.min(len - offset);
            // A destination congruent to the file offset can take the direct path.
            let shift = if congruent { offset % 4096 } else { shift };
            let mut buf = AlignedBuf::new(shift + n);
            for (name, b) in &others {
                buf.fill(0xEE);
                let before = direct.stats().buffered_fallback_bytes;
                b.read_into(&path, offset as u64, &mut buf[shift..shift + n])
                    .unwrap();
                prop_assert!(
                    buf[shift..] == data[offset..offset + n],
                    "{name}: {n} bytes at {offset} into +{shift}"
                );
                if *name == "pread" && congruent && n >= 4096 {
                    let s = direct.stats();
                    if s.direct_refused_files == 0 {
                        prop_assert_eq!(s.buffered_fallback_bytes, before, "direct path taken");
                    }
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn reads_past_the_end_fail_with_unexpected_eof() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.bin");
    std::fs::write(&path, bytes(1, 10_000)).unwrap();
    let backends: Vec<(&str, Arc<dyn ReadBackend>)> = vec![
        ("mmap", Arc::new(MmapBackend::new())),
        ("pread-buffered", Arc::new(PreadBackend::new(false))),
        ("pread", Arc::new(PreadBackend::new(true))),
    ];
    for (name, b) in &backends {
        for (offset, n) in [
            (9_999u64, 2usize),
            (10_000, 1),
            (0, 10_001),
            (8192, 4096),
            (4096, 8192),
            (20_000, 10),
        ] {
            let mut buf = AlignedBuf::new(n);
            match b.read_into(&path, offset, &mut buf) {
                Err(Error::Io { source, .. }) => {
                    assert_eq!(
                        source.kind(),
                        std::io::ErrorKind::UnexpectedEof,
                        "{name} {offset}+{n}"
                    )
                }
                other => panic!("{name} {offset}+{n}: {other:?}"),
            }
        }
        // Exactly up to the end is fine.
        let mut buf = AlignedBuf::new(10_000 - 8192);
        b.read_into(&path, 8192, &mut buf).unwrap();
        let mut none = AlignedBuf::new(0);
        b.read_into(&path, 10_000, &mut none).unwrap();
    }
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let backends: Vec<Arc<dyn ReadBackend>> = vec![
        Arc::new(MmapBackend::new()),
        Arc::new(PreadBackend::new(true)),
    ];
    for b in backends {
        let mut buf = AlignedBuf::new(4096);
        match b.read_into(std::path::Path::new("/nonexistent/x.bin"), 0, &mut buf) {
            Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("/nonexistent/x.bin")),
            other => panic!("{other:?}"),
        }
    }
}

/// The test binaries' allocation limit works (so the hostile-input tests would notice a
/// huge allocation instead of getting lazily zeroed pages from overcommit).
#[test]
fn oversized_allocations_are_refused_in_tests() {
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve_exact(512 << 20).is_err());
    assert!(v.try_reserve_exact(1 << 20).is_ok());
}
