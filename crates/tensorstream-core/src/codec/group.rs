//! Byte grouping: `width`-byte elements to `width` planes (plane `k` holds byte `k` of every
//! element) and back. Written as plain loops over fixed-width chunks so the compiler
//! vectorises them.

/// Split `src` (a whole number of `width`-byte elements) into `width` planes, one after the
/// other in `dst` (the same length as `src`).
pub fn group(src: &[u8], width: usize, dst: &mut [u8]) {
    assert!(width > 0 && src.len().is_multiple_of(width) && dst.len() == src.len());
    let n = src.len() / width;
    match width {
        1 => dst.copy_from_slice(src),
        2 => {
            let (p0, p1) = dst.split_at_mut(n);
            for ((e, a), b) in src.chunks_exact(2).zip(p0.iter_mut()).zip(p1.iter_mut()) {
                *a = e[0];
                *b = e[1];
            }
        }
        4 => {
            let (p0, rest) = dst.split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest.split_at_mut(n);
            for (i, e) in src.chunks_exact(4).enumerate() {
                p0[i] = e[0];
                p1[i] = e[1];
                p2[i] = e[2];
                p3[i] = e[3];
            }
        }
        _ => {
            for (i, e) in src.chunks_exact(width).enumerate() {
                for (k, &b) in e.iter().enumerate() {
                    dst[k * n + i] = b;
                }
            }
        }
    }
}

/// Interleave `width` planes (one after the other in `planes`) back into elements in `dst`
/// (the same length as `planes`). The inverse of [`group`].
pub fn ungroup(planes: &[u8], width: usize, dst: &mut [u8]) {
    assert!(width > 0 && planes.len().is_multiple_of(width) && dst.len() == planes.len());
    let n = planes.len() / width;
    let slices: Vec<&[u8]> = planes.chunks(n.max(1)).take(width).collect();
    if n == 0 {
        return;
    }
    interleave(&slices, dst);
}

/// Interleave planes, each its own slice of the same length, into `dst` (their total
/// length): `dst[i * W + k] = planes[k][i]`.
pub fn interleave(planes: &[&[u8]], dst: &mut [u8]) {
    let width = planes.len();
    assert!(width > 0);
    let n = planes[0].len();
    assert!(planes.iter().all(|p| p.len() == n) && dst.len() == n * width);
    match planes {
        [p0] => dst.copy_from_slice(p0),
        [p0, p1] => {
            // The bulk with SIMD unpacks, the rest (and other targets) element by element.
            let done = simd::interleave2(p0, p1, dst);
            let pairs = dst[2 * done..].chunks_exact_mut(2);
            for ((e, a), b) in pairs.zip(&p0[done..]).zip(&p1[done..]) {
                e[0] = *a;
                e[1] = *b;
            }
        }
        [p0, p1, p2, p3] => {
            let done = simd::interleave4(p0, p1, p2, p3, dst);
            let quads = dst[4 * done..]
                .chunks_exact_mut(4)
                .zip(&p0[done..])
                .zip(&p1[done..])
                .zip(&p2[done..])
                .zip(&p3[done..]);
            for ((((e, a), b), c), d) in quads {
                e[0] = *a;
                e[1] = *b;
                e[2] = *c;
                e[3] = *d;
            }
        }
        _ => {
            for (i, e) in dst.chunks_exact_mut(width).enumerate() {
                for (k, b) in e.iter_mut().enumerate() {
                    *b = planes[k][i];
                }
            }
        }
    }
}

/// SSE2 byte interleaving (part of every x86_64 CPU), 16 elements at a time. Each function
/// returns how many elements it wrote: a multiple of 16, the caller does the rest.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::{
        __m128i, _mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi16, _mm_unpackhi_epi8,
        _mm_unpacklo_epi16, _mm_unpacklo_epi8,
    };

    /// `dst[2i] = a[i]`, `dst[2i + 1] = b[i]` for the first multiple of 16 elements.
    pub fn interleave2(a: &[u8], b: &[u8], dst: &mut [u8]) -> usize {
        let n = a.len().min(b.len()).min(dst.len() / 2) / 16 * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= a.len(), b.len() and 2 * i + 32 <= 2 * n <= dst.len(),
            // so every 16-byte load and store is in bounds; unaligned access is allowed.
            unsafe {
                let x = _mm_loadu_si128(a.as_ptr().add(i) as *const __m128i);
                let y = _mm_loadu_si128(b.as_ptr().add(i) as *const __m128i);
                let d = dst.as_mut_ptr().add(2 * i) as *mut __m128i;
                _mm_storeu_si128(d, _mm_unpacklo_epi8(x, y));
                _mm_storeu_si128(d.add(1), _mm_unpackhi_epi8(x, y));
            }
        }
        n
    }

    /// `dst[4i + k] = plane_k[i]` for the first multiple of 16 elements.
    pub fn interleave4(a: &[u8], b: &[u8], c: &[u8], e: &[u8], dst: &mut [u8]) -> usize {
        let n = a
            .len()
            .min(b.len())
            .min(c.len())
            .min(e.len())
            .min(dst.len() / 4)
            / 16
            * 16;
        for i in (0..n).step_by(16) {
            // SAFETY: i + 16 <= n <= each plane's length and 4 * i + 64 <= 4 * n <=
            // dst.len(), so every 16-byte load and store is in bounds; unaligned is allowed.
            unsafe {
                let load = |p: &[u8]| _mm_loadu_si128(p.as_ptr().add(i) as *const __m128i);
                let (x, y, z, w) = (load(a), load(b), load(c), load(e));
                let (xy_lo, xy_hi) = (_mm_unpacklo_epi8(x, y), _mm_unpackhi_epi8(x, y));
                let (zw_lo, zw_hi) = (_mm_unpacklo_epi8(z, w), _mm_unpackhi_epi8(z, w));
                let d = dst.as_mut_ptr().add(4 * i) as *mut __m128i;
                _mm_storeu_si128(d, _mm_unpacklo_epi16(xy_lo, zw_lo));
                _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(xy_lo, zw_lo));
                _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(xy_hi, zw_hi));
                _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(xy_hi, zw_hi));
            }
        }
        n
    }
}

/// Other targets: everything element by element.
#[cfg(not(target_arch = "x86_64"))]
mod simd {
    pub fn interleave2(_: &[u8], _: &[u8], _: &mut [u8]) -> usize {
        0
    }
    pub fn interleave4(_: &[u8], _: &[u8], _: &[u8], _: &[u8], _: &mut [u8]) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_then_ungroup_is_identity() {
        for width in [1usize, 2, 4, 8] {
            for n in [0usize, 1, 7, 15, 16, 17, 64, 1000, 1039] {
                let src: Vec<u8> = (0..n * width).map(|i| (i * 31 % 251) as u8).collect();
                let mut planes = vec![0; src.len()];
                group(&src, width, &mut planes);
                for i in 0..n {
                    for k in 0..width {
                        assert_eq!(planes[k * n + i], src[i * width + k]);
                    }
                }
                let mut back = vec![0; src.len()];
                ungroup(&planes, width, &mut back);
                assert_eq!(back, src, "width {width}, {n} elements");
            }
        }
    }
}
