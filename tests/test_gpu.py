"""Offload on CPU, then run on the GPU: bit-identical logits and greedy tokens against the same
model fully on the GPU, memory within the budget plus the model's own activation peak, and a
visible fallback from GPUDirect Storage. Skipped cleanly without CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ALL_STRATEGIES, GiB, budget_gb, small_llama_bf16

import tensorstream as ts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NEW_TOKENS = 8
UNITS_ROOM = 3  # of 8 layers


def _generate(model, ids):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(71)).cuda()


@pytest.fixture(scope="module")
def reference(ids):
    """Logits, tokens and the activation/KV peak of the model fully on the GPU."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    model = small_llama_bf16(seed=0).cuda()
    torch.cuda.synchronize()
    with torch.no_grad():
        logits = model(ids).logits
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        tokens = _generate(model, ids)
        torch.cuda.synchronize()
        activation_peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return {"logits": logits, "tokens": tokens, "activation_peak": activation_peak}


def _offloaded_on_gpu(tmp_path, **kwargs):
    model = small_llama_bf16(seed=0)
    kwargs.setdefault("vram_budget_gb", budget_gb(model, UNITS_ROOM))
    budget = kwargs["vram_budget_gb"]
    assert budget * GiB < ts.estimate_model_memory(model), "the budget must force streaming"
    model = ts.offload(model, ts.Config(tmp_path, **kwargs))
    return model.to("cuda")


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_gpu_logits_and_greedy_tokens_bit_identical_to_model_fully_on_gpu(tmp_path, ids, reference, strategy):
    model = _offloaded_on_gpu(tmp_path, prefetch_strategy=strategy)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = _generate(model, ids)
    assert torch.equal(logits, reference["logits"])
    assert torch.equal(tokens, reference["tokens"])
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cuda"
    assert s["device"].startswith("cuda")
    assert s["bytes_h2d"] > 0
    assert s["pinned_host_bytes"] > 0, "host buffers were not pinned"
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert s["resident_layers"] < s["units"]
    assert not [f for f in s["fallbacks"] if "CUDA device" not in f], s["fallbacks"]


def test_gpu_memory_during_offloaded_generation_stays_within_budget_plus_activation_peak(
    tmp_path, ids, reference
):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()  # what other tests' fixtures hold on the GPU
    torch.cuda.reset_peak_memory_stats()
    model = _offloaded_on_gpu(tmp_path)
    budget = ts.get_model_statistics(model)["budget_bytes"]
    with torch.no_grad():
        tokens = _generate(model, ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert torch.equal(tokens, reference["tokens"])
    # 1 MiB for the placeholders and the allocator's rounding.
    assert peak <= budget + reference["activation_peak"] + (1 << 20), (
        peak,
        budget,
        reference["activation_peak"],
    )
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_gpudirect_falls_back_visibly_with_identical_outputs(tmp_path, ids, reference):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU-side fallback while it is not on the GPU yet
        model = _offloaded_on_gpu(tmp_path, backend=ts.BackendType.GPUDIRECT)
    with pytest.warns(RuntimeWarning, match="GPUDirect") as caught, torch.no_grad():
        logits = model(ids).logits
        tokens = _generate(model, ids)
    assert caught
    assert torch.equal(logits, reference["logits"])
    assert torch.equal(tokens, reference["tokens"])
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cuda"
    assert s["requested_backend"] == "gpudirect"
    assert s["fallbacks"]
    assert any("GPUDirect" in f for f in s["fallbacks"]), s["fallbacks"]


def test_host_tier_disabled_streams_from_disk_through_the_staging_ring(tmp_path, ids, reference):
    model = _offloaded_on_gpu(tmp_path, host_cache_gb=0)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, reference["logits"])
    s = ts.get_model_statistics(model)
    # Without the host tier every streamed access reads the disk again.
    assert s["bytes_read"] > sum(s["unit_bytes"][: s["units"]])
    assert s["pinned_host_bytes"] > 0  # the staging ring
    assert not s["fallbacks"], s["fallbacks"]


def test_compressed_streaming_carries_coded_bytes_over_the_link_with_identical_outputs(
    tmp_path, ids, reference
):
    # backend="cuda" makes offload() write the table code, which the GPU decodes.
    model = _offloaded_on_gpu(tmp_path, backend="cuda", compression_enabled=True)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = _generate(model, ids)
    assert torch.equal(logits, reference["logits"])
    assert torch.equal(tokens, reference["tokens"])
    s = ts.get_model_statistics(model)
    assert s["gpu_coded_units"] > 0
    assert s["pcie_bytes"] * 1.25 < s["raw_bytes_delivered"], (s["pcie_bytes"], s["raw_bytes_delivered"])
    assert s["gpu_decode_seconds"] > 0 and s["gpu_decode_gbps"] > 0
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_compressed_streaming_without_the_host_tier_reads_coded_bytes_from_disk(tmp_path, ids, reference):
    model = _offloaded_on_gpu(tmp_path, backend="cuda", compression_enabled=True, host_cache_gb=0)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(ids).logits, reference["logits"])
    s = ts.get_model_statistics(model)
    assert s["gpu_coded_units"] > 0
    assert s["bytes_read"] > 0 and s["pcie_bytes"] * 1.25 < s["raw_bytes_delivered"]


def test_a_mixture_of_experts_streams_to_the_gpu_with_identical_outputs(tmp_path):
    """On CUDA an experts unit streams whole through the planner, nested in its block's unit
    (tensorstream.sparse slices on the CPU paths only): outputs equal the model on the GPU."""
    from conftest import tiny_mixtral

    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5)).cuda()
    ref = tiny_mixtral(seed=0, layers=3, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        want = ref(ids).logits, _generate(ref, ids)
    del ref
    model = tiny_mixtral(seed=0, layers=3, dtype=torch.bfloat16)
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=budget_gb(model, 2.5)))
    model.to("cuda")
    with torch.no_grad():
        got = model(ids).logits, _generate(model, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(model)
    assert s["experts"] is None and s["units"] >= 6 and s["peak_usage_bytes"] <= s["budget_bytes"]
