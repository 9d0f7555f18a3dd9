"""Drafting ahead and the transformers it runs on: the private methods it calls are
feature-detected (tensorstream.speculative.transformers_api), not assumed from a version.

- transformers 5.25 renamed ``_update_past_and_masks``'s ``num_added_tokens`` to
  ``num_extra_tokens_to_remove`` (and made the crop relative to what ``get_candidates`` last
  drafted): with either, greedy assisted calls draft ahead and give the tokens of plain
  generation, for a draft given to offload(), ``draft="int8"`` and the user's own
  ``assistant_model=``. The installed transformers runs as it is (``make test`` 5.24, ``make
  test-compat`` the newest), and with the method renamed to 5.25's keyword;
- with a private method that takes neither, assisted calls draft in turn through
  transformers' public path, with the same tokens, and say so: ``drafting_ahead`` is False,
  ``drafting_ahead_off`` names the method, ``fallbacks`` lists it, a RuntimeWarning is given.
"""

from __future__ import annotations

import inspect
import threading

import pytest
import torch
from conftest import GiB, budget_gb, input_ids, tiny_llama
from test_selfdraft import _offload_int8
from test_speculative import LAYERS, NEW, generate

import tensorstream as ts
from tensorstream.speculative.transformers_api import ADDED_TOKENS_KEYWORDS, drafting_api

candidate_generator = pytest.importorskip("transformers.generation.candidate_generator")
GENERATOR = candidate_generator.AssistedCandidateGenerator


def _installed_keyword() -> str:
    params = inspect.signature(GENERATOR._update_past_and_masks).parameters
    return next(k for k in ADDED_TOKENS_KEYWORDS if k in params)


def _rename(monkeypatch, new: str) -> list:
    """``_update_past_and_masks`` taking its keyword as `new`, delegating to the installed one
    (a value passed on, none where none was passed); returns the values it was called with."""
    orig, have, seen = GENERATOR._update_past_and_masks, _installed_keyword(), []

    def call(self, input_ids, value):
        seen.append(value)
        return orig(self, input_ids, **({} if value is None else {have: value}))

    if new == "num_extra_tokens_to_remove":

        def update(self, input_ids, num_extra_tokens_to_remove=None):
            return call(self, input_ids, num_extra_tokens_to_remove)

    else:  # a name no transformers used

        def update(self, input_ids, tokens_to_drop=None):
            return call(self, input_ids, tokens_to_drop)

    monkeypatch.setattr(GENERATOR, "_update_past_and_masks", update)
    return seen


def _target():
    return tiny_llama(tied=False, seed=3, layers=LAYERS)


def _model_and_assistant(tmp_path, draft: str):
    """(offloaded target, the assistant_model= the call passes or None) for each kind of draft."""
    target = _target()
    if draft == "int8":
        return _offload_int8(tmp_path, target), None
    own = _target()  # a perfect draft: the target's own weights, in memory
    if draft == "offload(draft=)":
        budget = budget_gb(target, 2) + ts.estimate_model_memory(own) / GiB
        return ts.offload(
            target, ts.Config(tmp_path, vram_budget_gb=budget, backend="pread"), draft=own
        ), None
    cfg = ts.Config(tmp_path, vram_budget_gb=budget_gb(target, 2), backend="pread")
    return ts.offload(target, cfg), own


DRAFTS = ["offload(draft=)", "int8", "assistant_model="]


@pytest.mark.parametrize("keyword", ["installed", "num_extra_tokens_to_remove"])
@pytest.mark.parametrize("draft", DRAFTS)
def test_greedy_calls_draft_ahead_with_the_installed_or_the_renamed_keyword(
    tmp_path, monkeypatch, keyword, draft
):
    """With the installed transformers as it is (5.24 or 5.25 under make test-compat), and with
    its ``_update_past_and_masks`` taking 5.25's keyword (drafting ahead then goes through the
    public ``get_candidates``, as it does on 5.25)."""
    if keyword != "installed":
        _rename(monkeypatch, keyword)
    api = drafting_api()
    assert api.missing is None and api.added_tokens_keyword in ADDED_TOKENS_KEYWORDS, api
    ids = input_ids()
    want = generate(_target(), ids)
    model, assistant = _model_and_assistant(tmp_path, draft)
    kw = {"assistant_model": assistant} if assistant is not None else {}
    draft_model = assistant if assistant is not None else model._tensorstream.draft
    fed = []
    handle = draft_model.register_forward_pre_hook(
        lambda _, args, kwargs: fed.append((threading.current_thread().name, kwargs["input_ids"].shape[-1])),
        with_kwargs=True,
    )
    try:
        for _ in range(2):
            assert torch.equal(generate(model, ids, num_assistant_tokens=4, **kw), want)
    finally:
        handle.remove()
    s = ts.get_model_statistics(model)
    spec = s["speculative"]
    assert spec["drafting_ahead"] is True and spec["drafting_ahead_off"] is None, spec
    assert spec["new_tokens"] == 2 * NEW and spec["drafted"] > 0
    ahead = [n for name, n in fed if name == "tensorstream-draft-ahead"]
    assert ahead, "the draft drafted in its thread while the target verified"
    if keyword == "installed":
        assert set(ahead) == {1}, "drafting ahead, the draft feeds only the token it has not seen"
    if draft != "int8":  # a perfect draft: every pass accepts all 4 and the draft's guess
        assert spec["drafted_ahead_passes"] == 2 * 3 and spec["rejected"] == 0, spec
    assert not [f for f in s["fallbacks"] if "speculative" in f], s["fallbacks"]


@pytest.mark.parametrize("draft", DRAFTS)
def test_without_the_private_api_assisted_calls_draft_in_turn_and_say_why(tmp_path, monkeypatch, draft):
    seen = _rename(monkeypatch, "tokens_to_drop")
    assert "_update_past_and_masks" in drafting_api().missing
    ids = input_ids()
    want = generate(_target(), ids)
    model, assistant = _model_and_assistant(tmp_path, draft)
    kw = {"assistant_model": assistant} if assistant is not None else {}
    with pytest.warns(RuntimeWarning, match="drafts in turn.*_update_past_and_masks"):
        assert torch.equal(generate(model, ids, num_assistant_tokens=4, **kw), want)
    assert torch.equal(generate(model, ids, num_assistant_tokens=4, **kw), want)
    s = ts.get_model_statistics(model)
    spec = s["speculative"]
    assert spec["drafting_ahead"] is False and "_update_past_and_masks" in spec["drafting_ahead_off"], spec
    assert spec["drafted_ahead_passes"] == 0 and spec["drafted"] > 0 and spec["calls"] == 2, spec
    assert spec["accepted"] + spec["rejected"] == spec["drafted"]
    assert seen and set(seen) == {None}, "transformers' own calls alone, through the public get_candidates"
    fallbacks = [f for f in s["fallbacks"] if "speculative" in f]
    assert len(fallbacks) == 1 and "_update_past_and_masks" in fallbacks[0], s["fallbacks"]


def test_a_sampled_call_says_it_does_not_draft_ahead_and_is_no_fallback(tmp_path):
    model, _ = _model_and_assistant(tmp_path, "offload(draft=)")
    torch.manual_seed(5)
    generate(model, input_ids(), do_sample=True, top_k=20)
    s = ts.get_model_statistics(model)
    assert s["speculative"]["drafting_ahead"] is False
    assert "samples" in s["speculative"]["drafting_ahead_off"]
    assert not [f for f in s["fallbacks"] if "speculative" in f]
