"""The draft of ``offload(..., draft=)``: what is accepted as one (:func:`check_draft`), and
where it hangs on the model it drafts for (:func:`draft_of`, :func:`attach_draft`,
:func:`detach_draft`). No transformers import: a draft is checked by what it can do."""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import InvalidArgumentError

DRAFT_KEY = "_tensorstream_draft"
"""The key of the draft in the model's ``__dict__``: an attribute, not a submodule, so it is
not in the model's ``state_dict`` and is not offloaded with it."""

SELF_DRAFTS = ("int8",)
"""The strings ``offload(..., draft=)`` accepts: drafts built from the model itself."""


def draft_of(model: nn.Module) -> Optional[nn.Module]:
    """The draft attached to `model`, or None."""
    return model.__dict__.get(DRAFT_KEY)


def attach_draft(model: nn.Module, draft: nn.Module) -> None:
    """Attach `draft` to `model` (not as a submodule: not in the model's state_dict)."""
    model.__dict__[DRAFT_KEY] = draft


def detach_draft(model: nn.Module) -> Optional[nn.Module]:
    """Remove the draft attached to `model`, if any, and return it (None if there was none)."""
    return model.__dict__.pop(DRAFT_KEY, None)


def check_draft(draft, model: nn.Module) -> None:
    """Refuse a `draft` that ``offload(model, ..., draft=)`` cannot use: a model that can
    ``generate()`` and stays resident, or a string naming a draft built from the model."""
    if isinstance(draft, str):
        if draft not in SELF_DRAFTS:
            raise InvalidArgumentError(
                f"draft={draft!r} is not a draft TensorStream builds; draft takes a transformers model that "
                f"can generate(), or one of {', '.join(repr(k) for k in SELF_DRAFTS)} (a copy of the model "
                "with int8 weights, built from it)"
            )
        if not hasattr(model, "generate"):
            raise InvalidArgumentError(
                f"draft={draft!r} builds the draft from the model, which must be a transformers model that can "
                f"generate(); {type(model).__name__} cannot"
            )
        return
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
