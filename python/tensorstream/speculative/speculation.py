"""The statistics state of assisted generation on one offloaded model
(``Runtime.speculation``, ``get_model_statistics(model)["speculative"]``), and the number of
tokens the next call drafts, chosen from it by the k rule. No transformers import."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from .k_rule import PRIOR_ACCEPTANCE, acceptance_from, choose_drafted


@dataclass
class Speculation:
    """Counters of assisted generation on one offloaded model (``Runtime.speculation``)."""

    calls: int = 0
    passes: int = 0
    """Verification passes of the target."""
    new_tokens: int = 0
    drafted: int = 0
    """Drafted tokens the target verified."""
    draft_tokens: int = 0
    """Tokens the draft computed (one a forward): those drafted, and those drafted ahead
    and not used."""
    draft_seconds: float = 0.0
    """The draft's forward time for them, whether it ran in turn with the target or ahead."""
    pass_seconds: float = 0.0
    drafted_per_pass: Optional[int] = None
    """The number of drafted tokens the last call asked for."""
    drafted_ahead: int = 0
    """Passes whose drafted tokens were drafted while the target verified the pass before."""
    seconds: float = 0.0
    """Wall time of the assisted calls."""
    disk_idle_seconds: float = 0.0
    """Of that time, how long the engine read nothing (its workers all idle)."""
    drafting_ahead: Optional[bool] = None
    """Whether the last assisted call drafted the next pass while the target verified."""
    drafting_ahead_off: Optional[str] = None
    """Why the last assisted call did not draft ahead (a sampled call; a transformers
    without the private API it calls, also in the model's ``fallbacks``), or None."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    """Held by an assisted call: one at a time drives the draft and sets its knobs."""

    @property
    def accepted(self) -> int:
        # Each verification pass gives the accepted drafted tokens plus one of its own.
        return max(self.new_tokens - self.passes, 0)

    def acceptance(self) -> float:
        if not self.passes or not self.drafted:
            return PRIOR_ACCEPTANCE
        return acceptance_from(self.new_tokens / self.passes, self.drafted / self.passes)

    def choose(self, rt, ahead: bool) -> int:
        """Drafted tokens for the next call, from the passes measured so far (a plain pass
        of this model when no assisted one ran yet)."""
        c = rt.counters
        pass_s = self.pass_seconds / self.passes if self.passes else c.pass_seconds / max(c.passes, 1)
        draft_s = self.draft_seconds / self.draft_tokens if self.draft_tokens else 0.0
        if not pass_s:
            return 8  # nothing measured yet: no pass ran
        return choose_drafted(pass_s, draft_s, self.acceptance(), ahead)

    def as_dict(self) -> dict:
        per_pass = (lambda x: x / self.passes) if self.passes else (lambda x: None)
        return {
            "calls": self.calls,
            "verification_passes": self.passes,
            "new_tokens": self.new_tokens,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "rejected": max(self.drafted - self.accepted, 0),
            "acceptance": self.accepted / self.drafted if self.drafted else None,
            "tokens_per_pass": per_pass(self.new_tokens),
            "drafted_per_pass": self.drafted_per_pass,
            "draft_tokens": self.draft_tokens,
            "drafted_ahead_passes": self.drafted_ahead,
            "draft_seconds_per_token": self.draft_seconds / self.draft_tokens if self.draft_tokens else None,
            "verification_pass_seconds": per_pass(self.pass_seconds),
            "seconds_per_pass": per_pass(self.seconds),
            "disk_idle_seconds_per_pass": per_pass(self.disk_idle_seconds),
            "drafting_ahead": self.drafting_ahead,
            "drafting_ahead_off": self.drafting_ahead_off,
        }
