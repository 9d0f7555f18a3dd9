"""The table code's decoder in torch operations, on whatever device its tensors are on.

A store written for a GPU (`units.write_store(..., code="table")`) codes its float
chunks with the table code (`crates/tensorstream-core/src/codec/table.rs`, described in
`docs/store-format.md`): each element's high byte is a 4-bit index into the chunk's
table of 16 values, with escapes listed by position, beside its raw low bytes. Decoding is
an unpack, a table lookup, a scatter, a shift and an interleave: elementwise operations,
no custom kernel. On CPU tensors it is the reference the tests hold bit-exact against the
Rust decoder; the CUDA path runs it on the device, so the link carries coded bytes.

Two steps, so that nothing on the device needs checking:

- :func:`parse_unit` reads each chunk's header and escapes from the host copy of a unit's
  stored bytes (the pinned buffer the engine read them into) and checks every number a
  device operation will use: lengths, escape positions (strictly increasing, in range),
  table and escape values. A chunk that breaks a rule raises ``StoreCorruptedError``.
- :func:`decode_unit` decodes the checked chunks from a copy of the stored bytes on the
  device into the unit's buffer, batching chunks of the same shape, so one unit costs a few
  dozen operations, not a dozen per 4 MiB chunk.

The stored bytes may lie inside the unit's own buffer, ending where its raw bytes end
(:meth:`CodedUnit.image_start`): the CUDA path copies them into the tail of the unit's
slot and decodes in place, so the coded copy needs no device memory beyond the slot.
Chunks are decoded in order, and each batch reads its stored bytes into temporaries before
it writes: a chunk's raw bytes never reach the stored bytes of a later chunk (each chunk is
stored in at most its raw length, padding included; see `stored_fits_behind`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import StoreCorruptedError

HEADER_LEN = 24
"""Bytes before the escape positions: shift, three zero bytes, escape count, table."""
TABLE_LEN = 16
SHIFTS = (0, 1, 2)
WIDTHS = {"tb2": 2, "tb4": 4}
"""Chunk modes of the table code and their element widths."""
GPU_MODES = frozenset(("raw", *WIDTHS))
"""Chunk modes :func:`decode_unit` decodes."""
BATCH_BYTES = 32 << 20
"""Raw bytes decoded per batch: bounds the temporaries (about 3x this) beside the slot."""


@dataclass(frozen=True)
class Sections:
    """Where each part of a table-coded chunk lies, as offsets in the stored chunk."""

    n: int
    shift: int
    escapes: int
    positions: int
    values: int
    indices: int
    bits: int
    low: int
    tail: int
    end: int


def sections(raw_len: int, width: int, shift: int, escapes: int):
    """The sections of a chunk, as the Rust `Sections::new` computes them; None for a shift
    outside SHIFTS or more escapes than elements."""
    n = raw_len // width
    if shift not in SHIFTS or not 0 <= escapes <= n:
        return None
    values = HEADER_LEN + 4 * escapes
    indices = values + escapes
    bits = indices + (n + 1) // 2
    low = bits + (n * shift + 7) // 8
    tail = low + n * (width - 1)
    return Sections(
        n, shift, escapes, HEADER_LEN, values, indices, bits, low, tail, tail + raw_len - n * width
    )


@dataclass(frozen=True)
class Chunk:
    """One chunk of a unit, checked: its raw range in the unit's buffer, its stored range
    relative to the unit's stored bytes, its mode and, for the table code, its sections."""

    raw_offset: int
    raw_len: int
    stored_offset: int
    stored_len: int
    mode: str
    width: int = 0
    sec: Sections = None

    def key(self) -> tuple:
        """Chunks with the same key decode in one batch."""
        return (self.mode, self.raw_len, self.sec.shift if self.sec else -1)


@dataclass(frozen=True)
class CodedUnit:
    """A unit's checked chunks and the sizes of its stored bytes and its buffer."""

    name: str
    chunks: tuple
    image_len: int
    """Bytes of the unit's stored bytes as read (padded_length): the copy to the device."""
    buffer_len: int
    """The unit's buffer length (its raw length rounded up to 4096)."""

    @property
    def image_start(self) -> int:
        """Where the stored bytes go in the unit's buffer to be decoded in place: ending at
        buffer_len, on a 4096 boundary (every chunk's int32 escapes stay aligned)."""
        return self.buffer_len - self.image_len

    @property
    def raw_bytes(self) -> int:
        return sum(c.raw_len for c in self.chunks)


def _bad(unit: str, chunk, reason: str) -> StoreCorruptedError:
    e = StoreCorruptedError(
        f"unit {unit!r}: coded chunk at raw offset {chunk.raw_offset} ({chunk.stored_len} bytes stored "
        f"at {chunk.stored_offset} as {chunk.mode}) does not decode: {reason}"
    )
    e.unit = unit
    return e


def parse_chunk(image: np.ndarray, unit: str, entry) -> Chunk:
    """Check one chunk (a ChunkEntry of `Store.chunks`) of a unit's stored bytes `image`
    (a uint8 array on the host): the rules the Rust decoder checks, in the same order."""
    c = Chunk(entry.raw_offset, entry.raw_len, entry.stored_offset, entry.stored_len, entry.mode)
    if c.mode not in GPU_MODES:
        raise _bad(unit, c, f"mode {c.mode!r} has no GPU decoder (known: {', '.join(sorted(GPU_MODES))})")
    if c.stored_offset < 0 or c.stored_offset + c.stored_len > len(image) or c.raw_len <= 0:
        raise _bad(unit, c, f"its stored bytes lie outside the {len(image)} bytes read")
    if c.mode == "raw":
        if c.stored_len != c.raw_len:
            raise _bad(unit, c, f"raw chunk of {c.stored_len} stored bytes for {c.raw_len} raw bytes")
        return c
    width = WIDTHS[c.mode]
    s = image[c.stored_offset : c.stored_offset + c.stored_len]
    if len(s) < HEADER_LEN:
        raise _bad(
            unit, c, f"table-coded chunk of {len(s)} bytes is shorter than its {HEADER_LEN}-byte header"
        )
    shift = int(s[0])
    if s[1] or s[2] or s[3]:
        raise _bad(unit, c, f"reserved header bytes {list(s[1:4])} are not zero")
    escapes = int(s[4:8].view("<u4")[0])
    sec = sections(c.raw_len, width, shift, escapes)
    if sec is None:
        raise _bad(
            unit,
            c,
            f"shift {shift} (known: 0, 1, 2) or {escapes} escapes (at most {c.raw_len // width}) "
            f"do not fit a chunk of {c.raw_len} raw bytes",
        )
    if sec.end != len(s):
        raise _bad(
            unit, c, f"shift {shift} and {escapes} escapes make a {sec.end}-byte chunk, {len(s)} are stored"
        )
    limit = 256 >> shift
    table = s[8:HEADER_LEN]
    if int(table.max()) >= limit:
        raise _bad(unit, c, f"table value {int(table.max())} does not fit {8 - shift} bits")
    if escapes:
        pos = s[sec.positions : sec.values].view("<u4").astype(np.int64)
        if pos[0] >= sec.n or (escapes > 1 and not (np.diff(pos) > 0).all()) or pos[-1] >= sec.n:
            raise _bad(unit, c, f"escape positions must increase strictly and stay below {sec.n}")
        vals = s[sec.values : sec.indices]
        if int(vals.max()) >= limit:
            raise _bad(unit, c, f"escape value {int(vals.max())} does not fit {8 - shift} bits")
    return Chunk(c.raw_offset, c.raw_len, c.stored_offset, c.stored_len, c.mode, width, sec)


def stored_fits_behind(chunks, image_len: int, buffer_len: int) -> bool:
    """True when decoding in place (stored bytes at buffer_len - image_len) in chunk order
    never writes a chunk's raw bytes over the stored bytes of a later chunk. A store's
    validated chunk table always passes; a decoder checks it rather than trust that."""
    start = buffer_len - image_len
    if start < 0:
        return False
    for a, b in zip(chunks, chunks[1:]):
        if a.raw_offset + a.raw_len > start + b.stored_offset:
            return False
    return True


def parse_unit(image: torch.Tensor, name: str, entries, buffer_len: int) -> CodedUnit:
    """Check a unit's chunks (`Store.chunks(i)`) in its stored bytes `image` (a uint8
    tensor on the host, as the engine read `Store.stored_layout(i)`), for a decode into a
    buffer of `buffer_len` bytes. Raises StoreCorruptedError naming the unit and the chunk."""
    host = image.numpy() if image.device.type == "cpu" else image.cpu().numpy()
    chunks = tuple(parse_chunk(host, name, e) for e in entries)
    for c in chunks:
        if c.raw_offset + c.raw_len > buffer_len:
            raise _bad(name, c, f"its raw bytes end past the {buffer_len}-byte buffer")
    if any(a.raw_offset + a.raw_len > b.raw_offset for a, b in zip(chunks, chunks[1:])):
        raise StoreCorruptedError(f"unit {name!r}: coded chunks overlap or are out of order")
    if not stored_fits_behind(chunks, len(host), buffer_len):
        raise StoreCorruptedError(
            f"unit {name!r}: its {len(host)} stored bytes cannot be decoded in place in a {buffer_len}-byte buffer"
        )
    return CodedUnit(name, chunks, len(host), buffer_len)


def _batches(chunks):
    """Runs of consecutive chunks of the same key, each run contiguous in raw bytes and at
    most BATCH_BYTES of them."""
    run = []
    for c in chunks:
        if run and (
            c.key() != run[0].key()
            or run[-1].raw_offset + run[-1].raw_len != c.raw_offset
            or (len(run) + 1) * c.raw_len > BATCH_BYTES
        ):
            yield run
            run = []
        run.append(c)
    if run:
        yield run


def _gather(src: torch.Tensor, base: int, run, lo, hi) -> torch.Tensor:
    """The bytes [lo(c), hi(c)) of each chunk of the run, relative to its stored bytes at
    `base + stored_offset` in `src`, copied one after the other (a fresh, aligned tensor)."""
    parts = [src[base + c.stored_offset + lo(c) : base + c.stored_offset + hi(c)] for c in run]
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _decode_run(src: torch.Tensor, base: int, run, out: torch.Tensor) -> None:
    """Decode a run of table-coded chunks of one shape: every stored byte is read into a
    temporary before anything is written."""
    dev = src.device
    c0 = run[0]
    sec, w, k = c0.sec, c0.width, len(run)
    n, s = sec.n, sec.shift
    nb = (n + 1) // 2
    tables = _gather(src, base, run, lambda c: 8, lambda c: HEADER_LEN).view(k, TABLE_LEN)
    idx = _gather(src, base, run, lambda c: c.sec.indices, lambda c: c.sec.bits).view(k, nb)
    low = _gather(src, base, run, lambda c: c.sec.low, lambda c: c.sec.tail)
    tail = _gather(src, base, run, lambda c: c.sec.tail, lambda c: c.sec.end) if sec.end > sec.tail else None
    bits = _gather(src, base, run, lambda c: c.sec.bits, lambda c: c.sec.low) if s else None
    total_escapes = sum(c.sec.escapes for c in run)
    if total_escapes:
        pos = _gather(src, base, run, lambda c: c.sec.positions, lambda c: c.sec.values).view(torch.int32)
        vals = _gather(src, base, run, lambda c: c.sec.values, lambda c: c.sec.indices)
        counts = _gather(src, base, run, lambda c: 4, lambda c: 8).view(torch.int32)
    # Lookup of both nibbles of an index byte at once: a table of 256 byte pairs per chunk,
    # indexed with int32 (a quarter of the memory of int64 indices per element).
    b = torch.arange(256, device=dev)
    pairs = torch.stack((tables[:, b & 15], tables[:, b >> 4]), dim=2).contiguous()
    pairs = pairs.view(torch.int16).view(k * 256)
    rows = torch.arange(k, device=dev, dtype=torch.int32).mul_(256).unsqueeze(1)
    hi = pairs.index_select(0, (idx.int() + rows).view(-1)).view(torch.uint8).view(k, 2 * nb)
    if total_escapes:
        row = torch.arange(k, device=dev, dtype=torch.int64).mul_(2 * nb)
        at = torch.repeat_interleave(row, counts.long(), output_size=total_escapes) + pos.long()
        hi.view(-1).index_put_((at,), vals)
    hi = hi[:, :n]
    if s:
        shifts = torch.arange(0, 8, s, device=dev, dtype=torch.uint8)
        lowbits = (bits.view(k, -1).unsqueeze(2) >> shifts).bitwise_and_((1 << s) - 1)
        hi = (hi << s) | lowbits.view(k, -1)[:, :n]
    dst = out[c0.raw_offset : c0.raw_offset + k * c0.raw_len].view(k, c0.raw_len)
    body = dst[:, : n * w].unflatten(1, (n, w))
    body[:, :, w - 1] = hi
    body[:, :, : w - 1] = low.view(k, n, w - 1)
    if tail is not None:
        dst[:, n * w :] = tail.view(k, -1)


def decode_unit(unit: CodedUnit, src: torch.Tensor, out: torch.Tensor, src_offset=None) -> None:
    """Decode `unit`'s chunks from its stored bytes, at `src_offset` in `src` (default:
    `unit.image_start`, the stored bytes in the tail of `out` itself), into `out` (the
    unit's buffer), on the current stream of their device. `src` and `out` may be one
    tensor (decoding in place, see the module docstring)."""
    base = unit.image_start if src_offset is None else src_offset
    for run in _batches(unit.chunks):
        c0 = run[0]
        if c0.mode == "raw":
            data = _gather(src, base, run, lambda c: 0, lambda c: c.stored_len)
            out[c0.raw_offset : c0.raw_offset + data.numel()] = data
        else:
            _decode_run(src, base, run, out)


def decode_chunk(stored: torch.Tensor, mode: str, raw_len: int, out: torch.Tensor = None) -> torch.Tensor:
    """Decode one chunk's stored bytes (a uint8 tensor on any device; its header is read
    on the host) into `raw_len` bytes on the same device: the reference the tests compare
    with `_core.codec_decode`. Raises StoreCorruptedError for a chunk that does not decode."""
    from ._core import ChunkEntry

    stored = stored.contiguous()
    entry = ChunkEntry(0, raw_len, 0, stored.numel(), mode)
    unit = parse_unit(stored, "<chunk>", [entry], max(raw_len, stored.numel()))
    if out is None:
        out = torch.empty(raw_len, dtype=torch.uint8, device=stored.device)
    decode_unit(unit, stored, out, src_offset=0)
    return out
