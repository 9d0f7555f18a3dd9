"""Speculative decoding with a draft given to offload(): generate() is assisted by it with
tokens identical to the un-offloaded model running the same assisted call (greedy, and
sampling with a seed), the draft counts in the budget, the drafting knobs chosen for a
streamed target are set where transformers reads them and restored after, and the
statistics count drafted and accepted tokens."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest
import torch
from conftest import VOCAB, GiB, budget_gb, input_ids, tiny_llama

import tensorstream as ts
from tensorstream.speculative import k_rule as speculative

LAYERS = 6
NEW = 20


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, pad_token_id=0, **kwargs
        )


def sampled_unoffloaded(ref, draft, ids, k: int):
    """The tokens of the assisted sampled call (seed 5, top-k 20) of the un-offloaded `ref`
    with `draft`, its knobs set as TensorStream sets them: k a pass, constant, no cut-off."""
    cfg = draft.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule, cfg.assistant_confidence_threshold = (
        k,
        "constant",
        0.0,
    )
    torch.manual_seed(5)
    return generate(ref, ids, do_sample=True, top_k=20, assistant_model=draft)


def _offload_with_draft(tmp_path, draft, room_units=2, **kwargs):
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    budget = budget_gb(model, room_units) + ts.estimate_model_memory(draft) / GiB
    cfg = ts.Config(tmp_path, vram_budget_gb=budget, backend="pread", **kwargs)
    return ts.offload(model, cfg, draft=draft)


@pytest.mark.parametrize("draft_seed", [3, 9], ids=["perfect draft", "another draft"])
def test_greedy_tokens_are_those_of_plain_generation(tmp_path, draft_seed):
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    # The perfect draft: the target's own weights, in memory. The other: a smaller model.
    draft = tiny_llama(tied=False, seed=draft_seed, layers=LAYERS if draft_seed == 3 else 2)
    model = _offload_with_draft(tmp_path, draft)
    assert torch.equal(generate(model, ids), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["drafted_per_pass"] == 8, "before any pass was measured"
    if draft_seed == 3:
        assert s["rejected"] == 0 and s["tokens_per_pass"] > 4, s
    # The second call drafts as many tokens as the first measured (timings: not asserted).
    assert torch.equal(generate(model, ids), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["calls"] == 2 and s["new_tokens"] == 2 * NEW
    assert s["accepted"] + s["rejected"] == s["drafted"] > 0
    assert s["tokens_per_pass"] == s["new_tokens"] / s["verification_passes"]
    if draft_seed == 3:
        assert s["rejected"] == 0
    assert draft.generation_config.num_assistant_tokens is None, "the draft's own settings restored"


def test_sampled_tokens_are_those_of_the_same_assisted_call_unoffloaded(tmp_path):
    ids = input_ids()
    draft = tiny_llama(tied=False, seed=9, layers=2)
    model = _offload_with_draft(tmp_path, draft)
    torch.manual_seed(5)
    got = generate(model, ids, do_sample=True, top_k=20)
    k = ts.get_model_statistics(model)["speculative"]["drafted_per_pass"]

    ref = tiny_llama(tied=False, seed=3, layers=LAYERS)
    assert torch.equal(got, sampled_unoffloaded(ref, tiny_llama(tied=False, seed=9, layers=2), ids, k))
    # Sampling draws random numbers in the draft too: nothing is drafted ahead, out of turn.
    assert ts.get_model_statistics(model)["speculative"]["drafted_ahead_passes"] == 0


def test_the_draft_counts_in_the_budget(tmp_path):
    draft = tiny_llama(tied=False, seed=9, layers=2)
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    without_draft = budget_gb(model, 2)
    with pytest.raises(ts.BudgetError, match="the draft"):
        ts.offload(model, ts.Config(tmp_path, vram_budget_gb=without_draft, backend="pread"), draft=draft)
    assert "_tensorstream_draft" not in model.__dict__ and getattr(model, "_tensorstream", None) is None
    model = _offload_with_draft(tmp_path, draft)
    rt = model._tensorstream
    assert rt.budget_plan.resident == ts.estimate_model_memory(draft) + ts.estimate_model_memory(model) - sum(
        u.nbytes for u in rt.units
    )
    generate(model, input_ids())
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert not any(k.startswith("_tensorstream") for k in model.state_dict()), (
        "the draft is not in the model's weights"
    )


def test_a_call_that_names_its_assistant_or_its_knobs_keeps_them(tmp_path):
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    draft = tiny_llama(tied=False, seed=9, layers=2)
    model = _offload_with_draft(tmp_path, draft)
    other = tiny_llama(tied=False, seed=3, layers=2)
    other.generation_config.num_assistant_tokens = 3
    assert torch.equal(generate(model, ids, assistant_model=other), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["drafted_per_pass"] == 3 and other.generation_config.num_assistant_tokens == 3
    assert torch.equal(generate(model, ids, num_assistant_tokens=5), want)
    assert ts.get_model_statistics(model)["speculative"]["drafted_per_pass"] == 5


def test_calls_transformers_cannot_assist_run_plain(tmp_path):
    """A batch of several sequences, or beam search: generate() runs without the draft."""
    ids = input_ids(batch=2)
    ref = tiny_llama(tied=False, seed=3, layers=LAYERS)
    want, beams = generate(ref, ids), generate(ref, ids[:1], num_beams=2)
    model = _offload_with_draft(tmp_path, tiny_llama(tied=False, seed=9, layers=2))
    assert torch.equal(generate(model, ids), want)
    assert torch.equal(generate(model, ids[:1], num_beams=2), beams)
    assert ts.get_model_statistics(model)["speculative"]["calls"] == 0


def test_a_bad_draft_is_refused(tmp_path):
    model = tiny_llama(tied=False, seed=3, layers=LAYERS)
    for bad, match in ((torch.nn.Linear(2, 2), "generate"), (model, "another model")):
        with pytest.raises(ts.InvalidArgumentError, match=match):
            ts.offload(model, ts.Config(tmp_path), draft=bad)


def test_the_drafting_rule():
    choose = speculative.choose_drafted
    assert choose(0.5, 0.01, 1.0) == speculative.MAX_DRAFTED, "a perfect draft drafts the most"
    assert choose(0.5, 0.01, 0.0) == 1, "a draft never accepted drafts one"
    # A longer streamed pass makes each drafted token cheaper in comparison: more are drafted.
    ks = [choose(p, 0.02, 0.8) for p in (0.01, 0.1, 1.0)]
    assert ks == sorted(ks) and ks[0] < ks[-1]
    for a in (0.3, 0.7, 0.95):
        for k in (1, 4, 9):
            e = speculative.expected_tokens(k, a)
            assert abs(speculative.acceptance_from(e, k) - a) < 1e-6


def test_the_drafting_rule_when_drafting_ahead():
    choose = speculative.choose_drafted
    # A perfect draft ahead: the cycle is max(T, (k + 1) t); past T / t the draft sets the
    # pace and more tokens gain nothing: the smallest k with (k + 1) t >= T.
    assert choose(0.6, 0.055, 1.0, ahead=True) == 10
    assert choose(0.6, 0.055, 1.0, ahead=False) == speculative.MAX_DRAFTED
    # A draft never accepted is never used ahead: the cycle is the serial one.
    cycle = speculative.cycle_seconds
    assert cycle(4, 0.6, 0.05, 0.0, ahead=True) == cycle(4, 0.6, 0.05, 0.0, ahead=False)


def _draft_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "tensorstream-draft-ahead"]


def test_greedy_drafts_the_next_pass_while_the_target_verifies(tmp_path, fault_injection):
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    model = _offload_with_draft(tmp_path, draft)
    # Every read of the target takes 30 ms more: a verification pass lasts long enough that
    # the draft, drafting ahead, runs inside it.
    model._tensorstream.engine.set_fault_plan(delay_ms=30)
    seen = []
    handle = draft.register_forward_pre_hook(
        lambda _, args, kw: seen.append(
            (threading.current_thread().name, model._tensorstream._depth > 0, kw["input_ids"].shape[-1])
        ),
        with_kwargs=True,
    )
    try:
        assert torch.equal(generate(model, ids, num_assistant_tokens=4), want)
    finally:
        handle.remove()
        model._tensorstream.engine.set_fault_plan()
    s = ts.get_model_statistics(model)["speculative"]
    # 20 new tokens by 5 a pass: the first pass's candidates are drafted in turn, the
    # other three's while the pass before was verified.
    assert s["verification_passes"] == 4 and s["drafted_ahead_passes"] == 3, s
    assert s["drafted"] == 4 * 4 and s["rejected"] == 0, s
    assert ("tensorstream-draft-ahead", True, 1) in seen, "the draft drafted while the target verified"
    # drafting ahead, the draft feeds each token once (its cache keeps the one before)
    assert {n for name, _, n in seen if name == "tensorstream-draft-ahead"} == {1}, seen
    assert 0 <= s["disk_idle_seconds_per_pass"] <= s["seconds_per_pass"], s
    assert not _draft_threads()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_the_draft_ahead_keeps_the_tokens_on_the_callers_stream(tmp_path):
    """On a GPU the draft drafts ahead with its kernels on the caller's stream, here not the
    default one: the candidates the target reads are those the draft finished."""
    ids = input_ids().cuda()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS).cuda(), ids)
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    model = _offload_with_draft(tmp_path, draft).to("cuda")
    assert next(draft.parameters()).device.type == "cuda", "the draft moves with the model"
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = generate(model, ids, num_assistant_tokens=4)
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["drafted_ahead_passes"] == 3 and s["rejected"] == 0, s


def test_a_draft_that_misses_drafts_ahead_only_what_it_can_use(tmp_path):
    """Candidates drafted ahead are used only when the pass before accepted all its own
    and the target's token was the one guessed; tokens stay those of plain generation."""
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    model = _offload_with_draft(tmp_path, tiny_llama(tied=False, seed=9, layers=2))
    assert torch.equal(generate(model, ids, num_assistant_tokens=3), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["drafted_ahead_passes"] <= s["verification_passes"] - 1
    assert s["accepted"] + s["rejected"] == s["drafted"]


def test_an_interrupt_while_the_draft_drafts_ahead_leaves_the_model_usable(tmp_path):
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    model = _offload_with_draft(tmp_path, draft)
    rt = model._tensorstream
    layer = model.model.layers[LAYERS - 1]
    calls = []

    def interrupt(*_):
        calls.append(1)
        if len(calls) == 2:  # the second pass: the draft is drafting ahead
            raise KeyboardInterrupt("injected")

    handle = layer.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt, match="injected"):
        generate(model, ids)
    handle.remove()
    assert not _draft_threads(), "nothing drafts once generate() has raised"
    assert draft.generation_config.num_assistant_tokens is None
    assert not rt.speculation.lock.locked()
    assert torch.equal(generate(model, ids), want)


def test_an_error_of_the_draft_ahead_is_raised_by_generate(tmp_path):
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    model = _offload_with_draft(tmp_path, draft)
    forwards = []

    def fail(*_):
        forwards.append(threading.current_thread().name)
        if forwards[-1] == "tensorstream-draft-ahead":
            raise RuntimeError("the draft failed")

    handle = draft.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="the draft failed"):
        generate(model, ids, num_assistant_tokens=4)
    handle.remove()
    assert not _draft_threads()
    assert torch.equal(generate(model, ids), want)


def test_two_threads_generate_with_one_draft(tmp_path):
    """Assisted calls on one model take turns with the draft (its knobs are set per call)."""
    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    model = _offload_with_draft(tmp_path, draft)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: generate(model, ids), range(4)))
    assert all(torch.equal(o, want) for o in outs)
    assert draft.generation_config.num_assistant_tokens is None
    assert ts.get_model_statistics(model)["speculative"]["calls"] == 4


def test_from_pretrained_takes_a_draft(tmp_path):
    ids = input_ids()
    ref = tiny_llama(tied=False, seed=3, layers=LAYERS)
    want = generate(ref, ids)
    ref.save_pretrained(tmp_path / "ckpt")
    draft = tiny_llama(tied=False, seed=3, layers=LAYERS)
    budget = budget_gb(ref, 2) + ts.estimate_model_memory(draft) / GiB
    cfg = ts.Config(tmp_path / "store", vram_budget_gb=budget, backend="pread")
    with pytest.raises(ts.InvalidArgumentError, match="offload"):
        ts.from_pretrained(str(tmp_path / "ckpt"), cfg, draft="int8")
    with pytest.raises(ts.BudgetError, match="the draft"):
        small = ts.Config(tmp_path / "store", vram_budget_gb=budget_gb(ref, 2), backend="pread")
        ts.from_pretrained(str(tmp_path / "ckpt"), small, draft=draft)
    model = ts.from_pretrained(str(tmp_path / "ckpt"), cfg, draft=draft)
    assert torch.equal(generate(model, ids), want)
    s = ts.get_model_statistics(model)
    assert s["speculative"]["rejected"] == 0 and s["speculative"]["calls"] == 1
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_a_draft_whose_cache_cannot_go_back_drafts_in_turn(tmp_path):
    """A sliding-window draft's cache forgets what a miss would crop back to: it drafts in
    turn (drafting ahead, it crashed in transformers' cache once past the window)."""
    from transformers import MistralConfig, MistralForCausalLM

    ids = input_ids()
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids)
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=4,
    )
    torch.manual_seed(9)
    draft = MistralForCausalLM(cfg).eval()
    model = _offload_with_draft(tmp_path, draft)
    assert torch.equal(generate(model, ids, num_assistant_tokens=4), want)
    assert ts.get_model_statistics(model)["speculative"]["drafted_ahead_passes"] == 0


def test_a_call_with_a_stateful_logits_processor_drafts_in_turn(tmp_path):
    """A watermark's processor draws from its own random generator: the draft ahead would
    apply it in its thread while the target applies it, so the call drafts in turn."""
    from transformers import WatermarkingConfig

    ids = input_ids()
    mark = WatermarkingConfig(bias=2.0, seeding_scheme="selfhash")
    want = generate(tiny_llama(tied=False, seed=3, layers=LAYERS), ids, watermarking_config=mark)
    model = _offload_with_draft(tmp_path, tiny_llama(tied=False, seed=3, layers=LAYERS))
    assert torch.equal(generate(model, ids, num_assistant_tokens=4, watermarking_config=mark), want)
    s = ts.get_model_statistics(model)["speculative"]
    assert s["drafted_ahead_passes"] == 0 and s["verification_passes"] > 1, s
