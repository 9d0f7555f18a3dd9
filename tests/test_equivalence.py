"""Offloaded Hugging Face models give bit-identical logits and greedy tokens to the same
model run in memory, for every prefetch strategy and CPU backend, with a budget that forces
streaming (room for 2.5 of the 4 decoder layers)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ALL_STRATEGIES,
    CPU_BACKENDS,
    budget_gb,
    input_ids,
    logits_and_tokens,
    offload,
    tiny_gpt2,
    tiny_llama,
)

import tensorstream as ts

ARCHITECTURES = {
    "llama_tied": lambda seed: tiny_llama(tied=True, seed=seed),
    "llama_untied": lambda seed: tiny_llama(tied=False, seed=seed),
    "gpt2": lambda seed: tiny_gpt2(seed=seed),
}

_references: dict = {}


def _reference(arch: str, ids: torch.Tensor) -> tuple:
    """Logits and tokens of the un-offloaded model, computed once per architecture."""
    if arch not in _references:
        _references[arch] = logits_and_tokens(ARCHITECTURES[arch](7), ids)
    return _references[arch]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_offloaded_logits_and_greedy_tokens_are_bit_identical_to_in_memory_model(
    tmp_path, arch, strategy, backend
):
    ids = input_ids(batch=2, length=8, seed=11)
    ref_logits, ref_tokens = _reference(arch, ids)
    model = ARCHITECTURES[arch](7)
    model = offload(
        model, tmp_path, vram_budget_gb=budget_gb(model, 2.5), prefetch_strategy=strategy, backend=backend
    )

    logits, tokens = logits_and_tokens(model, ids)

    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    assert s["mode"] == f"cpu-{backend}"
    assert s["prefetch_strategy"] == strategy
    assert s["units"] == 4
    # Streaming really happened: units were read more than once over the run and the
    # budget could not hold all of them.
    assert s["resident_layers"] < 4
    assert s["bytes_read"] > sum(s["unit_bytes"])
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert not s["fallbacks"]


def test_tied_embedding_stays_tied_and_resident_after_offload(tmp_path):
    model = tiny_llama(tied=True, seed=7)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2.5))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.untyped_storage().nbytes() == model.lm_head.weight.numel() * 4


def test_repeated_forwards_stay_identical_while_units_move_in_and_out(tmp_path):
    ids = input_ids(length=5, seed=12)
    ref = tiny_llama(tied=False, seed=3)
    model = tiny_llama(tied=False, seed=3)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 2), prefetch_strategy="adaptive")
    with torch.no_grad():
        expected = ref(ids).logits
        for _ in range(4):
            assert torch.equal(model(ids).logits, expected)
    assert ts.get_model_statistics(model)["forward_passes"] == 4
