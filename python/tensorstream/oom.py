"""The retry after an out-of-memory error in a unit: where memory runs out (a GPU), a unit
that fails for lack of memory is run again once after every streamed unit the model held was
released, if the retry can give the un-offloaded model's answer (:func:`retry_allowed`).
Each unit call there first records the state of its inputs (:func:`inputs_state`), so that a
unit that changed them before failing (a KV cache it appended to) is not run twice."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import OutOfMemoryError

RETRY_DEVICES = {"cuda"}
"""Devices whose out-of-memory errors in a unit are retried (tests add "cpu" to simulate them)."""


def inputs_state(device: torch.device, args, kwargs) -> Optional[list]:
    """:func:`state` of a unit's inputs on a device whose out-of-memory errors are retried,
    else None."""
    return state(args, kwargs) if device.type in RETRY_DEVICES else None


def state(args, kwargs) -> list:
    """What a unit's inputs are now: every tensor reachable from them (through lists, dicts,
    a KV cache's layers and other plain objects, a few levels deep) with its version counter,
    which in-place writes advance. Two equal states mean nothing was appended or written."""
    out: list = []

    def version(t: torch.Tensor) -> tuple:
        # Inference tensors have no version counter; their writes go unseen (a KV cache
        # appends by making new tensors, which is seen).
        return id(t), t.data_ptr() if t.is_inference() else t._version

    def walk(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(version(obj))
        elif type(obj) in _ATOMS or depth > 4 or isinstance(obj, nn.Module):
            return
        elif type(getattr(obj, "layers", None)) is list and hasattr(obj, "get_seq_length"):
            # transformers' KV cache (the common case, made fast): each layer's tensors.
            for layer in obj.layers:
                attrs = getattr(layer, "__dict__", {}).values()
                out.extend(version(t) for t in attrs if isinstance(t, torch.Tensor))
        elif isinstance(obj, (list, tuple)):
            out.append(len(obj))
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            out.append(len(obj))
            for x in obj.values():
                walk(x, depth + 1)
        elif hasattr(obj, "__dict__"):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(args, 0)
    walk(kwargs, 0)
    return out


_ATOMS = frozenset((type(None), bool, int, float, str, torch.device, torch.dtype))


def why_not_retried(nested: bool, inputs: list, args, kwargs, held: int, unit_bytes: int) -> Optional[str]:
    """Why a unit that ran out of memory cannot be run again with the un-offloaded model's
    answer, or None when it can: it runs inside another streamed unit (`nested`: whose weights
    must stay), it changed its inputs before failing, or the model held nothing beyond the
    unit's own `unit_bytes` to release (`held`)."""
    if nested:
        return "it runs inside another streamed unit, whose weights must stay"
    if state(args, kwargs) != inputs:
        return "it had already changed its inputs (the KV cache, for example) before it failed"
    if held <= unit_bytes:
        return "TensorStream held no other streamed unit to release"
    return None


def not_retried(name: str, device: torch.device, why: str) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"{name}: out of memory on {device} and not retried: {why}. Lower vram_budget_gb (or set "
        "Config.memory_headroom_gb higher, so the budget yields earlier), the batch size or the context length."
    )


def failed_again(name: str, device: torch.device) -> OutOfMemoryError:
    return OutOfMemoryError(
        f"{name}: out of memory on {device} again after TensorStream released "
        "every streamed unit it held; the rest of the model (activations, the KV cache) needs "
        "more than the device has. Lower vram_budget_gb, the batch size or the context length."
    )
