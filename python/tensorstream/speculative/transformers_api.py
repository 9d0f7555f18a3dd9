"""The private parts of transformers that drafting ahead (:class:`~tensorstream.speculative.lookahead.Lookahead`)
uses, feature-detected rather than assumed from a version number: where one is missing or
takes other arguments, assisted calls draft in turn through transformers' public path
(``CandidateGenerator.get_candidates``), and the reason is in the statistics
(``get_model_statistics(model)["speculative"]["drafting_ahead_off"]`` and ``["fallbacks"]``).

Used: ``AssistedCandidateGenerator`` (its module path), its methods
``_calculate_new_tokens(input_ids)``, ``_update_past_and_masks(input_ids, <added tokens>=)``,
``_prepare_generation_args(input_ids, min_new_tokens, max_new_tokens)`` and
``_generate_candidates(generation_args)``, the attributes its ``__init__`` sets
(:data:`GENERATOR_ATTRIBUTES`), ``cache_utils.DynamicCache`` and ``DynamicLayer``, and the
model's ``_get_candidate_generator`` (wrapped by :mod:`tensorstream.module`). Imports transformers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

ADDED_TOKENS_KEYWORDS = ("num_added_tokens", "num_extra_tokens_to_remove")
"""The names ``_update_past_and_masks`` has given its parameter for the tokens to crop from the
draft's cache beyond those it needs, and what they mean. ``num_added_tokens`` (transformers
5.24): the cache is cropped to the input's length minus one minus it (``get_candidates``
passes 1: the draft feeds its own last token again). ``num_extra_tokens_to_remove`` (5.25): the
crop is relative to the length ``get_candidates`` last drafted, which only it records, and
``get_candidates`` passes 0: the draft feeds only the token it has not seen, so drafting ahead
calls ``get_candidates`` itself (:meth:`~tensorstream.speculative.lookahead.Lookahead._draft_after_own`)."""

METHODS = {
    "_calculate_new_tokens": ("input_ids",),
    "_update_past_and_masks": ("input_ids",),
    "_prepare_generation_args": ("input_ids", "min_new_tokens", "max_new_tokens"),
    "_generate_candidates": ("generation_args",),
}
"""The generator's private methods drafting ahead calls, with the arguments it passes by position."""

GENERATOR_ATTRIBUTES = (
    "assistant_model",
    "assistant_kwargs",
    "assistant_generation_config",
    "num_assistant_tokens",
    "main_model_max_length",
    "logits_processor",
)
"""The attributes of an ``AssistedCandidateGenerator`` that drafting ahead reads or sets."""


@dataclass(frozen=True)
class DraftingApi:
    """What was found: the classes and the keyword, or why drafting ahead cannot work (`missing`)."""

    generator: Optional[type] = None
    """transformers' ``AssistedCandidateGenerator``, or None where it cannot be imported."""
    cache: Optional[type] = None
    cache_layer: Optional[type] = None
    added_tokens_keyword: Optional[str] = None
    missing: Optional[str] = None
    """Why drafting ahead is off with this transformers, or None: it can draft ahead."""


def drafting_api() -> DraftingApi:
    """Detect the private API drafting ahead needs in the transformers installed (a few
    signature reads: cheap enough for every assisted call, and a monkeypatch is seen)."""
    try:
        from transformers.generation.candidate_generator import AssistedCandidateGenerator as gen
    except ImportError as e:
        return DraftingApi(missing=f"transformers has no AssistedCandidateGenerator where it had ({e})")
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError as e:
        return DraftingApi(gen, missing=f"transformers.cache_utils has no DynamicCache or DynamicLayer ({e})")
    for name, positional in METHODS.items():
        why = _why_not_callable(gen, name, positional)
        if why:
            return DraftingApi(gen, DynamicCache, DynamicLayer, missing=why)
    params = inspect.signature(gen._update_past_and_masks).parameters
    keyword = next((k for k in ADDED_TOKENS_KEYWORDS if k in params), None)
    if keyword is None:
        return DraftingApi(
            gen,
            DynamicCache,
            DynamicLayer,
            missing=(
                "AssistedCandidateGenerator._update_past_and_masks takes none of "
                f"{', '.join(ADDED_TOKENS_KEYWORDS)} (its parameters: {', '.join(params)})"
            ),
        )
    return DraftingApi(gen, DynamicCache, DynamicLayer, keyword)


def _why_not_callable(cls: type, name: str, positional: tuple) -> Optional[str]:
    """Why ``cls.name(self, *positional)`` cannot be called as drafting ahead calls it, or None."""
    fn = getattr(cls, name, None)
    if not callable(fn):
        return f"transformers' AssistedCandidateGenerator has no {name}()"
    try:
        inspect.signature(fn).bind(None, *positional)
    except (TypeError, ValueError) as e:
        return (
            f"AssistedCandidateGenerator.{name}() takes other arguments than ({', '.join(positional)}): {e}"
        )
    return None


def missing_attributes(gen) -> list:
    """The attributes of :data:`GENERATOR_ATTRIBUTES` that generator `gen` does not have."""
    return [a for a in GENERATOR_ATTRIBUTES if not hasattr(gen, a)]
