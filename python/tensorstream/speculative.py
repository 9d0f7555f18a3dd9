"""Speculative decoding for a streamed model: the draft given to ``offload(..., draft=)``.

A verification pass of k + 1 drafted tokens streams the same bytes as a pass for one token,
so a streamed target wants many drafted tokens a pass, far more than a model in memory.
transformers' assisted generation does the drafting and verifying; TensorStream keeps the
draft resident within the budget, uses it in ``generate()``, sets the drafting knobs where
transformers reads them (the draft's ``generation_config``) from what it measured, and
counts drafted and accepted tokens. See "Speculative decoding" in docs/design.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import InvalidArgumentError

MAX_DRAFTED = 32
"""The most tokens drafted a pass."""

PRIOR_ACCEPTANCE = 0.8
"""Per-token acceptance assumed before any pass was verified."""

KNOBS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


def check_draft(draft, model: nn.Module) -> None:
    if not isinstance(draft, nn.Module) or not hasattr(draft, "generate"):
        raise InvalidArgumentError(
            f"draft must be a transformers model that can generate(), got {type(draft).__name__}"
        )
    if draft is model:
        raise InvalidArgumentError("the draft must be another model than the one offloaded")
    if getattr(draft, "_tensorstream", None) is not None:
        raise InvalidArgumentError(
            "the draft must stay resident: give offload() a model that is not offloaded"
        )


def expected_tokens(k: float, acceptance: float) -> float:
    """Tokens one verification pass yields when k tokens are drafted and each is accepted
    with probability `acceptance` given the ones before it were: 1 + a + ... + a^k."""
    return float(k + 1) if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


def choose_drafted(pass_seconds: float, draft_seconds: float, acceptance: float) -> int:
    """The number of tokens to draft a pass: the k that maximises the tokens a pass yields
    over the time it takes, E(k) / (pass + k * draft)."""
    return max(
        range(1, MAX_DRAFTED + 1),
        key=lambda k: expected_tokens(k, acceptance) / (pass_seconds + k * max(draft_seconds, 0.0)),
    )


def acceptance_from(tokens_per_pass: float, drafted_per_pass: float) -> float:
    """The per-token acceptance that makes `expected_tokens` equal what was observed."""
    k = max(drafted_per_pass, 1e-9)
    if tokens_per_pass >= k + 1:
        return 1.0
    if tokens_per_pass <= 1:
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if expected_tokens(k, mid) < tokens_per_pass:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class Speculation:
    """Counters of assisted generation on one offloaded model (``Runtime.speculation``)."""

    calls: int = 0
    passes: int = 0
    """Verification passes of the target."""
    new_tokens: int = 0
    drafted: int = 0
    draft_seconds: float = 0.0
    pass_seconds: float = 0.0
    drafted_per_pass: Optional[int] = None
    """The number of drafted tokens the last call asked for."""

    @property
    def accepted(self) -> int:
        # Each verification pass gives the accepted drafted tokens plus one of its own.
        return max(self.new_tokens - self.passes, 0)

    def acceptance(self) -> float:
        if not self.passes or not self.drafted:
            return PRIOR_ACCEPTANCE
        return acceptance_from(self.new_tokens / self.passes, self.drafted / self.passes)

    def choose(self, rt) -> int:
        """Drafted tokens for the next call, from the passes measured so far (a plain pass
        of this model when no assisted one ran yet)."""
        c = rt.counters
        pass_s = self.pass_seconds / self.passes if self.passes else c.pass_seconds / max(c.passes, 1)
        draft_s = self.draft_seconds / self.drafted if self.drafted else 0.0
        if not pass_s:
            return 8  # nothing measured yet: no pass ran
        return choose_drafted(pass_s, draft_s, self.acceptance())

    def as_dict(self) -> dict:
        return {
            "calls": self.calls,
            "verification_passes": self.passes,
            "new_tokens": self.new_tokens,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": max(self.drafted - self.accepted, 0),
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "tokens_per_pass": self.new_tokens / self.passes if self.passes else None,
            "drafted_per_pass": self.drafted_per_pass,
            "draft_seconds_per_token": self.draft_seconds / self.drafted if self.drafted else None,
            "verification_pass_seconds": self.pass_seconds / self.passes if self.passes else None,
        }


def assisted_generate(rt, generate, args, kwargs):
    """``model.generate`` of a model offloaded with a draft: assisted by it unless the call
    names its own assistant; the drafting knobs the user left unset are chosen for the
    streamed target for this call (then restored), and the call's passes are counted."""
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    draft = kwargs.get("assistant_model")
    if draft is None and _assistable(ids, kwargs):
        draft = kwargs["assistant_model"] = rt.draft
    if draft is None:
        return generate(*args, **kwargs)
    spec = rt.speculation
    gcfg = draft.generation_config
    saved = {k: getattr(gcfg, k, None) for k in KNOBS}
    k = kwargs.pop("num_assistant_tokens", None) or saved["num_assistant_tokens"] or spec.choose(rt)
    gcfg.num_assistant_tokens = k
    if saved["num_assistant_tokens_schedule"] is None:
        gcfg.num_assistant_tokens_schedule = "constant"
    if saved["assistant_confidence_threshold"] is None:
        gcfg.assistant_confidence_threshold = 0.0  # draft all k: a streamed pass costs the same
    timing = _DraftTiming(draft)
    c = rt.counters
    passes, pass_s = c.passes, c.pass_seconds
    try:
        out = generate(*args, **kwargs)
    finally:
        timing.remove()
        for name, v in saved.items():
            setattr(gcfg, name, v)
    seqs = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if isinstance(ids, torch.Tensor) and isinstance(seqs, torch.Tensor):
        spec.calls += 1
        spec.passes += c.passes - passes
        spec.pass_seconds += c.pass_seconds - pass_s
        spec.new_tokens += seqs.shape[-1] - ids.shape[-1]
        spec.drafted += timing.tokens
        spec.draft_seconds += timing.seconds
        spec.drafted_per_pass = k
    return out


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
