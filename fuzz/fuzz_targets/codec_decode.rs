//! The chunk decoder of the `bytegroup` codec (`tensorstream_core::codec::Decoder`).
//!
//! Input byte 0 picks the mode of the execution (byte 0 % 3):
//! - 0: hostile decode. Byte 1 picks the chunk mode (raw, bg1, bg2, bg4, bg8, an
//!   invalid width, tb2, tb4), bytes 2..5 the raw length (up to 64 KiB, and in 1 of 256 inputs just
//!   past the chunk size), the rest is the stored bytes. Decoding answers Ok or an error string,
//!   never a panic, never a write outside the destination (ASan checks).
//! - 1: round trip. Byte 1 picks the element width (1, 2, 4, 8) and, with its bit 2,
//!   the table code instead of the byte-grouped one; the rest is the raw
//!   chunk; whatever the encoder keeps must decode to exactly the raw bytes.
//! - 2: encode, then corrupt. As 1, but bytes 2..6 say where to flip bits in the coded
//!   chunk (and whether to cut it short) before decoding: deep inputs for the decoder
//!   without hand-made coded seeds. Decoding must not panic; if it succeeds it must fill
//!   exactly the destination.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use tensorstream_core::codec::{ChunkMode, CodeFamily, Decoder, Encoder, CODEC_CHUNK};

thread_local! {
    static DEC: RefCell<Decoder> = RefCell::new(Decoder::new().expect("decoder"));
    static ENC: RefCell<Encoder> = RefCell::new(Encoder::new(1).expect("encoder"));
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mode_sel = data[0] % 3;
    if mode_sel == 0 {
        if data.len() < 5 {
            return;
        }
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
        // Mostly small destinations (fast), sometimes just past the chunk size.
        let len = if n % 256 != 1 {
            (n >> 8) % (1 << 16)
        } else {
            CODEC_CHUNK + (n >> 8) % 16
        };
        let stored = &data[5..];
        let mut dst = vec![0xa5u8; len as usize];
        let r = DEC.with(|d| d.borrow_mut().decode(mode, stored, &mut dst));
        if len > CODEC_CHUNK {
            assert!(r.is_err(), "decoded {len} bytes, more than a chunk");
        }
    } else {
        let corrupt = mode_sel == 2;
        let skip = if corrupt { 6 } else { 2 };
        if data.len() <= skip {
            return;
        }
        let width = [1u64, 2, 4, 8][(data[1] % 4) as usize];
        let family = if data[1] & 4 != 0 {
            CodeFamily::Table
        } else {
            CodeFamily::Bytegroup
        };
        let raw = &data[skip..];
        if raw.is_empty() {
            return;
        }
        let coded = ENC.with(|e| {
            let mut e = e.borrow_mut();
            e.encode_with(family, raw, width)
                .expect("encode of a valid chunk")
                .map(|mode| (mode, e.coded().to_vec()))
        });
        if let Some((mode, mut coded)) = coded {
            if corrupt {
                let pos = u16::from_le_bytes([data[2], data[3]]) as usize % coded.len();
                coded[pos] ^= data[4].max(1);
                if data[5] & 1 == 1 {
                    coded.truncate(pos + (data[5] >> 1) as usize);
                }
                let mut out = vec![0u8; raw.len()];
                let _ = DEC.with(|d| d.borrow_mut().decode(mode, &coded, &mut out));
                return;
            }
            let mut out = vec![0u8; raw.len()];
            DEC.with(|d| d.borrow_mut().decode(mode, &coded, &mut out))
                .unwrap_or_else(|e| panic!("round trip ({mode}): {e}"));
            assert!(out == raw, "round trip ({mode}) changed the bytes");
        }
    }
});
