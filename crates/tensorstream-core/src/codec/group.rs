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
            for ((e, a), b) in dst.chunks_exact_mut(2).zip(*p0).zip(*p1) {
                e[0] = *a;
                e[1] = *b;
            }
        }
        [p0, p1, p2, p3] => {
            let quads = dst.chunks_exact_mut(4).zip(*p0).zip(*p1).zip(*p2).zip(*p3);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_then_ungroup_is_identity() {
        for width in [1usize, 2, 4, 8] {
            for n in [0usize, 1, 7, 64, 1000] {
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
