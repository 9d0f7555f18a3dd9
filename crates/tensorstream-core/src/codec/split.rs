//! The split plane coder: a plane's top six bits coded with [`huffman`], its low two bits
//! packed apart, raw.
//!
//! fp16's high byte holds the sign, five exponent bits and two mantissa bits: about 5.5
//! bits of entropy, so its byte-wise Huffman code decodes fewer than two symbols per table
//! lookup. Its top six bits (sign and exponent) carry about 3.5 bits and decode about three
//! per lookup, and the two mantissa bits are nearly random anyway: the split codes within
//! about 1% of the byte-wise size and decodes about twice as fast.
//!
//! Payload, for a plane of `m` bytes:
//!
//! ```text
//! u32 LE L                 length of the Huffman payload
//! L bytes                  huffman payload of the m values byte >> 2 (each below 64)
//! ceil(m / 64) * 16 bytes  the low two bits: those of byte i = 64 b + 16 q + j are bits
//!                          2q..2q+2 of packed byte 16 b + j (missing bytes: zero bits)
//! ```
//!
//! The packing puts each group of 16 consecutive bytes' low bits at one shift of 16
//! consecutive packed bytes, which a vector unit joins in a few instructions.

use super::huffman;

/// Bytes of the packed low bits of a plane of `m` bytes.
pub const fn packed_len(m: usize) -> usize {
    m.div_ceil(64) * 16
}

/// Bytes of the payload for a plane of `m` bytes whose six-bit values code to `huffman`
/// bytes.
pub const fn encoded_size(m: usize, huffman: usize) -> usize {
    4 + huffman + packed_len(m)
}

/// The low two bits of byte `i`, from the packed bytes.
#[inline(always)]
fn low_bits(packed: &[u8], i: usize) -> u8 {
    (packed[16 * (i / 64) + i % 16] >> (2 * ((i % 64) / 16))) & 3
}

/// Append `plane` coded to `out`, its six-bit values coded with the lengths `lens6` (from
/// [`huffman::code_lengths`] of their histogram).
pub fn encode(plane: &[u8], lens6: &[u8; 256], out: &mut Vec<u8>) {
    let high: Vec<u8> = plane.iter().map(|b| b >> 2).collect();
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    huffman::encode(&high, lens6, out);
    let len = (out.len() - at - 4) as u32;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    let start = out.len();
    out.resize(start + packed_len(plane.len()), 0);
    let packed = &mut out[start..];
    for (i, &b) in plane.iter().enumerate() {
        packed[16 * (i / 64) + i % 16] |= (b & 3) << (2 * ((i % 64) / 16));
    }
}

/// Decode a payload's six-bit values into `high` (the plane's length) and return its
/// packed low bits, checked to be as long as the plane needs.
pub fn decode_high<'a>(payload: &'a [u8], high: &mut [u8]) -> Result<&'a [u8], String> {
    let Some((len, rest)) = payload.split_first_chunk::<4>() else {
        return Err(format!(
            "split plane of {} bytes is shorter than its 4-byte header",
            payload.len()
        ));
    };
    let len = u32::from_le_bytes(*len) as usize;
    let packed = packed_len(high.len());
    if rest.len() != len.saturating_add(packed) {
        return Err(format!(
            "split plane of {} bytes, but its Huffman part of {len} bytes and {packed} \
             bytes of low bits for {} values make {}",
            payload.len(),
            high.len(),
            4usize.saturating_add(len).saturating_add(packed)
        ));
    }
    let (coded, packed) = rest.split_at(len);
    huffman::decode(coded, high)?;
    Ok(packed)
}

/// Decode a payload made by [`encode`] into `out` (the plane's length).
pub fn decode(payload: &[u8], out: &mut [u8]) -> Result<(), String> {
    let packed = decode_high(payload, out)?;
    for (i, b) in out.iter_mut().enumerate() {
        *b = (*b << 2) | low_bits(packed, i);
    }
    Ok(())
}

/// Interleave a 2-byte element's planes into `dst`, the high plane given split:
/// `dst[2i] = low[i]`, `dst[2i + 1] = high6[i] << 2 | low bits i` (`packed` from
/// [`decode_high`]). `dst` is twice as long as `low` and `high6`.
pub fn interleave_low_high(low: &[u8], high6: &[u8], packed: &[u8], dst: &mut [u8]) {
    let m = low.len();
    assert!(high6.len() == m && dst.len() == 2 * m && packed.len() == packed_len(m));
    let done = simd::interleave_low_high(low, high6, packed, dst);
    for i in done..m {
        dst[2 * i] = low[i];
        dst[2 * i + 1] = (high6[i] << 2) | low_bits(packed, i);
    }
}

/// SSE2 (part of every x86_64 CPU): whole blocks of 64 elements. Returns how many elements
/// it wrote.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cvtsi32_si128, _mm_loadu_si128, _mm_or_si128, _mm_set1_epi8,
        _mm_slli_epi16, _mm_srl_epi16, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8,
    };

    pub fn interleave_low_high(low: &[u8], high6: &[u8], packed: &[u8], dst: &mut [u8]) -> usize {
        let blocks = (low.len().min(high6.len()).min(dst.len() / 2) / 64).min(packed.len() / 16);
        for b in 0..blocks {
            // SAFETY: b < blocks, so the 16 packed bytes at 16 b, the 64 bytes of `low` and
            // `high6` at 64 b and the 128 bytes of `dst` at 128 b are in bounds (checked
            // against each slice's length above); unaligned loads and stores are allowed.
            unsafe {
                let v = _mm_loadu_si128(packed.as_ptr().add(16 * b) as *const __m128i);
                let (three, top6) = (_mm_set1_epi8(3), _mm_set1_epi8(0xfc_u8 as i8));
                for q in 0..4 {
                    let i = 64 * b + 16 * q;
                    let lo = _mm_loadu_si128(low.as_ptr().add(i) as *const __m128i);
                    let h = _mm_loadu_si128(high6.as_ptr().add(i) as *const __m128i);
                    // 16-bit shifts: bits crossing between the two bytes of a lane are
                    // masked off, so each byte is shifted on its own.
                    let bits =
                        _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(2 * q as i32)), three);
                    let hi = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(h, 2), top6), bits);
                    let d = dst.as_mut_ptr().add(2 * i) as *mut __m128i;
                    _mm_storeu_si128(d, _mm_unpacklo_epi8(lo, hi));
                    _mm_storeu_si128(d.add(1), _mm_unpackhi_epi8(lo, hi));
                }
            }
        }
        64 * blocks
    }
}

/// Other targets: everything element by element.
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn interleave_low_high(_: &[u8], _: &[u8], _: &[u8], _: &mut [u8]) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coded(plane: &[u8]) -> Vec<u8> {
        let mut freq = [0u64; 256];
        for &b in plane {
            freq[(b >> 2) as usize] += 1;
        }
        let mut out = Vec::new();
        encode(plane, &huffman::code_lengths(&freq), &mut out);
        out
    }

    #[test]
    fn round_trips_alone_and_interleaved_at_every_length_near_a_block() {
        let mut x = 11u64;
        for m in [0usize, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1000, 4099] {
            let plane: Vec<u8> = (0..m)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let payload = coded(&plane);
            let huffman_len = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
            assert_eq!(payload.len(), 4 + huffman_len + packed_len(m));
            let mut back = vec![0u8; m];
            decode(&payload, &mut back).unwrap();
            assert_eq!(back, plane, "{m} bytes");
            let low: Vec<u8> = (0..m).map(|i| (i * 7) as u8).collect();
            let mut high6 = vec![0u8; m];
            let packed = decode_high(&payload, &mut high6).unwrap();
            let mut dst = vec![0u8; 2 * m];
            interleave_low_high(&low, &high6, packed, &mut dst);
            for i in 0..m {
                assert_eq!((dst[2 * i], dst[2 * i + 1]), (low[i], plane[i]), "{m}: {i}");
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let plane: Vec<u8> = (0..1000u32).map(|i| (i % 29) as u8).collect();
        let payload = coded(&plane);
        let mut back = vec![0u8; plane.len()];
        assert!(decode(&payload[..3], &mut back).is_err());
        assert!(decode(&payload[..payload.len() - 1], &mut back).is_err());
        let mut bad = payload.clone();
        bad[0] ^= 1;
        assert!(decode(&bad, &mut back).is_err());
        let mut bad = payload.clone();
        bad[3] = 0xff; // a length near 4 GiB: no overflow, an error
        assert!(decode(&bad, &mut back).is_err());
        let mut short = vec![0u8; plane.len() - 64];
        assert!(decode(&payload, &mut short).is_err());
    }
}
