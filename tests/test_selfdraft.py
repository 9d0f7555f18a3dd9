"""A draft built from the target itself, ``offload(model, config, draft="int8")``: greedy
tokens are those of plain generation, sampled ones those of the same assisted call on the
un-offloaded model with an identically built draft; the draft's int8 layers are what the
budget counts beside the model (the tensors it shares with the model count once, the ones
the model streams are its own copies); building it changes nothing in the model; a draft
string it does not know is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import PAGE, GiB, budget_gb, input_ids, tiny_gpt2, tiny_llama
from test_speculative import LAYERS, generate, sampled_unoffloaded

import tensorstream as ts
from tensorstream.speculative.selfdraft import Int8WeightOnlyLinear, build_int8_draft


def _draft_bytes(model) -> int:
    """What the int8 draft of an untied tiny Llama adds beside it, counted from the model:
    each linear layer as int8 weights and fp32 scales, and a copy of the layers' norms
    (the layers stream; the embedding and the final norm are shared)."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            total += mod.weight.numel() + 4 * mod.weight.shape[0]
        elif name.startswith("model.layers.") and "norm" in name:
            total += sum(p.numel() * p.element_size() for p in mod.parameters())
    return total


def _offload_int8(tmp_path, model, room_units=2, **kwargs):
    budget = budget_gb(model, room_units) + _draft_bytes(model) / GiB
    cfg = ts.Config(tmp_path, vram_budget_gb=budget, backend="pread", **kwargs)
    return ts.offload(model, cfg, draft="int8")


@pytest.mark.parametrize("tied", [False, True], ids=["untied head", "tied head"])
def test_greedy_tokens_are_those_of_plain_generation(tmp_path, tied):
    ids = input_ids()
    want = generate(tiny_llama(tied=tied, seed=3, layers=LAYERS), ids)
    model = tiny_llama(tied=tied, seed=3, layers=LAYERS)
    model = _offload_int8(tmp_path, model)
    assert torch.equal(generate(model, ids), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["calls"] == 1 and s["drafted"] > 0
    assert s["acceptance"] > 0, s
    draft = model._tensorstream.draft
    assert type(draft) is type(model)
    assert isinstance(draft.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert draft.model.embed_tokens.weight is model.model.embed_tokens.weight, "shared, not copied"
    if tied:
        assert draft.lm_head.weight is model.model.embed_tokens.weight, "a tied head stays shared"
    else:
        assert isinstance(draft.lm_head, Int8WeightOnlyLinear)


def test_sampled_tokens_are_those_of_the_same_assisted_call_unoffloaded(tmp_path):
    ids = input_ids()
    model = _offload_int8(tmp_path, tiny_llama(tied=False, seed=3, layers=LAYERS))
    torch.manual_seed(5)
    got = generate(model, ids, do_sample=True, top_k=20)
    k = ts.get_model_statistics(model)["speculative"]["drafted_per_pass"]

    ref = tiny_llama(tied=False, seed=3, layers=LAYERS)
    assert torch.equal(got, sampled_unoffloaded(ref, build_int8_draft(ref), ids, k))


def test_the_budget_counts_the_draft_once(tmp_path):
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ts.BudgetError, match="the draft"):
        ts.offload(
            model, ts.Config(tmp_path, vram_budget_gb=budget_gb(model, 2), backend="pread"), draft="int8"
        )
    assert "_tensorstream_draft" not in model.__dict__ and getattr(model, "_tensorstream", None) is None
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items()), (
        "left as it was"
    )

    resident = ts.estimate_model_memory(model) - sum(p.numel() * 4 for p in model.model.layers.parameters())
    extra = _draft_bytes(model)
    model = _offload_int8(tmp_path, model)
    rt = model._tensorstream
    assert rt.budget_plan.resident == resident + extra
    assert extra < ts.estimate_model_memory(rt.draft), "the shared embedding and norm count once"
    generate(model, input_ids())
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert not any(k.startswith("_tensorstream") for k in model.state_dict()), (
        "the draft is not in the weights"
    )
    assert len(model.state_dict()) == len(want)


def test_a_tensor_the_model_streams_is_the_drafts_own_copy(tmp_path):
    """With sparse embeddings the CPU streams the embedding: the draft keeps a copy of it,
    counted in the budget, and drafts from real values (a perfect acceptance shows it: the
    int8 draft of this model drafts every token right at greedy)."""
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    embedding = model.model.embed_tokens.weight
    copy_bytes = embedding.numel() * embedding.element_size()
    budget = budget_gb(model, 2) + (_draft_bytes(model) + copy_bytes + PAGE) / GiB
    cfg = ts.Config(tmp_path, vram_budget_gb=budget, backend="pread", sparse_embeddings=True)
    model = ts.offload(model, cfg, draft="int8")
    rt = model._tensorstream
    assert any(p.get() is embedding for u in rt.units for p in u.params), "the embedding streams"
    own = rt.draft.model.embed_tokens.weight
    assert own is not embedding and torch.equal(own, embedding)
    assert rt.budget_plan.resident - ts.estimate_model_memory(model) + sum(u.nbytes for u in rt.units) == (
        _draft_bytes(model) + copy_bytes
    )
    assert torch.equal(generate(model, ids), want)
    s = ts.get_model_statistics(model)
    assert s["speculative"]["acceptance"] > 0
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_a_refused_offload_gives_a_draft_its_shared_tensors_back(tmp_path):
    """A draft given as a module may share tensors with the model too: the copies made for
    the ones the model would stream are undone when the budget is refused."""
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    draft = build_int8_draft(model)
    cfg = ts.Config(tmp_path, vram_budget_gb=budget_gb(model, 2), backend="pread", sparse_embeddings=True)
    with pytest.raises(ts.BudgetError, match="the draft"):
        ts.offload(model, cfg, draft=draft)
    assert draft.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_a_shared_tensor_the_model_would_stream_counts_for_the_draft():
    """The budget weighs streaming a module beside the draft: a tensor the two share counts
    once while the model keeps it, and for the draft (its copy) once the model streams it."""
    from tensorstream.budget import kept_beside
    from tensorstream.units import analyse, with_candidates

    model = tiny_llama(tied=False, seed=3, layers=2)
    model.__dict__["_tensorstream_draft"] = build_int8_draft(model)
    units = analyse(model, None)
    embedding = model.model.embed_tokens.weight
    streams_embedding = [
        c for c in with_candidates(model, units)[len(units) :] if any(p.get() is embedding for p in c.params)
    ]
    assert kept_beside(model, units) == _draft_bytes(model)
    assert kept_beside(model, units + streams_embedding) == _draft_bytes(model) + embedding.numel() * 4


def test_building_the_draft_changes_nothing_in_the_model():
    model = tiny_llama(tied=False, seed=3, layers=2)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    draft = build_int8_draft(model)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear), "the model keeps its layers"
    assert draft.model.norm.weight is model.model.norm.weight
    assert draft.model.layers[0].input_layernorm.weight is model.model.layers[0].input_layernorm.weight


def test_a_gpt2_draft_quantizes_its_conv1d_layers(tmp_path):
    ids = input_ids()
    want = generate(tiny_gpt2(seed=3, layers=LAYERS), ids)
    model = ts.offload(tiny_gpt2(seed=3, layers=LAYERS), ts.Config(tmp_path, backend="pread"), draft="int8")
    draft = model._tensorstream.draft
    assert isinstance(draft.transformer.h[0].attn.c_attn, Int8WeightOnlyLinear)
    assert torch.equal(generate(model, ids), want)
    assert ts.get_model_statistics(model)["speculative"]["acceptance"] > 0


@pytest.mark.parametrize("in_features", [64, 24], ids=["int8pack kernel", "dequantized (K % 16 != 0)"])
def test_the_int8_layer_computes_with_its_quantized_weight(in_features):
    torch.manual_seed(0)
    weight, bias = torch.randn(48, in_features), torch.randn(48)
    weight[3] = 0  # a zero row: scale 1, no division by zero
    layer = Int8WeightOnlyLinear.from_weight(weight, bias)
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    assert torch.equal(layer.qweight[3], torch.zeros(in_features, dtype=torch.int8))
    x = torch.randn(2, 5, in_features)
    y = layer(x)
    exact = F.linear(x, layer.qweight.float() * layer.scale[:, None], bias)
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    # bf16 activations on the kernel path: within bf16's rounding of the exact product.
    assert (y - exact).norm() / exact.norm() < 1e-2
    assert (y - F.linear(x, weight, bias)).norm() / F.linear(x, weight, bias).norm() < 2e-2


def test_an_unknown_draft_string_is_refused(tmp_path):
    model = tiny_llama(tied=False, seed=3, layers=2)
    with pytest.raises(ts.InvalidArgumentError, match=r"'int4'.*'int8'"):
        ts.offload(model, ts.Config(tmp_path), draft="int4")
    assert getattr(model, "_tensorstream", None) is None and not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_the_int8_draft_moves_with_the_model_and_keeps_its_tokens(tmp_path):
    ids = input_ids().cuda()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS).cuda(), ids)
    model = _offload_int8(tmp_path, tiny_llama(tied=False, seed=3, layers=LAYERS)).to("cuda")
    draft = model._tensorstream.draft
    assert draft.model.layers[0].mlp.up_proj.qweight.device.type == "cuda"
    assert torch.equal(generate(model, ids), want)
    assert ts.get_model_statistics(model)["speculative"]["acceptance"] > 0
