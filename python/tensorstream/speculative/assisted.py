"""The generate wrapper of an offloaded model with a draft: ``model.generate`` assisted by
the draft, with the drafting knobs set where transformers reads them (the draft's
``generation_config``) from what was measured and restored after, and its passes counted
(:func:`assisted_generate`); ``model._get_candidate_generator``, drafting ahead where it can
(:func:`candidate_generator`). Imports transformers: imported once an offloaded model
generates."""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

from .lookahead import Lookahead, may_draft_ahead
from .transformers_api import drafting_api

KNOBS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def assisted_generate(rt, generate, args, kwargs):
    """``model.generate`` of an offloaded model. Assisted by the draft given to offload()
    unless the call names its own assistant (or cannot be assisted); an assisted call gets
    the drafting knobs the user left unset chosen for the streamed target (restored after),
    drafts ahead where it can (:class:`~tensorstream.speculative.lookahead.Lookahead`), and
    has its passes counted."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    draft = kwargs.get("assistant_model")
    if draft is None and rt.draft is not None and _assistable(ids, kwargs):
        draft = kwargs["assistant_model"] = rt.draft
    if draft is None:
        return generate(*args, **kwargs)
    with rt.speculation.lock:
        return _assisted(rt, generate, args, kwargs, ids, draft)


def _assisted(rt, generate, args, kwargs, ids, draft):
    spec = rt.speculation
    gcfg = draft.generation_config
    saved = {k: getattr(gcfg, k, None) for k in KNOBS}
    if saved["num_assistant_tokens_schedule"] is None:
        gcfg.num_assistant_tokens_schedule = "constant"
    if saved["assistant_confidence_threshold"] is None:
        gcfg.assistant_confidence_threshold = 0.0  # draft all k: a streamed pass costs the same
    ahead = may_draft_ahead(_sampling(rt.model, kwargs), gcfg)  # as far as known before the call
    k = kwargs.pop("num_assistant_tokens", None) or saved["num_assistant_tokens"] or spec.choose(rt, ahead)
    gcfg.num_assistant_tokens = k
    timing = _DraftTiming(draft)
    c = rt.counters
    passes, pass_s = c.passes, c.pass_seconds
    active0 = _engine_active(rt)
    t0 = time.perf_counter()
    outer, call = getattr(_calls, "open", None), _Call(drafting_api())
    _calls.open = call
    try:
        out = generate(*args, **kwargs)
    finally:
        _calls.open = outer
        for la in call.lookaheads:
            la.finish(quiet=True)  # nothing drafts once generate() has returned
        timing.remove()
        for name, v in saved.items():
            setattr(gcfg, name, v)
    lookaheads = call.lookaheads
    off = call.off or next((la.off for la in lookaheads if la.off), None)
    api_missing = call.api_missing or next((la.off for la in lookaheads if la.off_api), None)
    if not lookaheads and off is None:
        off = api_missing = (
            "transformers' generate() did not ask the model for its candidate generator (_get_candidate_generator)"
        )
    spec.drafting_ahead, spec.drafting_ahead_off = off is None, off
    if api_missing:
        rt.fallback(f"speculative decoding drafts in turn, not ahead: {api_missing}")
    seconds = time.perf_counter() - t0
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if isinstance(ids, torch.Tensor) and isinstance(seqs, torch.Tensor):
        spec.calls += 1
        spec.passes += c.passes - passes
        spec.pass_seconds += c.pass_seconds - pass_s
        spec.new_tokens += seqs.shape[-1] - ids.shape[-1]
        spec.drafted += sum(la.drafted for la in lookaheads)
        spec.draft_tokens += timing.tokens
        spec.draft_seconds += timing.seconds
        spec.drafted_per_pass = k
        spec.drafted_ahead += sum(la.hits for la in lookaheads)
        spec.seconds += seconds
        spec.disk_idle_seconds += max(seconds - (_engine_active(rt) - active0), 0.0)
    return out


def _engine_active(rt) -> float:
    """Seconds the runtime's engine has had a read in progress (0 before it has one)."""
    return rt.engine.stats()["active_seconds"] if rt.engine is not None else 0.0


_calls = threading.local()
"""``open``: the :class:`_Call` of the assisted call running on this thread, or None."""


class _Call:
    """One assisted call: its lookaheads, the private API found, why it does not draft ahead."""

    def __init__(self, api):
        self.api = api
        self.lookaheads: list = []
        self.off = None
        """Why the call does not draft ahead where no lookahead says so, or None."""
        self.api_missing = None
        """Set where transformers' generator cannot be recognised: a fallback in the statistics."""


def candidate_generator(orig, *args, **kwargs):
    """``model._get_candidate_generator`` of an offloaded model: transformers' own, counted,
    and drafting ahead where that cannot change the target's tokens
    (:class:`~tensorstream.speculative.lookahead.Lookahead`)."""
    gen = orig(*args, **kwargs)
    call = getattr(_calls, "open", None)
    if call is None:
        return gen
    api = call.api
    if api.generator is None:  # transformers moved it: nothing to recognise the generator by
        call.off = call.api_missing = api.missing
        return gen
    if not isinstance(gen, api.generator):
        call.off = f"the candidate generator is {type(gen).__name__}: not counted, not drafted ahead"
        return gen
    off, missing = Lookahead.why_not(gen, kwargs.get("generation_config", args[0] if args else None), api)
    la = Lookahead(gen, api, off, off_api=missing)
    call.lookaheads.append(la)
    return la


def _sampling(model, kwargs) -> bool:
    """Whether this generate() call samples (as transformers resolves it)."""
    if "do_sample" in kwargs:
        return bool(kwargs["do_sample"])
    cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return bool(getattr(cfg, "do_sample", False))


def _assistable(ids, kwargs) -> bool:
    """Whether transformers can assist this call: one sequence, no beam search."""
    batch = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() > 1 else 1
    return batch == 1 and kwargs.get("num_beams", 1) in (None, 1)


class _DraftTiming:
    """Forward hooks on the draft for one call: how many tokens it drafted and how long."""

    def __init__(self, draft: nn.Module):
        self.tokens, self.seconds, self._t0 = 0, 0.0, None
        self.handles = [
            draft.register_forward_pre_hook(self._pre),
            draft.register_forward_hook(self._post),
        ]

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0
        self.tokens += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
