"""The store on disk: reuse without rewriting, refusal of a store made for another model,
and corruption (flipped bytes, truncation) reported with the unit and file named."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CPU_BACKENDS, budget_gb, input_ids, offload, tiny_llama

import tensorstream as ts

STORE = "LlamaForCausalLM.tstore"


def _offloaded(tmp_path, seed: int = 0, **kwargs):
    model = tiny_llama(tied=False, seed=seed)
    kwargs.setdefault("vram_budget_gb", budget_gb(model, 2))
    return offload(model, tmp_path, **kwargs)


def _reference_logits(ids, seed: int = 0):
    with torch.no_grad():
        return tiny_llama(tied=False, seed=seed)(ids).logits


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def test_store_is_written_under_storage_path_with_the_model_class_name(tmp_path):
    model = _offloaded(tmp_path)
    path = tmp_path / STORE
    assert path.is_file()
    assert ts.get_model_statistics(model)["store_path"] == str(path)
    store = ts._core.Store(str(path))
    names = [u[0] for u in store.units()]
    # The blocks first, then the modules streamed only under a small budget (embeddings,
    # head, norm), so one store serves every budget.
    assert names[:4] == [f"model.layers.{i}" for i in range(4)]
    assert set(names[4:]) == {"model.embed_tokens", "lm_head", "model.norm"}
    for _name, offset, length, padded, _codec, _checksum in store.units():
        assert offset % 4096 == 0 and padded % 4096 == 0 and padded >= length
    # Written atomically: no temporary file is left next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [STORE]


def test_store_name_config_sets_the_file_name(tmp_path):
    model = _offloaded(tmp_path, store_name="custom.tstore")
    assert (tmp_path / "custom.tstore").is_file()
    assert not (tmp_path / STORE).exists()
    assert ts.get_model_statistics(model)["store_path"] == str(tmp_path / "custom.tstore")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_offload_of_identical_model_reuses_store_without_rewriting_it(tmp_path, backend):
    ids = input_ids(seed=41)
    expected = _reference_logits(ids)
    first = _offloaded(tmp_path, backend=backend)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, expected)
    path = tmp_path / STORE
    before = os.stat(path)

    second = _offloaded(tmp_path, backend=backend)

    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    with torch.no_grad():
        assert torch.equal(second(ids).logits, expected)
        assert torch.equal(first(ids).logits, expected)


def test_store_written_for_another_model_raises_store_mismatch_error(tmp_path):
    _offloaded(tmp_path, seed=0)
    other = tiny_llama(tied=False, seed=1)
    with pytest.raises(ts.StoreMismatchError) as info:
        offload(other, tmp_path, vram_budget_gb=budget_gb(other, 2))
    assert isinstance(info.value, ts.TensorStreamError)
    assert STORE in str(info.value)
    assert info.value.path == str(tmp_path / STORE)
    assert getattr(other, "_tensorstream", None) is None


def test_overwrite_store_rewrites_a_store_made_for_another_model_and_works(tmp_path):
    ids = input_ids(seed=42)
    _offloaded(tmp_path, seed=0)
    before = os.stat(tmp_path / STORE)
    model = _offloaded(tmp_path, seed=1, overwrite_store=True)
    after = os.stat(tmp_path / STORE)
    assert after.st_ino != before.st_ino  # a new file renamed into place
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _reference_logits(ids, seed=1))
    # The rewritten store now belongs to seed 1: seed 0 is the mismatching model.
    with pytest.raises(ts.StoreMismatchError):
        _offloaded(tmp_path, seed=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_flipped_byte_in_first_unit_raises_store_corrupted_error_naming_the_unit(tmp_path, backend):
    ids = input_ids(seed=43)
    _offloaded(tmp_path, backend=backend)  # writes the store
    path = tmp_path / STORE
    name, offset, length, *_ = ts._core.Store(str(path)).units()[0]
    _flip_byte(path, offset + length // 2)

    # A fresh instance of the same model: the manifest's fingerprint matches, so the store is
    # reused, and the first forward verifies the unit's checksum.
    model = _offloaded(tmp_path, backend=backend, prefetch_strategy="none")
    with pytest.raises(ts.StoreCorruptedError) as info, torch.no_grad():
        model(ids)
    err = info.value
    assert name in str(err)
    assert err.unit == name
    assert err.path == str(path)
    assert str(path) in str(err)


def test_flipped_byte_after_offload_is_caught_by_pread_on_the_next_read(tmp_path):
    ids = input_ids(seed=44)
    model = tiny_llama(tied=False, seed=0)
    # Room for one unit and no prefetch: every forward reads every unit again.
    model = offload(
        model, tmp_path, backend="pread", prefetch_strategy="none", vram_budget_gb=budget_gb(model, 1)
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _reference_logits(ids))
    path = tmp_path / STORE
    name, offset, *_ = ts._core.Store(str(path)).units()[2]
    _flip_byte(path, offset + 1)
    with pytest.raises(ts.StoreCorruptedError, match=name), torch.no_grad():
        model(ids)


def test_truncated_store_raises_store_corrupted_error_at_offload(tmp_path):
    _offloaded(tmp_path)
    path = tmp_path / STORE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 5000)
    with pytest.raises(ts.StoreCorruptedError) as info:
        _offloaded(tmp_path)
    assert str(path) in str(info.value)


def test_store_with_garbage_header_raises_store_corrupted_error_at_offload(tmp_path):
    _offloaded(tmp_path)
    path = tmp_path / STORE
    _flip_byte(path, 0)
    _flip_byte(path, 1)
    with pytest.raises(ts.StoreCorruptedError, match=STORE):
        _offloaded(tmp_path)


def _edit_manifest(path, edit) -> None:
    """Apply `edit(manifest_bytes) -> bytes of the same length` and recompute the header's
    manifest checksum, as docs/store-format.md describes: the store opens again."""
    import struct

    xxhash = pytest.importorskip("xxhash")
    with open(path, "r+b") as f:
        header = f.read(64)
        off, length = struct.unpack_from("<QQ", header, 16)
        f.seek(off)
        manifest = f.read(length)
        edited = edit(manifest)
        assert len(edited) == len(manifest) and edited != manifest
        f.seek(off)
        f.write(edited)
        f.seek(32)
        f.write(struct.pack("<Q", xxhash.xxh3_64_intdigest(edited)))


def _swap(data: bytes, a: bytes, b: bytes) -> bytes:
    return data.replace(a, b"\0SWAP\0").replace(b, a).replace(b"\0SWAP\0", b)


def test_manifest_edited_with_a_recomputed_checksum_is_refused(tmp_path):
    import json

    _offloaded(tmp_path)
    path = tmp_path / STORE
    # Two same-shape tensors' names swapped: the fingerprint recomputed from the manifest differs.
    _edit_manifest(path, lambda m: _swap(m, b"self_attn.q_proj.weight", b"self_attn.o_proj.weight"))
    with pytest.raises(ts.StoreMismatchError, match="manifest describes other tensors"):
        _offloaded(tmp_path)

    # Their digests swapped too (the engine would find the bytes at each offset differ from
    # the digest, crates/tensorstream-core/tests/store.rs): still refused at offload.
    def swap_digests(m: bytes) -> bytes:
        for unit in json.loads(m)["units"]:
            t = {x["name"]: x["digest"] for x in unit["tensors"]}
            if "self_attn.q_proj.weight" in t:  # the layers, not the embeddings and head
                m = _swap(m, t["self_attn.q_proj.weight"].encode(), t["self_attn.o_proj.weight"].encode())
        return m

    _edit_manifest(path, swap_digests)
    with pytest.raises(ts.StoreMismatchError, match="manifest describes other tensors"):
        _offloaded(tmp_path)


def test_dtype_relabelled_with_a_recomputed_checksum_is_refused(tmp_path):
    _offloaded(tmp_path)
    path = tmp_path / STORE
    _edit_manifest(path, lambda m: m.replace(b'"dtype":"F32"', b'"dtype":"I32"', 1))
    with pytest.raises(ts.StoreMismatchError):
        _offloaded(tmp_path)
