"""Lossless compression of stored units: outputs are bit-identical with compression on and
off, for bf16, fp16 and fp32 models, through offload() and through a converted store."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import budget_gb, input_ids, logits_and_tokens, tiny_llama

import tensorstream as ts
from tensorstream import _core

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Hidden 128 and 3 layers: each layer a few hundred KB, so units hold whole coded chunks
# and a partial one.
SIZES = dict(layers=3, hidden=128, intermediate=352, heads=4, kv_heads=2)


def _store_file(root) -> str:
    files = [f for f in os.listdir(root) if f.endswith(".tstore")]
    assert len(files) == 1, files
    return os.path.join(root, files[0])


def _offloaded(tmp_path, name: str, dtype, compression: bool, **kw):
    model = tiny_llama(tied=False, seed=3, dtype=dtype, **SIZES)
    cfg = ts.Config(
        tmp_path / name,
        vram_budget_gb=budget_gb(model, 2),
        backend=kw.pop("backend", "pread"),
        compression_enabled=compression,
        compression_level=kw.pop("level", 3),
        **kw,
    )
    return ts.offload(model, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_offloaded_outputs_identical_with_compression_on_and_off(tmp_path, dtype):
    ids = input_ids(length=6)
    ref = tiny_llama(tied=False, seed=3, dtype=dtype, **SIZES)
    ref_logits, ref_tokens = logits_and_tokens(ref, ids)
    outs = {}
    for compression in (False, True):
        model = _offloaded(tmp_path, f"c{int(compression)}", dtype, compression)
        outs[compression] = logits_and_tokens(model, ids)
        s = ts.get_model_statistics(model)
        assert s["mode"] == "cpu-pread"
        assert s["errors"] == 0
        if compression:
            assert s["compression_ratio"] > 1.05, s["compression_ratio"]
            assert s["decoded_bytes"] > 0
            assert s["store_stored_bytes"] < s["store_raw_bytes"]
            # Stored bytes are read, raw bytes decoded.
            assert s["bytes_read"] < s["decoded_bytes"] + s["bytes_read"]
        else:
            assert s["compression_ratio"] == 1.0
            assert s["decoded_bytes"] == 0
    for compression, (logits, tokens) in outs.items():
        assert torch.equal(logits, ref_logits), f"compression={compression}"
        assert torch.equal(tokens, ref_tokens), f"compression={compression}"
    assert torch.equal(outs[True][0], outs[False][0])


def test_compressed_store_records_codec_and_keeps_the_raw_checksums(tmp_path):
    _offloaded(tmp_path, "raw", torch.bfloat16, False)
    _offloaded(tmp_path, "zst", torch.bfloat16, True, level=5)
    raw = _core.Store(_store_file(tmp_path / "raw"))
    zst = _core.Store(_store_file(tmp_path / "zst"))
    # The fingerprint and the checksums are of the raw bytes: the codec changes neither.
    assert raw.fingerprint == zst.fingerprint
    assert [u[5] for u in raw.units()] == [u[5] for u in zst.units()]
    assert raw.metadata["compression"] == "none"
    assert zst.metadata["compression"] == "bytegroup"
    assert zst.metadata["compression_level"] == "5"
    assert zst.coded_units >= 3 and raw.coded_units == 0
    assert zst.raw_bytes == raw.raw_bytes
    assert zst.stored_bytes < raw.stored_bytes
    assert zst.file_len < raw.file_len
    for name, codec, length, stored, chunks in zst.unit_codecs():
        if codec != "raw":
            assert stored < length and chunks >= 1, name


def test_mmap_backend_reads_compressed_units_into_buffers(tmp_path):
    """Coded units cannot be mapped in place: MMAP and AUTO fall back to reading (and
    decoding) into budgeted buffers, with the same outputs."""
    ids = input_ids(length=5)
    ref_logits, ref_tokens = logits_and_tokens(
        tiny_llama(tied=False, seed=3, dtype=torch.bfloat16, **SIZES), ids
    )
    for backend in ("mmap", "auto"):
        model = _offloaded(tmp_path, backend, torch.bfloat16, True, backend=backend)
        logits, tokens = logits_and_tokens(model, ids)
        assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens), backend
        s = ts.get_model_statistics(model)
        assert s["mode"] == "cpu-pread", backend
        assert s["compression_ratio"] > 1.05


def test_store_is_rewritten_when_the_requested_compression_differs(tmp_path):
    def meta():
        st = _core.Store(_store_file(tmp_path / "s"))
        return st.metadata["compression"], st.metadata.get("compression_level"), st.coded_units

    _offloaded(tmp_path, "s", torch.float32, True, level=2)
    assert meta()[:2] == ("bytegroup", "2") and meta()[2] > 0
    before = os.stat(_store_file(tmp_path / "s")).st_ino
    _offloaded(tmp_path, "s", torch.float32, True, level=2)  # same request: reused
    assert os.stat(_store_file(tmp_path / "s")).st_ino == before
    _offloaded(tmp_path, "s", torch.float32, True, level=4)  # another level: rewritten
    assert meta()[:2] == ("bytegroup", "4")
    _offloaded(tmp_path, "s", torch.float32, False)  # no compression: rewritten raw
    assert meta() == ("none", None, 0)
    ids = input_ids(length=4)
    model = _offloaded(tmp_path, "s", torch.float32, True)  # and back
    assert meta()[0] == "bytegroup"
    ref = logits_and_tokens(tiny_llama(tied=False, seed=3, dtype=torch.float32, **SIZES), ids)
    out = logits_and_tokens(model, ids)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_from_pretrained_through_compressed_converted_store(tmp_path, dtype):
    import transformers

    src = tiny_llama(tied=False, seed=4, dtype=dtype, **SIZES)
    ck = tmp_path / "ckpt"
    src.save_pretrained(ck, max_shard_size="300KB")
    ids = input_ids(length=7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=dtype).eval()
    ref_logits, ref_tokens = logits_and_tokens(ref, ids)
    cfg = ts.Config(
        tmp_path / "st", vram_budget_gb=budget_gb(src, 2), compression_enabled=True, compression_level=3
    )
    outs = []
    for compression, where in ((True, "zst"), (False, "raw")):
        cfg_w = ts.Config(tmp_path / where, compression_enabled=compression)
        store = ts.convert(str(ck), tmp_path / where, config=cfg_w, dtype=dtype, progress=False)
        st = _core.Store(store)
        assert st.metadata["compression"] == ("bytegroup" if compression else "none")
        assert (st.coded_units > 0) == compression
        model = ts.from_pretrained(str(ck), cfg, dtype=dtype, store=store)
        logits, tokens = logits_and_tokens(model, ids)
        assert torch.equal(logits, ref_logits), where
        assert torch.equal(tokens, ref_tokens), where
        s = ts.get_model_statistics(model)
        assert s["source"] == "store"
        assert (s["compression_ratio"] > 1.05) == compression
        outs.append(logits)
    assert torch.equal(outs[0], outs[1])


def test_inspect_shows_the_compression_ratio(tmp_path, capsys):
    from tensorstream.cli import main

    _offloaded(tmp_path, "i", torch.bfloat16, True)
    assert main(["inspect", _store_file(tmp_path / "i")]) == 0
    out = capsys.readouterr().out
    assert "| stored | ratio |" in out
    assert "compression ratio" in out
    assert "bytegroup" in out
    assert "CORRUPTED" not in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("host_cache_gb", [0, None], ids=["staging-ring", "host-tier"])
def test_cuda_streaming_decodes_compressed_units_bit_identical(tmp_path, host_cache_gb):
    """The CUDA path: units decoded by the I/O workers into the pinned staging buffers (or
    the pinned host tier), then copied: logits identical to the model fully on the GPU."""
    from conftest import small_llama_bf16

    ids = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(5)).cuda()
    ref = small_llama_bf16(seed=0).cuda()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    del ref
    torch.cuda.empty_cache()
    model = small_llama_bf16(seed=0)
    cfg = ts.Config(
        tmp_path / "s",
        vram_budget_gb=budget_gb(model, 3),
        compression_enabled=True,
        host_cache_gb=host_cache_gb,
    )
    model = ts.offload(model, cfg).to("cuda")
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).logits, ref_logits)
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cuda"
    assert s["compression_ratio"] > 1.05
    assert s["decoded_bytes"] > 0 and s["errors"] == 0
