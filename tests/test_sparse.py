"""Sparse units (tensorstream.sparse): mixture-of-experts models streamed expert by expert
and embeddings a block of rows at a time. Outputs `torch.equal` to the un-offloaded model for
every MoE family, budget and batch size; only the routed experts and the tokens' rows read,
counted by the engine; the budget held; whole blocks when named."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from test_families import _build, seeded

import tensorstream as ts

transformers = pytest.importorskip("transformers")

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "phimoe", "granitemoe", "jamba"]


def _reference(model, ids: torch.Tensor, new_tokens: int = 5) -> tuple:
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return logits, tokens


def _ids(batch: int, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _offload(model, path, share: float, **kw):
    size = ts.estimate_model_memory(model)
    return ts.offload(model, ts.Config(storage_path=path, vram_budget_gb=share * size / 2**30, **kw))


@pytest.mark.parametrize("name", MOE_FAMILIES)
@pytest.mark.parametrize("backend,share", [("mmap", 0.45), ("pread", 0.45), ("pread", 0.8)])
def test_every_moe_family_streams_experts_bit_identically(tmp_path, name, backend, share):
    model, _ = _build(name)
    want = {b: _reference(model, _ids(b)) for b in (1, 3)}
    om = _offload(model, tmp_path, share, backend=backend)
    for b in (1, 3):
        logits, tokens = _reference(om, _ids(b))
        assert torch.equal(logits, want[b][0]), (name, b)
        assert torch.equal(tokens, want[b][1]), (name, b)
    s = ts.get_model_statistics(om)
    ex = s["experts"]
    assert ex is not None and ex["units"] >= 1 and ex["calls"] > 0
    if share > 0.5:  # room for more than one layer's experts
        assert ex["hits"] + ex["prefetch_hits"] > 0, "the cache never served an expert"
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gpt_oss_experts_with_biases_stream_expert_by_expert(tmp_path, backend):
    """GPT-OSS names the routed experts router_indices and gives each expert biases."""
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
        sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = seeded(transformers.GptOssForCausalLM(cfg).eval())
    ids = _ids(2, 12)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.5, backend=backend)
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    assert (
        s["experts"] is not None and s["experts"]["units"] == 3 and s["peak_usage_bytes"] <= s["budget_bytes"]
    )


def test_out_of_range_ids_looked_up_in_parts_raise_like_the_embedding(tmp_path):
    model = _llama()
    ids = _tokens(1, 40)
    ids[0, 5] = -1
    with pytest.raises(IndexError):
        model(ids)
    om = None
    for percent in range(5, 100):  # the smallest budget accepted: the rows are looked up in parts
        try:
            om = _offload(model, tmp_path, percent / 100, backend="pread", sparse_embeddings=True)
            break
        except ts.BudgetError:
            continue
    with torch.no_grad(), pytest.raises(IndexError):
        om(ids)


def _qwen3_moe(experts: int = 16, layers: int = 4, impl=None):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=64,
    )  # fmt: skip
    if impl:
        cfg._experts_implementation = impl
    torch.manual_seed(0)
    return seeded(transformers.Qwen3MoeForCausalLM(cfg).eval())


@pytest.mark.parametrize("share", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("impl", ["grouped_mm", "eager", "batched_mm"])
def test_budgets_and_experts_implementations(tmp_path, share, impl):
    model = _qwen3_moe(impl=impl)
    ids = _ids(2, 9)
    want = _reference(model, ids, 8)
    om = _offload(model, tmp_path, share, backend="pread")
    got = _reference(om, ids, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    # A budget of the model's own size may take the buffers' page alignment on top.
    assert s["peak_usage_bytes"] <= (s["budget_bytes"] if share < 1 else s["effective_budget_bytes"])
    assert s["experts"]["held_bytes"] <= s["experts"]["share_bytes"]


def test_a_decoded_token_reads_only_its_routed_experts(tmp_path):
    """Per decoded token at most top-2 of 16 experts per layer on demand, plus what lookahead
    prefetched; from the engine's own byte counts, far below reading the layers whole."""
    layers, top_k = 4, 2
    model = _qwen3_moe(layers=layers)
    om = _offload(model, tmp_path, 0.3, backend="pread")
    ids = _ids(1, 8)
    with torch.no_grad():
        out = om(ids, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(6):
            s0 = ts.get_model_statistics(om)
            out = om(nxt, cache=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            s1 = ts.get_model_statistics(om)
            e0, e1 = s0["experts"], s1["experts"]
            demand = e1["misses"] - e0["misses"]
            prefetched = e1["prefetched"] - e0["prefetched"]
            assert demand <= top_k * layers
            assert e1["bytes_read"] - e0["bytes_read"] <= (demand + prefetched) * e1["slice_bytes"]
            # The engine's count: the experts' reads, and each dense unit at most twice (once
            # for this pass, once prefetched at its end for the next).
            dense = sum(
                b for b, u in zip(s1["unit_bytes"], om._tensorstream.units) if not u.name.endswith("experts")
            )
            assert s1["bytes_read"] - s0["bytes_read"] <= (e1["bytes_read"] - e0["bytes_read"]) + 2 * dense
            whole = layers * 16 * e1["slice_bytes"]
            assert e1["bytes_read"] - e0["bytes_read"] <= whole / 2
            assert s1["peak_usage_bytes"] <= s1["budget_bytes"]
    assert e1["prediction_hit_rate"] > 0


def test_naming_the_decoder_layer_streams_blocks_whole(tmp_path):
    model = _qwen3_moe()
    ids = _ids(1, 8)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.6, backend="pread", units=["Qwen3MoeDecoderLayer"])
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    assert s["experts"] is None
    assert [u.name for u in om._tensorstream.units][:4] == [f"model.layers.{k}" for k in range(4)]


def test_state_dict_and_save_read_every_expert(tmp_path):
    model = _qwen3_moe()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    om = _offload(model, tmp_path / "s", 0.3, backend="pread")
    with torch.no_grad():
        om(_ids(1))
    got = om.state_dict()
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_an_exception_inside_the_experts_leaves_nothing_held(tmp_path):
    model = _qwen3_moe()
    ids = _ids(1)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.3, backend="pread")
    experts = om.model.layers[2].mlp.experts

    def boom(*_a):
        raise KeyboardInterrupt

    h = experts.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad():
            om(ids)
    assert ts.get_model_statistics(om)["experts"]["held_bytes"] == 0
    h.remove()
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_compressed_store_reads_experts_units_whole(tmp_path):
    """Coded chunks decode only whole: the experts of a compressed store are read a unit at a
    time, and the answer is the same."""
    model = _qwen3_moe()
    ids = _ids(1)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.6, backend="pread", compression_enabled=True)
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_budget_below_one_layers_experts_is_refused_with_the_numbers(tmp_path):
    model = _qwen3_moe()
    with pytest.raises(ts.BudgetError, match=r"sparse cache at least \d+ bytes \(a layer's experts"):
        _offload(model, tmp_path, 0.1, backend="pread")


# ------------------------------------------------------------------ embedding rows


def _llama(tied: bool = False, vocab: int = 4096):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _tokens(batch: int, length: int, vocab: int = 4096, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_embedding_reads_only_the_rows_of_its_tokens(tmp_path, backend):
    model = _llama()
    ids = _tokens(2, 9)
    want = _reference(model, ids, 6)
    om = _offload(model, tmp_path, 0.6, backend=backend, sparse_embeddings=True)
    got = _reference(om, ids, 6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    emb = s["embedding"]
    assert emb is not None and emb["units"] == 1 and s["peak_usage_bytes"] <= s["budget_bytes"]
    # Each call reads at most the row blocks of its tokens: far from the whole embedding.
    before = emb["bytes_read"]
    with torch.no_grad():
        om(_tokens(1, 1, seed=9))
    read = ts.get_model_statistics(om)["embedding"]["bytes_read"] - before
    assert read <= emb["slice_bytes"] < 4096 * 64 * 4 / 8


def test_rows_that_do_not_fit_the_share_are_looked_up_in_parts(tmp_path):
    """Near the smallest budget the cache holds a row block or two; a prompt touching many
    blocks is looked up in parts, with the same values."""
    model = _llama()
    ids = _tokens(1, 40)
    want = _reference(model, ids, 3)
    for percent in range(5, 100):  # the smallest budget accepted, to a percent of the model
        try:
            om = _offload(model, tmp_path, percent / 100, backend="pread", sparse_embeddings=True)
            break
        except ts.BudgetError:
            continue
    s = ts.get_model_statistics(om)
    assert s["embedding"]["share_bytes"] < 4 * s["embedding"]["slice_bytes"]
    got = _reference(om, ids, 3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    assert s["embedding"]["calls"] > 3 + 1, "the prompt was not looked up in parts"
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_a_tied_embedding_is_not_streamed_by_rows(tmp_path):
    """The head reads every row each token: a tied embedding stays dense, and correct."""
    model = _llama(tied=True)
    ids = _tokens(1, 8)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.9, backend="pread", sparse_embeddings=True)
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ts.get_model_statistics(om)["embedding"] is None


def test_an_moe_model_with_sparse_embeddings_streams_both(tmp_path):
    model = _qwen3_moe()
    ids = _ids(2, 8)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.3, backend="mmap", sparse_embeddings=True)
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    assert s["experts"]["calls"] > 0 and s["embedding"]["calls"] > 0
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_where_sparse_units_cannot_stream_by_slices_they_stream_whole(tmp_path, backend, monkeypatch):
    """On CUDA an experts unit streams whole through the planner, nested in its block's unit.
    The same on the CPU paths, with slicing turned off as it is there."""
    monkeypatch.setattr(ts.budget, "streams_sparse", lambda device: False)
    model = _qwen3_moe()
    ids = _ids(2, 8)
    want = _reference(model, ids)
    om = _offload(model, tmp_path, 0.5, backend=backend)
    got = _reference(om, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    s = ts.get_model_statistics(om)
    assert s["experts"] is None and s["units"] >= 8 and s["peak_usage_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_through_experts_evicted_since_the_forward_gives_the_reference_gradients(tmp_path, backend):
    """Autograd saves the expert weights a forward used; an expert evicted before backward
    must be read again, not seen as the zeros its freed pages come back as."""
    from conftest import budget_gb, tiny_mixtral

    ref, model = tiny_mixtral(seed=0, layers=3), tiny_mixtral(seed=0, layers=3)
    for p in [*ref.parameters(), *model.parameters()]:
        p.requires_grad_(False)
    om = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=budget_gb(model, 1.6), backend=backend))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def grad(m):
        e = m.get_input_embeddings()(ids).detach().clone().requires_grad_(True)
        m(inputs_embeds=e).logits.square().mean().backward()
        return e.grad

    assert torch.equal(grad(om), grad(ref))
    assert ts.get_model_statistics(om)["experts"]["resident_slices"] < 3 * 4, "no expert was evicted"


def test_an_evicted_expert_gives_its_memory_back(tmp_path):
    """pread: the buffer is a private anonymous mapping, so dropping an expert's pages frees
    them (they read as zeros after), unlike a shared one, whose pages stay in RAM as shmem."""
    model = _qwen3_moe()
    om = _offload(model, tmp_path, 0.3, backend="pread")
    with torch.no_grad():
        om(_ids(2, 9))
    cache = om._tensorstream.sparse
    u = next(u for u in cache.units.values() if len(u.resident) < u.slices)
    e = next(s for s in range(u.slices) if s not in u.resident)
    buf = om._tensorstream.transfer.slice_buffers[u.index][1]
    offset, nbytes = u.ranges[e][0]
    lo, hi = -(-offset // 4096) * 4096, (offset + nbytes) // 4096 * 4096
    assert hi > lo and not buf[lo:hi].any(), "an evicted expert's pages still hold its bytes"


def test_experts_smaller_than_a_page_give_their_pages_back(tmp_path):
    """fp16 experts of 3 KiB: a page holds parts of two; it is freed once neither is held, so
    the pages committed in the buffers never exceed what the cache accounts."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=64, num_experts_per_tok=2,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval().half()
    om = _offload(model, tmp_path, 0.35, backend="pread")
    with torch.no_grad():
        for n in range(20):
            om(_ids(1, 1, seed=n))
    cache = om._tensorstream.sparse
    committed = 0
    for (
        _m,
        buf,
    ) in (
        om._tensorstream.transfer.slice_buffers.values()
    ):  # a page of zeros may be committed or not: count non-zero ones
        pages = buf[: buf.numel() // 4096 * 4096].view(-1, 4096)
        committed += int(pages.any(dim=1).sum()) * 4096
    assert committed <= cache.held_bytes() <= cache.share
