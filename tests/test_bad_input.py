"""Bad input is named, and loses nothing: a memory probe that returns nonsense, a store named
with ``store=`` that was converted from another checkpoint, a backend that cannot run on the
model's device. Every model is a seeded tiny one built locally; outputs are compared with the
un-offloaded model by torch.equal."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import budget_gb, input_ids, tiny_llama

import tensorstream as ts
from tensorstream import pressure


@pytest.fixture
def probe_every_unit(monkeypatch):
    monkeypatch.setattr(pressure, "PROBE_INTERVAL", 0)


NONSENSE = {
    "nan-capacity": lambda device: ts.MemoryReading(free=1 << 30, capacity=math.nan),
    "inf-free": lambda device: ts.MemoryReading(free=math.inf, capacity=1 << 34),
    "negative-free": lambda device: ts.MemoryReading(free=-5, capacity=1 << 34),
    "zero-capacity": lambda device: ts.MemoryReading(free=0, capacity=0),
    "tuple": lambda device: (1 << 30, 1 << 34),
    "none": lambda device: None,
    "string-free": lambda device: ts.MemoryReading(free="8G", capacity=1 << 34),
}


@pytest.mark.parametrize("kind", list(NONSENSE))
def test_a_memory_probe_returning_nonsense_is_named_and_the_model_runs_once_it_is_fixed(
    tmp_path, probe_every_unit, kind
):
    ref = tiny_llama(seed=2)
    ids = input_ids()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = ts.offload(tiny_llama(seed=2), ts.Config(tmp_path, vram_budget_gb=budget_gb(ref, 2)))

    def my_probe(device):
        return NONSENSE[kind](device)

    ts.set_memory_probe(my_probe)
    with pytest.raises(ts.InvalidArgumentError, match=r"memory probe .*my_probe.* returned") as e:
        with torch.no_grad():
            model(ids)
    assert repr(my_probe(None)) in str(e.value)
    assert "set_memory_probe(None)" in str(e.value)
    ts.set_memory_probe(None)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


def test_a_memory_probe_returning_floats_is_used_as_whole_bytes(tmp_path, probe_every_unit):
    ref = tiny_llama(seed=2)
    ids = input_ids()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = ts.offload(tiny_llama(seed=2), ts.Config(tmp_path, vram_budget_gb=budget_gb(ref, 2)))
    ts.set_memory_probe(lambda device: ts.MemoryReading(free=float(1 << 40), capacity=float(1 << 41)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    free = ts.get_model_statistics(model)["memory_free_bytes"]
    assert free == 1 << 40 and type(free) is int


# ---------------------------------------------------------------- stores and their source


def _checkpoint(tmp_path, name: str, seed: int) -> str:
    path = tmp_path / name
    tiny_llama(tied=False, seed=seed, layers=3).save_pretrained(path, max_shard_size="150KB")
    return str(path)


def test_a_store_converted_from_another_checkpoint_is_refused_naming_both(tmp_path):
    pytest.importorskip("transformers")
    a = _checkpoint(tmp_path, "ckpt-a", seed=0)
    b = _checkpoint(tmp_path, "ckpt-b", seed=1)  # same shapes, other weights
    store_a = ts.convert(a, tmp_path / "converted", dtype=torch.float32, progress=False)
    cfg = ts.Config(tmp_path / "st", vram_budget_gb=0.004)
    with pytest.raises(ts.StoreMismatchError) as e:
        ts.from_pretrained(b, cfg, dtype=torch.float32, store=store_a)
    msg = str(e.value)
    assert a in msg and b in msg and store_a in msg
    assert "tensorstream.convert" in msg
    # The store of A still serves A, bit-identical to transformers' model of A.
    import transformers

    ids = input_ids(length=7)
    ref = transformers.AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    model = ts.from_pretrained(a, cfg, dtype=torch.float32, store=store_a)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert ts.get_model_statistics(model)["source"] == "store"


def test_a_store_written_by_offload_is_refused_as_a_from_pretrained_store(tmp_path):
    pytest.importorskip("transformers")
    b = _checkpoint(tmp_path, "ckpt-b", seed=1)
    ts.offload(tiny_llama(tied=False, seed=0, layers=3), ts.Config(tmp_path / "own"))
    store = str(next((tmp_path / "own").glob("*.tstore")))
    with pytest.raises(ts.StoreMismatchError, match="records no source checkpoint"):
        ts.from_pretrained(
            b, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32, store=store
        )


# ---------------------------------------------------------------- a backend the device cannot run


@pytest.mark.parametrize("backend", ["cuda", "gpudirect"])
def test_a_gpu_backend_on_a_model_that_stays_on_the_cpu_is_a_visible_fallback(tmp_path, backend):
    ref = tiny_llama(seed=5)
    ids = input_ids()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = ts.offload(
        tiny_llama(seed=5), ts.Config(tmp_path, vram_budget_gb=budget_gb(ref, 2), backend=backend)
    )
    with pytest.warns(RuntimeWarning, match="CUDA device"), torch.no_grad():
        # the decoder stack called by itself: units run outside the model's forward
        hidden = model.model(ids).last_hidden_state
        logits = model.lm_head(hidden)
    assert torch.equal(logits, ref_logits)
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cpu-pread" and s["requested_backend"] == backend
    assert len(s["fallbacks"]) == 1 and "CUDA device" in s["fallbacks"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref_logits)
    assert len(ts.get_model_statistics(model)["fallbacks"]) == 1
