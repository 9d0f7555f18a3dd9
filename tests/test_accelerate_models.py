"""offload() of a model accelerate dispatched (transformers' ``device_map="auto"`` with CPU and
disk offload, the usual way a model that does not fit arrives) and of a model whose weights
are nowhere (the meta device).

The dispatched model is built locally: a seeded tiny Llama saved with save_pretrained, loaded
back with ``device_map="auto"``, a small ``max_memory`` for the CPU and an offload folder (on
a CPU-only machine accelerate keeps what fits on the CPU and offloads the rest to disk). The
reference is the same checkpoint loaded whole in memory."""

from __future__ import annotations

import pytest
import torch
from conftest import input_ids, logits_and_tokens, tiny_llama

import tensorstream as ts

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _checkpoint(tmp_path, tied: bool) -> str:
    path = tmp_path / "ckpt"
    tiny_llama(tied=tied, seed=3).save_pretrained(path)
    return str(path)


def _in_memory(ck: str):
    return transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()


def _dispatched(ck: str, tmp_path):
    """The checkpoint as transformers loads it when it does not fit: some layers on the CPU,
    the others on disk in the offload folder, behind accelerate's hooks."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ck,
        dtype=torch.float32,
        device_map="auto",
        max_memory={"cpu": 300_000},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(model.hf_device_map.values())  # the case under test
    assert any(p.device.type == "meta" for p in model.parameters())
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    return model


def _budget(model) -> float:
    return (
        4 * sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters()) / (1 << 30) + 0.001
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_offload_of_a_model_accelerate_offloaded_to_disk_matches_the_model_in_memory(tmp_path, tied, backend):
    ck = _checkpoint(tmp_path, tied)
    ids = input_ids(length=7)
    ref_logits, ref_tokens = logits_and_tokens(_in_memory(ck), ids)
    model = _dispatched(ck, tmp_path)
    model = ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=_budget(model), backend=backend))
    # accelerate's hooks are gone (ours run the layers), and no weight is left on meta.
    assert not any(hasattr(m, "_hf_hook") or hasattr(m, "_old_forward") for m in model.modules())
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not hasattr(model, "hf_device_map")
    logits, tokens = logits_and_tokens(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    # The weights on disk went to the store one at a time: the streamed layers are not in memory.
    assert ts.get_model_statistics(model)["bytes_read"] > 0


def test_weights_accelerate_offloaded_are_read_one_tensor_at_a_time(tmp_path, monkeypatch):
    """The store is written from accelerate's weights map tensor by tensor: at every read from
    it, no layer accelerate put on disk is materialised in the model, and no more than two of
    the tensors read are alive (the one read now and the one just written)."""
    import weakref

    from accelerate.utils import offload as accel_offload

    ck = _checkpoint(tmp_path, tied=False)
    model = _dispatched(ck, tmp_path)
    on_disk = [
        (mod, attr)
        for name, mod in model.model.layers.named_modules()
        for attr, p in mod._parameters.items()
        if p is not None and p.device.type == "meta"
    ]
    assert on_disk

    def materialised() -> int:
        n = 0
        for mod, attr in on_disk:
            p = mod._parameters[attr]
            with torch._C.DisableTorchFunctionSubclass():
                if p.device.type != "meta" and p.untyped_storage().nbytes() >= p.numel() * p.element_size():
                    n += 1
        return n

    alive, most, reads = [], [0], [0]
    real_getitem = accel_offload.OffloadedWeightsLoader.__getitem__

    def counting_getitem(self, key):
        t = real_getitem(self, key)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(t))
        most[0] = max(most[0], len(alive))
        if key.startswith("model.layers."):
            reads[0] += 1
            assert materialised() == 0, f"reading {key}: layers already materialised"
        return t

    monkeypatch.setattr(accel_offload.OffloadedWeightsLoader, "__getitem__", counting_getitem)
    ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=_budget(model), backend="pread"))
    assert reads[0] >= len(on_disk)
    assert 0 < most[0] <= 2


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_offload_of_a_model_offloaded_with_accelerates_own_functions_matches_the_model_in_memory(
    tmp_path, how
):
    """accelerate.cpu_offload and disk_offload of a model in memory: its hooks keep the weights
    (a state dict in RAM, .dat files on disk) and load them back as new tensors when removed."""
    import accelerate

    ids = input_ids(length=7)
    ref_logits, ref_tokens = logits_and_tokens(tiny_llama(tied=False, seed=8), ids)
    model = tiny_llama(tied=False, seed=8)
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device="cpu")
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    assert any(p.device.type == "meta" for p in model.parameters())
    model = ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=_budget(model)))
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    logits, tokens = logits_and_tokens(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


def test_a_refused_offload_leaves_the_dispatched_model_as_accelerate_left_it(tmp_path):
    ck = _checkpoint(tmp_path, tied=False)
    ids = input_ids(length=7)
    ref_logits, _ = logits_and_tokens(_in_memory(ck), ids)
    model = _dispatched(ck, tmp_path)
    with pytest.raises(ts.BudgetError):
        ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=1e-6))
    assert getattr(model, "_tensorstream", None) is None
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    assert any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    # and it can still be offloaded
    model = ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=_budget(model)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


def test_offload_of_a_model_on_the_meta_device_points_to_from_pretrained(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    with pytest.raises(ts.TensorStreamError, match=r"meta device.*tensorstream\.from_pretrained"):
        ts.offload(model, ts.Config(tmp_path / "st"))
    assert getattr(model, "_tensorstream", None) is None
    assert all(p.device.type == "meta" for p in model.parameters())
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())
