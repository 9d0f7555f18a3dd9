"""Module moves after offload(): to() the same device keeps streaming and identical outputs;
a dtype change of streamed units is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, budget_gb, input_ids, logits_and_tokens, offload, tiny_gpt2, tiny_llama

import tensorstream as ts


@pytest.fixture(scope="module")
def reference():
    ids = input_ids(seed=61)
    return ids, logits_and_tokens(tiny_llama(tied=True, seed=5), ids)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_to_cpu_after_offload_keeps_streaming_and_outputs_identical(tmp_path, reference, backend):
    ids, (ref_logits, ref_tokens) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2), backend=backend)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)

    assert model.to("cpu") is model
    model.cpu()
    model.to(torch.device("cpu"))

    logits, tokens = logits_and_tokens(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    assert s["device"] == "cpu"
    assert s["mode"] == f"cpu-{backend}"
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_to_cpu_before_the_first_forward_works(tmp_path, reference):
    ids, (ref_logits, _) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2)).to("cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


def test_same_dtype_casts_after_offload_are_accepted(tmp_path, reference):
    ids, (ref_logits, _) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2))
    model.float()
    model.to(torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.double(),
        lambda m: m.to("cpu", torch.float16),
    ],
    ids=["half", "to_bfloat16", "double", "to_cpu_float16"],
)
def test_dtype_change_after_offload_raises_invalid_argument_naming_the_unit(tmp_path, cast):
    model = tiny_gpt2(seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2))
    with pytest.raises(ts.InvalidArgumentError, match=r"transformer\.h\.0.*torch\.float32") as info:
        cast(model)
    assert isinstance(info.value, ValueError)
    assert "before offloading" in str(info.value)


def test_refused_dtype_change_leaves_model_unchanged_and_outputs_identical(tmp_path, reference):
    ids, (ref_logits, _) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2))
    with pytest.raises(ts.InvalidArgumentError):
        model.half()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


@pytest.mark.parametrize("backend", ["cuda", "gpudirect"])
def test_gpu_backend_requested_on_cpu_falls_back_visibly_to_pread_with_identical_outputs(
    tmp_path, reference, backend
):
    ids, (ref_logits, _) = reference
    model = tiny_llama(tied=True, seed=5)
    # Reported when a forward runs on CPU (offloading on CPU then moving to CUDA is normal).
    with pytest.warns(RuntimeWarning, match="CUDA device"), torch.no_grad():
        model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2), backend=backend)
        logits = model(ids).logits
    assert torch.equal(logits, ref_logits)
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cpu-pread"
    assert s["requested_backend"] == backend
    assert len(s["fallbacks"]) == 1 and "CUDA device" in s["fallbacks"][0]


def test_auto_backend_on_cpu_memory_maps_a_store_that_fits_in_ram(tmp_path, reference):
    ids, (ref_logits, _) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2), backend="auto")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
    s = ts.get_model_statistics(model)
    assert s["mode"] == "cpu-mmap"
    assert not s["fallbacks"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_move_reads_nothing_and_materialises_no_streamed_weight(tmp_path, reference, backend):
    ids, (ref_logits, _tokens) = reference
    model = tiny_llama(tied=True, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2), backend=backend)
    rt = model._tensorstream
    reads = []
    real = rt.reads.param_value
    rt.reads.param_value = lambda i, k: reads.append((i, k)) or real(i, k)
    model.to("cpu")
    assert reads == [], f"the move read {len(reads)} streamed weights"
    streamed = [p.get() for u in rt.units for p in u.params]
    with torch._C.DisableTorchFunctionSubclass():
        assert all(t.untyped_storage().nbytes() <= t.element_size() for t in streamed)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)
