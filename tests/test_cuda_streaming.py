"""CUDA streaming: bit-identical outputs against the model fully on the GPU, the VRAM budget
held, pinned copies actually used, and GPUDirect Storage falling back visibly. Skipped
without CUDA."""

from __future__ import annotations

import gc
import warnings

import pytest
import tensorstream as ts
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GiB = 1 << 30


def _llama(seed: int = 0, layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)


def _layer_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def _budget_gb(model, units_room: float) -> float:
    layers = len(model.model.layers)
    resident = ts.estimate_model_memory(model) - layers * _layer_bytes(model)
    return (resident + units_room * (_layer_bytes(model) + 8192)) / GiB


def _reference(ids):
    ref = _llama().cuda()
    with torch.no_grad():
        logits = ref(ids).logits
        tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    torch.cuda.synchronize()
    del ref
    torch.cuda.empty_cache()
    return logits, tokens


@pytest.mark.parametrize("strategy", ["none", "next_layer", "adaptive"])
def test_cuda_logits_and_generate_match_model_fully_on_gpu(tmp_path, strategy):
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(3)).cuda()
    ref_logits, ref_tokens = _reference(ids)
    model = _llama()
    budget = _budget_gb(model, 4.5)
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=budget, prefetch_strategy=strategy))
    model.to("cuda")
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cuda"
    assert s["bytes_h2d"] > 0
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert s["pinned_host_bytes"] > 0, "host buffers were not pinned"
    assert not s["fallbacks"], s["fallbacks"]


def test_cuda_memory_stays_within_budget_plus_activation_peak(tmp_path):
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(4)).cuda()
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # whatever earlier tests left behind
    ref = _llama().cuda()
    weights = ts.estimate_model_memory(ref)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    activation_peak = torch.cuda.max_memory_allocated() - baseline - weights
    del ref
    gc.collect()
    model = _llama()
    budget = _budget_gb(model, 3.5)
    assert budget * GiB < weights, "the test needs a budget below the model size"
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=budget))
    model.to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    peak = torch.cuda.max_memory_allocated() - baseline
    # Resident modules and streamed units (the budget) plus the model's own activation and
    # KV peak; 1 MiB for the placeholders.
    assert peak <= budget * GiB + activation_peak + (1 << 20), (peak, budget * GiB, activation_peak)
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_gpudirect_falls_back_visibly_with_identical_outputs(tmp_path):
    ids = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(5)).cuda()
    ref_logits, _ = _reference(ids)
    model = _llama()
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(model, 4), backend="gpudirect"))
    model.to("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            logits = model(ids).logits
    assert torch.equal(logits, ref_logits)
    s = ts.get_model_statistics(model)
    assert any("GPUDirect" in f for f in s["fallbacks"]), s["fallbacks"]
    assert any("GPUDirect" in str(w.message) for w in caught)
    assert s["mode"] == "cuda"


def test_cuda_host_tier_disabled_streams_from_disk_through_staging_ring(tmp_path):
    ids = torch.randint(0, 1024, (1, 10), generator=torch.Generator().manual_seed(6)).cuda()
    ref_logits, _ = _reference(ids)
    model = _llama()
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(model, 3), host_cache_gb=0))
    model.to("cuda")
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, ref_logits)
    s = ts.get_model_statistics(model)
    # Every streamed access re-reads the disk: more bytes read than the model's units.
    assert s["bytes_read"] > sum(s["unit_bytes"])
