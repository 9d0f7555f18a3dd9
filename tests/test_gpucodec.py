"""The table code's torch decoder (`tensorstream.gpucodec`), on CPU tensors: bit-exact with
the Rust decoder for every dtype, NaN/Inf, zeros, escapes at chunk edges and short last
chunks; hostile chunks raise StoreCorruptedError in both, and where the Rust decoder
accepts a damaged chunk, torch decodes the same bytes. The CUDA path's sequence (stored
bytes read by the engine unchanged, copied into the tail of the slot, decoded in place) run
on CPU tensors gives the unit's raw bytes. And offload() writes the table code for a GPU."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch
from conftest import budget_gb, input_ids, logits_and_tokens, tiny_llama

import tensorstream as ts
from tensorstream import _core, gpucodec
from tensorstream.errors import StoreCorruptedError
from tensorstream.memory import aligned_empty
from tensorstream.transfer.cuda import stage_coded

CHUNK = 4 << 20


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _weights(dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


def _specials(dtype, n: int) -> torch.Tensor:
    vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 3e38, -1.5])
    if dtype != torch.float32:
        vals = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-7, 6e4, -1.5])
    return vals.repeat(n // len(vals) + 1)[:n].to(dtype)


def _random_bits(n_bytes: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n_bytes, dtype=np.uint8).tobytes()


def _torch_decode(mode: str, stored: bytes, raw_len: int) -> bytes:
    t = (
        torch.frombuffer(bytearray(stored), dtype=torch.uint8)
        if stored
        else torch.empty(0, dtype=torch.uint8)
    )
    return _bytes(gpucodec.decode_chunk(t, mode, raw_len))


def _check_both(raw: bytes, width: int) -> list:
    """Code `raw` with the table code; each chunk decodes to its raw bytes in Rust and in
    torch. Returns the chunks' modes."""
    coded = _core.codec_encode(raw, width, "table")
    modes = []
    for k, (mode, stored) in enumerate(coded):
        piece = raw[k * CHUNK : (k + 1) * CHUNK]
        assert _core.codec_decode(mode, stored, len(piece)) == piece
        assert _torch_decode(mode, stored, len(piece)) == piece, (mode, k)
        modes.append(mode)
    return modes


DATA = {
    "normal": lambda dt, n: _weights(dt, n, 1),
    "zeros": lambda dt, n: torch.zeros(n, dtype=dt),
    "nan_inf": _specials,
}


@pytest.mark.parametrize("pattern", sorted(DATA))
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: str(d).split(".")[-1]
)
def test_torch_decoder_is_bit_exact_with_rust_for_every_float_dtype(dtype, pattern):
    width = torch.tensor([], dtype=dtype).element_size()
    # A whole chunk, then a short last one that is not a multiple of the element width.
    n = CHUNK // width + 1000
    raw = _bytes(DATA[pattern](dtype, n)) + b"\x07"
    modes = _check_both(raw, width)
    assert len(modes) == 2
    assert modes[0] == f"tb{width}", modes


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_other_widths_and_incompressible_chunks_are_stored_raw_and_decode(width):
    raw = _random_bits(CHUNK + 12345, 3)
    assert _check_both(raw, width) == ["raw", "raw"]


@pytest.mark.parametrize("length", [1, 2, 3, 5, 17, 4095, 4097])
def test_short_chunks_of_every_length_decode(length):
    raw = _bytes(_weights(torch.bfloat16, length, 4))[:length]
    for width in (2, 4):
        _check_both(raw, width)


def test_every_shift_and_escapes_at_both_chunk_edges_decode():
    # 16 frequent high bytes, and rare ones at the first and last element of the chunk.
    rng = np.random.default_rng(5)
    n = CHUNK // 2
    hi = rng.choice(np.arange(0x30, 0x40, dtype=np.uint8), n)
    hi[0], hi[n - 1], hi[n // 2] = 0xFF, 0x01, 0x80
    lo = rng.integers(0, 256, n, dtype=np.uint8)
    raw = np.stack((lo, hi), 1).tobytes()
    stored = _core.codec_encode(raw, 2, "table")[0][1]
    shift, escapes = stored[0], struct.unpack_from("<I", stored, 4)[0]
    assert shift == 0 and escapes == 3
    assert struct.unpack_from("<3I", stored, 24) == (0, n // 2, n - 1)
    _check_both(raw, 2)
    # fp16-like high bytes: 64 values over the top six bits, so the low two bits go apart.
    hi = rng.choice(np.arange(0x20, 0x60, dtype=np.uint8), n)
    raw = np.stack((lo, hi), 1).tobytes()
    stored = _core.codec_encode(raw, 2, "table")[0][1]
    assert stored[0] == 2
    _check_both(raw, 2)
    # Two bits apart (shift 1): 32 values whose low bit varies.
    hi = rng.choice(np.arange(0x40, 0x60, dtype=np.uint8), n)
    raw = np.stack((lo, hi), 1).tobytes()
    assert _core.codec_encode(raw, 2, "table")[0][1][0] == 1
    _check_both(raw, 2)


def _fp16_chunk():
    """A table-coded fp16 chunk with shift 2 and escapes, and its raw bytes."""
    raw = _bytes(_weights(torch.float16, 300_001, 6))
    ((mode, stored),) = _core.codec_encode(raw, 2, "table")
    assert mode == "tb2" and stored[0] == 2
    return raw, bytearray(stored)


def _sections(stored, raw_len):
    return gpucodec.sections(raw_len, 2, stored[0], struct.unpack_from("<I", stored, 4)[0])


def _hostile_edits(raw, stored):
    sec = _sections(stored, len(raw))
    assert sec.escapes >= 2
    p0 = sec.positions

    def put(b, at, v):
        struct.pack_into("<I", b, at, v)

    return {
        "shift 3": lambda b: b.__setitem__(0, 3),
        "reserved byte": lambda b: b.__setitem__(2, 1),
        "escape count + 1": lambda b: put(b, 4, sec.escapes + 1),
        "escape count huge": lambda b: put(b, 4, 0xFFFFFFFF),
        "position out of range": lambda b: put(b, p0, sec.n),
        "positions equal": lambda b: put(b, p0, struct.unpack_from("<I", b, p0 + 4)[0]),
        "positions decreasing": lambda b: put(b, p0 + 4, 0),
        "escape value too wide": lambda b: b.__setitem__(sec.values, 0xFF),
        "table value too wide": lambda b: b.__setitem__(8, 0xFF),
        "one byte short": lambda b: b.pop(),
        "one byte long": lambda b: b.append(0),
        "header only": lambda b: b.__delitem__(slice(24, None)),
        "empty": lambda b: b.clear(),
    }


def test_hostile_chunks_raise_store_corrupted_error_in_rust_and_torch():
    raw, good = _fp16_chunk()
    for what, edit in _hostile_edits(raw, good).items():
        bad = bytearray(good)
        edit(bad)
        with pytest.raises(StoreCorruptedError):
            _core.codec_decode("tb2", bytes(bad), len(raw))
        with pytest.raises(StoreCorruptedError, match="does not decode"):
            _torch_decode("tb2", bytes(bad), len(raw))
        assert what


def test_damaged_chunks_decode_alike_in_rust_and_torch():
    """Random flips anywhere in a chunk: both decoders refuse, or both give the same bytes."""
    raw, good = _fp16_chunk()
    rng = np.random.default_rng(7)
    sec = _sections(good, len(raw))
    spots = list(range(0, sec.values + 16)) + list(rng.integers(sec.values, len(good), 200))
    decoded = 0
    for at in spots:
        bad = bytearray(good)
        bad[at] ^= int(rng.integers(1, 256))
        try:
            want = _core.codec_decode("tb2", bytes(bad), len(raw))
        except StoreCorruptedError:
            with pytest.raises(StoreCorruptedError):
                _torch_decode("tb2", bytes(bad), len(raw))
            continue
        assert _torch_decode("tb2", bytes(bad), len(raw)) == want, at
        decoded += 1
    assert decoded > 100  # flips of data bytes decode (to other bytes)


def test_unknown_modes_have_no_gpu_decoder():
    with pytest.raises(StoreCorruptedError, match="no GPU decoder"):
        _torch_decode("bg2", b"\x00" * 100, 200)


def _table_store(tmp_path):
    """A store of three units written with the table code: bf16 over several chunks with a
    short last one, fp16 and fp32 beside a few raw bytes, and an incompressible unit."""
    path = str(tmp_path / "t.tstore")
    w = _core.StoreWriter(path, "fp")
    w.set_compression(3, 1, code="table")
    units = {
        "bf16": [("w", "BF16", _weights(torch.bfloat16, 5_000_001, 1))],
        "mixed": [
            ("h", "F16", _weights(torch.float16, 1_500_000, 2)),
            ("f", "F32", _weights(torch.float32, 700_001, 3)),
            ("s", "F32", _specials(torch.float32, 1001)),
        ],
        "noise": [("r", "U8", torch.frombuffer(bytearray(_random_bits(100_000, 4)), dtype=torch.uint8))],
    }
    for name, tensors in units.items():
        w.begin_unit(name)
        for tname, dt, t in tensors:
            t = t.contiguous()
            w.add_tensor(tname, dt, list(t.shape), t.data_ptr(), t.numel() * t.element_size())
        w.end_unit()
    w.finish()
    return _core.Store(path)


def test_coded_unit_staged_and_decoded_in_its_slot_equals_the_engines_read(tmp_path):
    """The CUDA path's sequence on CPU tensors: the engine reads the stored bytes unchanged
    (verified) into a host buffer, they are copied into the tail of a slot (`stage_coded`)
    and decoded in place; the slot then holds exactly what the engine decodes."""
    store = _table_store(tmp_path)
    assert store.metadata["compression"] == "table"
    engine = _core.Engine("pread-buffered", 2)
    coded = 0
    for i, u in enumerate(store.units()):
        raw_layout = store.layout(i)
        want = aligned_empty(raw_layout.buffer_len)
        engine.wait(engine.submit(raw_layout, want.data_ptr(), want.numel(), True, want))
        stored = store.stored_layout(i)
        if stored is None:
            assert u.codec == "raw"
            continue
        coded += 1
        assert stored.tensors == [] and stored.bytes_to_read == stored.buffer_len < raw_layout.buffer_len
        host = aligned_empty(stored.buffer_len)
        engine.wait(engine.submit(stored, host.data_ptr(), host.numel(), True, host))
        with open(store.path, "rb") as f:
            f.seek(u.offset)
            assert _bytes(host) == f.read(u.padded_length), "the stored bytes, unchanged"
        plan = gpucodec.parse_unit(host, u.name, store.chunks(i), raw_layout.buffer_len)
        slot = torch.full((raw_layout.buffer_len + 4096,), 0xA5, dtype=torch.uint8)
        stage_coded(plan, host, slot)
        gpucodec.decode_unit(plan, slot, slot)
        n = u.length
        assert torch.equal(slot[:n], want[:n]), u.name
        assert plan.raw_bytes == n
        assert {c.mode for c in plan.chunks} <= {"tb2", "tb4", "raw"}
    assert coded == 2


def test_a_damaged_stored_unit_fails_its_stored_read_and_its_host_check(tmp_path):
    store = _table_store(tmp_path)
    u = store.units()[0]
    with open(store.path, "r+b") as f:
        f.seek(u.offset + 100)
        b = f.read(1)
        f.seek(u.offset + 100)
        f.write(bytes([b[0] ^ 0x40]))
    store = _core.Store(store.path)
    engine = _core.Engine("pread-buffered", 2)
    stored = store.stored_layout(0)
    host = aligned_empty(stored.buffer_len)
    with pytest.raises(StoreCorruptedError) as e:
        engine.wait(engine.submit(stored, host.data_ptr(), host.numel(), True, host))
    assert e.value.unit == u.name
    # The host check refuses what the engine's checksum would: a header made hostile.
    chunks = store.chunks(0)
    host[chunks[0].stored_offset] = 7  # shift 7
    with pytest.raises(StoreCorruptedError, match=f"unit '{u.name}'.*shift 7"):
        gpucodec.parse_unit(host, u.name, chunks, store.layout(0).buffer_len)


def test_offload_for_a_gpu_writes_the_table_code_and_cpu_reads_it_bit_exact(tmp_path):
    model = tiny_llama(
        tied=False, seed=3, dtype=torch.bfloat16, layers=3, hidden=128, intermediate=352, heads=4, kv_heads=2
    )
    ids = input_ids()
    reference = logits_and_tokens(model, ids)
    cfg = dict(vram_budget_gb=budget_gb(model, 2), compression_enabled=True)
    # backend="cuda" on a model still on the CPU: the store is for a GPU.
    gpu = ts.offload(model, ts.Config(tmp_path, backend="cuda", **cfg))
    path = ts.get_model_statistics(gpu)["store_path"]
    store = _core.Store(path)
    assert store.metadata["compression"] == "table"
    assert {c.mode for i in range(len(store.units())) for c in store.chunks(i)} & {"tb2"}
    out = logits_and_tokens(gpu, ids)
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])
    # The same model for the CPU: the store is rewritten with the smaller CPU code.
    model2 = tiny_llama(
        tied=False, seed=3, dtype=torch.bfloat16, layers=3, hidden=128, intermediate=352, heads=4, kv_heads=2
    )
    cpu = ts.offload(model2, ts.Config(tmp_path, backend="pread", **cfg))
    assert _core.Store(path).metadata["compression"] == "bytegroup"
    out = logits_and_tokens(cpu, ids)
    assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1])
    assert os.path.exists(path)
