//! The table code: a fixed-width code that a GPU decodes with a handful of elementwise
//! operations (unpack, table lookup, scatter, shift, interleave), no custom kernel.
//!
//! Each element of `W` bytes (2: bf16, fp16; 4: fp32) keeps its `W - 1` low bytes as they
//! are. Its high byte `h` (sign and exponent) is cut at bit `s` (0, 1 or 2, the encoder's
//! choice per chunk): `h >> s` becomes a 4-bit index into the chunk's table of its 16 most
//! frequent values, the low `s` bits are packed apart; values outside the table are
//! escapes, listed by position. bf16's high byte (about 2.7 bits of entropy) shrinks to
//! 4 bits with `s = 0`; fp16's (sign, five exponent bits, two mantissa bits) needs `s = 2`.
//!
//! A chunk of `raw_len` bytes, `n = raw_len / W` elements, holds (`docs/store-format.md`):
//!
//! ```text
//! 0      u8 s (0, 1, 2), then three zero bytes
//! 4      u32 LE E, the number of escapes
//! 8      16 bytes: the table (values h >> s)
//! 24     E u32 LE: escape positions, strictly increasing, below n
//!        E u8: escape values (h >> s)
//!        ceil(n / 2) bytes: indices, element 2i in the low nibble of byte i (0 for escapes)
//!        ceil(n * s / 8) bytes: the low s bits of h, element i at bit (i % (8 / s)) * s
//!                               of byte i / (8 / s)
//!        n * (W - 1) bytes: each element's low bytes, in order
//!        raw_len - n * W bytes: the raw tail
//! ```
//!
//! The escape positions start at byte 24, so a chunk that starts on a 4-byte boundary
//! holds them aligned as `int32` for a GPU to read in place.

/// Bytes before the escape positions: shift, reserved, escape count, table.
pub const HEADER_LEN: usize = 24;
/// Entries of the table: the values a 4-bit index reaches.
pub const TABLE_LEN: usize = 16;
/// The cuts of the high byte the encoder tries.
pub const SHIFTS: [u8; 3] = [0, 1, 2];

/// Where each part of a table-coded chunk lies (byte offsets in the stored chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sections {
    /// Elements of `W` bytes.
    pub n: usize,
    /// Bits of the high byte packed apart.
    pub shift: u8,
    /// Escapes.
    pub escapes: usize,
    /// Offset of the escape positions (always [`HEADER_LEN`]).
    pub positions: usize,
    /// Offset of the escape values.
    pub values: usize,
    /// Offset of the packed indices.
    pub indices: usize,
    /// Offset of the packed low bits of the high bytes.
    pub bits: usize,
    /// Offset of the low bytes.
    pub low: usize,
    /// Offset of the raw tail.
    pub tail: usize,
    /// Stored length: the end of the tail.
    pub end: usize,
}

impl Sections {
    /// The sections of a chunk of `raw_len` bytes of `width`-byte elements with `shift` and
    /// `escapes`; `None` for a shift outside [`SHIFTS`], more escapes than elements, or
    /// sizes past `usize` (hostile counts).
    pub fn new(raw_len: usize, width: usize, shift: u8, escapes: usize) -> Option<Self> {
        if width < 2 || !SHIFTS.contains(&shift) {
            return None;
        }
        let n = raw_len / width;
        if escapes > n {
            return None;
        }
        let positions = HEADER_LEN;
        let values = positions.checked_add(escapes.checked_mul(4)?)?;
        let indices = values.checked_add(escapes)?;
        let bits = indices.checked_add(n.div_ceil(2))?;
        let low = bits.checked_add((n.checked_mul(shift as usize)?).div_ceil(8))?;
        let tail = low.checked_add(n.checked_mul(width - 1)?)?;
        let end = tail.checked_add(raw_len - n * width)?;
        Some(Sections {
            n,
            shift,
            escapes,
            positions,
            values,
            indices,
            bits,
            low,
            tail,
            end,
        })
    }
}

/// The table for a histogram of `h >> shift` values: the 16 most frequent (count
/// descending, then value ascending, so every encoder picks the same table), and how many
/// elements it covers.
fn best_table(hist: &[u64]) -> ([u8; TABLE_LEN], u64) {
    let mut order: Vec<usize> = (0..hist.len()).collect();
    order.sort_by(|&a, &b| hist[b].cmp(&hist[a]).then(a.cmp(&b)));
    let mut table = [0u8; TABLE_LEN];
    let mut covered = 0;
    for (slot, &v) in table.iter_mut().zip(&order) {
        *slot = v as u8;
        covered += hist[v];
    }
    (table, covered)
}

/// Code `raw` (any length) as `width`-byte elements (2 or 4) into `out` (cleared first),
/// with the shift that gives the fewest bytes. Returns the stored length.
pub fn encode(raw: &[u8], width: usize, out: &mut Vec<u8>) -> usize {
    assert!(width == 2 || width == 4, "table code width {width}");
    let n = raw.len() / width;
    let mut freq = [0u64; 256];
    for e in raw[..n * width].chunks_exact(width) {
        freq[e[width - 1] as usize] += 1;
    }
    // The cut that codes smallest; ties go to the smaller shift (fewer operations).
    let (sec, table) = SHIFTS
        .iter()
        .map(|&s| {
            let hist: Vec<u64> = (0..256usize >> s)
                .map(|v| freq[v << s..(v + 1) << s].iter().sum())
                .collect();
            let (table, covered) = best_table(&hist);
            let sec = Sections::new(raw.len(), width, s, (n as u64 - covered) as usize)
                .expect("escapes within the chunk");
            (sec, table)
        })
        .min_by_key(|(sec, _)| sec.end)
        .expect("three shifts");
    let s = sec.shift;
    let mut index_of = [u8::MAX; 256];
    for (i, &v) in table.iter().enumerate().rev() {
        index_of[v as usize] = i as u8; // the first entry of a value wins
    }
    out.clear();
    out.resize(sec.end, 0);
    out[0] = s;
    out[4..8].copy_from_slice(&(sec.escapes as u32).to_le_bytes());
    out[8..HEADER_LEN].copy_from_slice(&table);
    let per = if s > 0 { 8 / s as usize } else { 1 };
    let mask = (1u8 << s) - 1;
    let mut esc = 0;
    for (i, e) in raw[..n * width].chunks_exact(width).enumerate() {
        let h = e[width - 1];
        let v = h >> s;
        let mut idx = index_of[v as usize];
        if idx == u8::MAX {
            let at = sec.positions + 4 * esc;
            out[at..at + 4].copy_from_slice(&(i as u32).to_le_bytes());
            out[sec.values + esc] = v;
            esc += 1;
            idx = 0;
        }
        out[sec.indices + i / 2] |= idx << ((i & 1) * 4);
        if s > 0 {
            out[sec.bits + i / per] |= (h & mask) << ((i % per) * s as usize);
        }
        let lo = sec.low + i * (width - 1);
        out[lo..lo + width - 1].copy_from_slice(&e[..width - 1]);
    }
    debug_assert_eq!(esc, sec.escapes);
    out[sec.tail..].copy_from_slice(&raw[n * width..]);
    sec.end
}

/// Read and check a stored chunk's header against the raw length: the sections, the
/// table. Every count is checked before any section is touched.
pub fn parse(
    stored: &[u8],
    raw_len: usize,
    width: usize,
) -> Result<(Sections, [u8; TABLE_LEN]), String> {
    if stored.len() < HEADER_LEN {
        return Err(format!(
            "table-coded chunk of {} bytes is shorter than its {HEADER_LEN}-byte header",
            stored.len()
        ));
    }
    let shift = stored[0];
    if stored[1..4] != [0, 0, 0] {
        return Err(format!(
            "reserved header bytes {:?} are not zero",
            &stored[1..4]
        ));
    }
    let escapes = u32::from_le_bytes(stored[4..8].try_into().expect("4 bytes")) as usize;
    let sec = Sections::new(raw_len, width, shift, escapes).ok_or_else(|| {
        format!(
            "shift {shift} (known: 0, 1, 2) or {escapes} escapes (at most {}) do not fit a chunk of {raw_len} raw bytes",
            raw_len / width.max(1)
        )
    })?;
    if sec.end != stored.len() {
        return Err(format!(
            "shift {shift} and {escapes} escapes make a {}-byte chunk for {raw_len} raw bytes, {} are stored",
            sec.end,
            stored.len()
        ));
    }
    let table: [u8; TABLE_LEN] = stored[8..HEADER_LEN].try_into().expect("16 bytes");
    let limit = 256u32 >> shift;
    if let Some(v) = table.iter().find(|&&v| v as u32 >= limit) {
        return Err(format!("table value {v} does not fit {} bits", 8 - shift));
    }
    Ok((sec, table))
}

/// Decode a stored chunk of `width`-byte elements (2 or 4) into `dst` (its raw length).
/// Corrupted input gives a description of what is wrong, never a panic, and never writes
/// outside `dst`.
pub fn decode(stored: &[u8], width: usize, dst: &mut [u8]) -> Result<(), String> {
    if width != 2 && width != 4 {
        return Err(format!("table code of {width}-byte elements (known: 2, 4)"));
    }
    let (sec, table) = parse(stored, dst.len(), width)?;
    let (n, s) = (sec.n, sec.shift);
    let per = if s > 0 { 8 / s as usize } else { 1 };
    let mask = (1u8 << s) - 1;
    let indices = &stored[sec.indices..sec.bits];
    let bits = &stored[sec.bits..sec.low];
    let low = &stored[sec.low..sec.tail];
    let (body, tail) = dst.split_at_mut(n * width);
    let low_bits = |i: usize| (bits[i / per] >> ((i % per) * s as usize)) & mask;
    if width == 2 && s == 0 {
        // bf16: each index byte gives two high bytes, interleaved with the low plane.
        for ((e, &b), l) in body.chunks_mut(4).zip(indices).zip(low.chunks(2)) {
            e[0] = l[0];
            e[1] = table[(b & 15) as usize];
            if e.len() == 4 {
                e[2] = l[1];
                e[3] = table[(b >> 4) as usize];
            }
        }
    } else if width == 2 {
        // fp16: the `8 / s` elements that share a byte of low bits at a time.
        let per = 8 / s as usize;
        let shifted: [u8; TABLE_LEN] = std::array::from_fn(|k| table[k] << s);
        for (g, group) in body.chunks_mut(2 * per).enumerate() {
            let b = bits[g];
            for (j, e) in group.chunks_exact_mut(2).enumerate() {
                let i = g * per + j;
                let idx = (indices[i / 2] >> ((i & 1) * 4)) & 15;
                e[0] = low[i];
                e[1] = shifted[idx as usize] | ((b >> (j * s as usize)) & mask);
            }
        }
    } else {
        for (i, (e, l)) in body
            .chunks_exact_mut(width)
            .zip(low.chunks_exact(width - 1))
            .enumerate()
        {
            let idx = (indices[i / 2] >> ((i & 1) * 4)) & 15;
            let mut h = table[idx as usize] << s;
            if s > 0 {
                h |= low_bits(i);
            }
            e[..width - 1].copy_from_slice(l);
            e[width - 1] = h;
        }
    }
    let limit = 256u32 >> s;
    let mut prev: Option<usize> = None;
    for k in 0..sec.escapes {
        let at = sec.positions + 4 * k;
        let p = u32::from_le_bytes(stored[at..at + 4].try_into().expect("4 bytes")) as usize;
        if p >= n || prev.is_some_and(|q| p <= q) {
            return Err(format!(
                "escape {k} at element {p}: positions must increase strictly and stay below {n}"
            ));
        }
        prev = Some(p);
        let v = stored[sec.values + k];
        if v as u32 >= limit {
            return Err(format!("escape value {v} does not fit {} bits", 8 - s));
        }
        let h = if s > 0 { (v << s) | low_bits(p) } else { v };
        body[p * width + width - 1] = h;
    }
    tail.copy_from_slice(&stored[sec.tail..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &[u8], width: usize) -> usize {
        let mut out = Vec::new();
        let len = encode(raw, width, &mut out);
        assert_eq!(len, out.len());
        let mut back = vec![0xa5; raw.len()];
        decode(&out, width, &mut back).unwrap();
        assert_eq!(back, raw, "width {width}, {} bytes", raw.len());
        out[0] as usize
    }

    #[test]
    fn round_trips_with_every_shift_and_escapes() {
        // Few values: shift 0, no escapes.
        let few: Vec<u8> = (0..4001)
            .map(|i| [0x3c, 0xbc, 0x3d][i % 3] ^ (i as u8 & 1))
            .collect();
        for w in [2, 4] {
            check(&few, w);
        }
        // Every byte value: escapes everywhere, a shift is chosen.
        let all: Vec<u8> = (0..70_001u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for w in [2, 4] {
            check(&all, w);
        }
        // High bytes of 64 values spread over 4 low bits: shift 2 covers them all.
        let fp16ish: Vec<u8> = (0..50_000u32)
            .flat_map(|i| [(i * 7) as u8, (0x30 + (i * 13) % 64) as u8])
            .collect();
        assert_eq!(check(&fp16ish, 2), 2);
        for len in 0..12 {
            check(&all[..len], 2);
            check(&all[..len], 4);
        }
    }

    #[test]
    fn hostile_headers_are_errors() {
        let raw: Vec<u8> = (0..1000u32).map(|i| (i * 37 % 251) as u8).collect();
        let mut out = Vec::new();
        encode(&raw, 2, &mut out);
        let mut dst = vec![0; raw.len()];
        for edit in [
            (0usize, 3u8), // shift
            (1, 1),        // reserved
            (7, 0x80),     // escape count
            (8, 0xff),     // a table entry out of range is fine at shift 0 ...
        ] {
            let mut bad = out.clone();
            bad[edit.0] = edit.1;
            let r = decode(&bad, 2, &mut dst);
            if edit.0 == 8 && out[0] == 0 {
                assert!(r.is_ok());
            } else {
                assert!(r.is_err(), "edit {edit:?}");
            }
        }
        assert!(decode(&out[..out.len() - 1], 2, &mut dst).is_err());
        assert!(decode(&out, 3, &mut dst).is_err());
        assert!(decode(&out[..10], 2, &mut dst).is_err());
    }
}
