"""Speculative decoding for a streamed model: the draft given to ``offload(..., draft=)``.

A verification pass of k + 1 drafted tokens streams the same bytes as a pass for one token,
so a streamed target wants many drafted tokens a pass, far more than a model in memory.
transformers' assisted generation does the drafting and verifying; TensorStream keeps the
draft resident within the budget, uses it in ``generate()``, sets the drafting knobs where
transformers reads them (the draft's ``generation_config``) from what it measured, drafts
the next pass while the target verifies this one (greedy calls, ``Lookahead``), and
counts drafted and accepted tokens. See "Speculative decoding" in docs/design.md.

One job per module:

- ``draft``: what ``draft=`` accepts, and the draft's attachment to the model;
- ``k_rule``: the number of tokens drafted a pass (arithmetic);
- ``speculation``: ``Speculation``, the counters of assisted calls;
- ``assisted``: the ``generate()`` wrapper and the candidate generator (imports transformers);
- ``lookahead``: drafting the next pass while the target verifies (imports transformers);
- ``transformers_api``: the private transformers API drafting ahead calls, feature-detected;
- ``selfdraft``: ``draft="int8"``, the draft built from the model.

This package imports transformers only through ``assisted``, ``lookahead`` and
``transformers_api``, which nothing
imports until an offloaded model generates: ``import tensorstream`` and ``offload()`` of a
plain ``nn.Module`` need only torch.
"""

from __future__ import annotations

from .draft import attach_draft, check_draft, detach_draft, draft_of
from .speculation import Speculation

__all__ = ["Speculation", "attach_draft", "check_draft", "detach_draft", "draft_of"]
