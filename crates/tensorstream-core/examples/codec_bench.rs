//! Codec speed by stage on random-normal weights, one thread:
//! `cargo run --release -p tensorstream-core --example codec_bench -- [MIB (64)]`.
//!
//! Prints, per dtype: ratio, whole-chunk decode GB/s (raw bytes out), and the time split
//! between decoding the entropy-coded planes and the rest (interleaving the planes, and
//! joining split planes' low bits).

use std::time::Instant;
use tensorstream_core::codec::{self, huffman, split, ChunkMode, Decoder, PlaneCoder};

fn normals(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    let mut uni = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (a, b) = (uni(), uni());
            ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos() * 0.02) as f32
        })
        .collect()
}

fn f32_to_f16(v: f32) -> u16 {
    // Round-to-nearest for normal values, flush tiny ones to zero: enough for a benchmark.
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    if exp <= 0 {
        return sign;
    }
    let man = (b & 0x7f_ffff) + 0x1000;
    let (exp, man) = if man & 0x80_0000 != 0 {
        (exp + 1, 0)
    } else {
        (exp, man)
    };
    sign | ((exp as u16) << 10) | (man >> 13) as u16
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map_or(64, |s| s.parse().expect("MIB"));
    let n = (mib << 20) / 2;
    let vals = normals(n, 42);
    for (name, width) in [("bfloat16", 2u64), ("float16", 2), ("float32", 4)] {
        let raw: Vec<u8> = match name {
            "bfloat16" => vals
                .iter()
                .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            "float16" => vals
                .iter()
                .flat_map(|v| f32_to_f16(*v).to_le_bytes())
                .collect(),
            _ => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let raw = &raw[..mib << 20];
        let coded = codec::encode_all(raw, width, 3).expect("encode");
        let stored: usize = coded.iter().map(|c| c.1.len()).sum();
        let mut out = vec![0u8; raw.len()];
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            let mut dec = Decoder::new().expect("decoder");
            for ((mode, s), o) in coded
                .iter()
                .zip(out.chunks_mut(codec::CODEC_CHUNK as usize))
            {
                dec.decode(*mode, s, o).expect("decode");
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        assert!(out == raw, "{name}: round trip differs");
        // The entropy-coded planes alone (Huffman, and the Huffman part of split planes).
        let mut huff_s = f64::MAX;
        let mut plane_out = vec![0u8; codec::CODEC_CHUNK as usize];
        for _ in 0..20 {
            let t = Instant::now();
            for (mode, s) in &coded {
                let ChunkMode::Grouped { width } = mode else {
                    continue;
                };
                let w = *width as usize;
                let plane_len = (codec::CODEC_CHUNK as usize) / w;
                let mut pos = 5 * w;
                for k in 0..w {
                    let tag = s[5 * k];
                    let len =
                        u32::from_le_bytes(s[5 * k + 1..5 * k + 5].try_into().unwrap()) as usize;
                    let (payload, out) = (&s[pos..pos + len], &mut plane_out[..plane_len]);
                    if tag == PlaneCoder::Huffman as u8 {
                        huffman::decode(payload, out).unwrap();
                    } else if tag == PlaneCoder::Split as u8 {
                        split::decode_high(payload, out).unwrap();
                    }
                    pos += len;
                }
            }
            huff_s = huff_s.min(t.elapsed().as_secs_f64());
        }
        let gb = raw.len() as f64 / 1e9;
        println!(
            "{name:9} ratio {:.3}  decode {:.2} GB/s ({:.1} ms)  entropy-coded planes {:.1} ms  rest {:.1} ms",
            raw.len() as f64 / stored as f64,
            gb / best,
            best * 1e3,
            huff_s * 1e3,
            (best - huff_s) * 1e3
        );
    }
}
