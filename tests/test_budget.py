"""Budgets are hard limits: the engine's own accounting never passes the budget during
generation, and a budget that cannot hold the largest unit times the prefetch window is
refused at offload() with the numbers."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    GiB,
    budget_gb,
    input_ids,
    logits_and_tokens,
    offload,
    padded_unit_bytes,
    param_bytes,
    resident_bytes,
    tiny_gpt2,
    tiny_llama,
)

import tensorstream as ts

# (strategy, memory pressure mode) -> units the planner needs at once
WINDOW = {
    ("none", "balanced"): 1,
    ("next_layer", "balanced"): 2,
    ("adaptive", "conservative"): 2,
    ("adaptive", "balanced"): 2,
    ("adaptive", "aggressive"): 3,
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("strategy", "mode"), list(WINDOW))
@pytest.mark.parametrize("extra_units", [0, 1.5, 2.5])
def test_usage_never_exceeds_budget_during_generation(tmp_path, strategy, mode, backend, extra_units):
    model = tiny_llama(tied=False, seed=2, layers=6)
    budget = budget_gb(model, WINDOW[(strategy, mode)] + extra_units)
    model = offload(
        model,
        tmp_path,
        vram_budget_gb=budget,
        prefetch_strategy=strategy,
        memory_pressure_mode=mode,
        backend=backend,
    )
    rt = model._tensorstream
    peak_held = 0
    original = rt._track_peak

    def track():
        # Sample the held bytes at every access, independently of the runtime's counter.
        nonlocal peak_held
        original()
        peak_held = max(peak_held, rt.held_bytes(), rt.planner.stats()["used"])

    rt._track_peak = track
    logits_and_tokens(model, input_ids(length=6, seed=31), new_tokens=5)

    s = ts.get_model_statistics(model)
    assert s["budget_bytes"] == int(budget * GiB)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert s["resident_module_bytes"] + peak_held <= s["budget_bytes"]
    assert s["planner"]["peak_used"] <= rt.planner.budget
    assert rt.planner.budget == s["budget_bytes"] - s["resident_module_bytes"]
    assert s["vram_usage_gb"] * GiB <= rt.planner.budget
    # The budget did not fit every unit, so units were streamed.
    assert s["resident_layers"] < s["units"]
    assert s["bytes_read"] > sum(s["unit_bytes"])


@pytest.mark.parametrize(("strategy", "mode"), list(WINDOW))
def test_budget_one_unit_short_of_the_window_raises_budget_error_with_the_numbers(tmp_path, strategy, mode):
    model = tiny_llama(tied=False, seed=2)
    largest = max(param_bytes(b) for b in model.model.layers)
    window = WINDOW[(strategy, mode)]
    # Short of the window even with every module streamed (embeddings and head included).
    with pytest.raises(ts.BudgetError) as info:
        offload(
            model,
            tmp_path,
            vram_budget_gb=(window - 0.5) * padded_unit_bytes(largest) / GiB,
            prefetch_strategy=strategy,
            memory_pressure_mode=mode,
        )
    err = info.value
    assert isinstance(err, ValueError)
    msg = str(err)
    numbers = {int(n) for n in re.findall(r"\d+", msg)}
    unit_bytes = padded_unit_bytes(largest) - 4096  # the store's size of the unit
    assert unit_bytes in numbers or largest in numbers, msg
    assert strategy in msg
    assert "vram_budget_gb" in msg
    # The model is left as it was: not offloaded, weights intact.
    assert getattr(model, "_tensorstream", None) is None


@pytest.mark.parametrize(("strategy", "mode"), list(WINDOW))
def test_budget_of_exactly_the_window_is_accepted_and_works(tmp_path, strategy, mode):
    ids = input_ids(length=5, seed=32)
    ref = tiny_llama(tied=False, seed=2)
    model = tiny_llama(tied=False, seed=2)
    model = offload(
        model,
        tmp_path,
        vram_budget_gb=budget_gb(model, WINDOW[(strategy, mode)]),
        prefetch_strategy=strategy,
        memory_pressure_mode=mode,
    )
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_budget_below_the_resident_modules_streams_them_or_raises_budget_error(tmp_path):
    # Half the resident modules: they are streamed too, and the window still does not fit.
    model = tiny_gpt2(seed=2)
    with pytest.raises(ts.BudgetError, match=r"largest unit takes \d+ bytes"):
        offload(model, tmp_path, vram_budget_gb=resident_bytes(model) / 2 / GiB)
    assert getattr(model, "_tensorstream", None) is None


def test_budget_error_message_names_the_largest_unit_bytes(tmp_path):
    model = tiny_llama(tied=False, seed=2)
    with pytest.raises(ts.BudgetError) as info:
        offload(
            model,
            tmp_path,
            vram_budget_gb=0.5 * padded_unit_bytes(largest_layer(model)) / GiB,
            prefetch_strategy="none",
        )
    store = ts._core.Store(str(tmp_path / "LlamaForCausalLM.tstore"))
    layer_sizes = {u[3] for u in store.units() if u[0].startswith("model.layers.")}
    assert len(layer_sizes) == 1
    assert f"largest unit takes {layer_sizes.pop()} bytes" in str(info.value)


def largest_layer(model) -> int:
    return max(param_bytes(b) for b in model.model.layers)


def test_model_refused_for_its_budget_is_left_intact_and_can_be_offloaded_again(tmp_path):
    ids = input_ids(seed=33)
    with torch.no_grad():
        expected = tiny_llama(tied=False, seed=2)(ids).logits
    model = tiny_llama(tied=False, seed=2)
    with pytest.raises(ts.BudgetError):
        offload(model, tmp_path, vram_budget_gb=budget_gb(model, 0.5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_modules_that_do_not_fit_beside_the_window_are_streamed_too(tmp_path):
    """A budget too small for the embeddings and head beside the window makes them units."""
    ids = input_ids(length=6, seed=33)
    for tied in (False, True):
        ref = tiny_llama(tied=tied, seed=4)
        expected = logits_and_tokens(ref, ids, new_tokens=4)
        model = tiny_llama(tied=tied, seed=4)
        largest = max(param_bytes(b) for b in model.model.layers)
        budget = 2.2 * padded_unit_bytes(largest) / GiB  # the window, and little else
        model = offload(model, tmp_path / f"t{tied}", vram_budget_gb=budget)
        got = logits_and_tokens(model, ids, new_tokens=4)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        s = ts.get_model_statistics(model)
        names = [u.name for u in model._tensorstream.units]
        assert any("embed_tokens" in n for n in names), names
        if tied:  # one unit for the tied embedding and head
            assert any("embed_tokens" in n and "lm_head" in n for n in names), names
        assert s["peak_usage_bytes"] <= s["budget_bytes"]


def tiny_albert(seed: int = 0):
    """A tiny ALBERT: one shared layer group, run four times per forward, holds most of the
    model's bytes."""
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_hidden_groups=1,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return AlbertModel(cfg).eval()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("strategy", "mode"), list(WINDOW))
def test_one_shared_block_streams_at_the_models_own_size(tmp_path, backend, strategy, mode):
    # The window holds the one shared block once, not twice: a budget of the model's own
    # bytes works (it was refused below 126% when the minimum was two copies of the block).
    ref, model = tiny_albert(), tiny_albert()
    block = param_bytes(model.encoder.albert_layer_groups[0])
    assert block > 0.7 * ts.estimate_model_memory(model)
    model = offload(
        model,
        tmp_path,
        vram_budget_gb=ts.estimate_model_memory(model) / GiB,
        units=["AlbertLayerGroup"],
        backend=backend,
        prefetch_strategy=strategy,
        memory_pressure_mode=mode,
    )
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).last_hidden_state, ref(ids).last_hidden_state)
    p = ts.get_model_statistics(model)["planner"]
    assert p["hits"][0] + p["prefetch_hits"][0] + p["misses"][0] == 8  # the block, four times a forward


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("strategy", "mode"), list(WINDOW))
def test_a_budget_of_the_whole_model_is_never_refused(tmp_path, backend, strategy, mode):
    ids = input_ids(length=5, seed=33)
    ref, model = tiny_llama(tied=False, seed=4), tiny_llama(tied=False, seed=4)
    total = ts.estimate_model_memory(model)
    model = offload(
        model,
        tmp_path,
        vram_budget_gb=total / GiB,
        backend=backend,
        prefetch_strategy=strategy,
        memory_pressure_mode=mode,
    )
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(ids).logits, ref(ids).logits)
    assert ts.get_model_statistics(model)["misses"] <= ts.get_model_statistics(model)["units"]


def test_default_budgets_of_several_models_share_the_machine(tmp_path):
    from tensorstream.memory import total_ram

    models = [
        offload(tiny_llama(tied=False, seed=s), tmp_path / f"m{s}", store_name=f"m{s}.tstore")
        for s in range(6)
    ]
    stats = [ts.get_model_statistics(m) for m in models]
    # Each default budget is what its model needs, not all the free RAM again.
    for s in stats:
        assert s["budget_bytes"] == s["resident_module_bytes"] + sum(s["unit_bytes"])
    assert sum(s["budget_bytes"] for s in stats) < total_ram()
    ids = input_ids()
    ref = tiny_llama(tied=False, seed=5)
    with torch.no_grad():
        assert torch.equal(models[5](ids).logits, ref(ids).logits)


def test_explicit_budgets_adding_up_past_the_machine_warn(tmp_path):
    from tensorstream.memory import total_ram

    big = 0.6 * total_ram() / GiB
    first = offload(tiny_llama(tied=False, seed=1), tmp_path / "a", vram_budget_gb=big)
    with pytest.warns(RuntimeWarning, match="budgets of the 2 models .* add up to"):
        second = offload(tiny_llama(tied=False, seed=2), tmp_path / "b", vram_budget_gb=big)
    assert ts.get_model_statistics(first)["budget_bytes"] == ts.get_model_statistics(second)["budget_bytes"]
