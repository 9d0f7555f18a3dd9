"""The process's live runtimes: one per offloaded model (deep copies included), so that the
models streaming to one device share its memory: their default budgets
(:func:`tensorstream.budget.plan`) and their response to memory pressure
(:func:`tensorstream.pressure.respond`) see the same peers, matched by exact device
(``cuda:0`` and ``cuda:1`` are not peers)."""

from __future__ import annotations

import gc
import os
import weakref

import torch

_RUNTIMES: weakref.WeakSet = weakref.WeakSet()


def register(runtime) -> None:
    _RUNTIMES.add(runtime)


def peers(device: torch.device, collect: bool = False) -> list:
    """The live runtimes streaming to `device`. With `collect`, models deleted but not yet
    collected are collected first (a model and its runtime form a cycle)."""
    if collect and len(_RUNTIMES) > 1:
        gc.collect()
    return [rt for rt in list(_RUNTIMES) if rt.device == device]


def _after_fork_in_child() -> None:
    for rt in list(_RUNTIMES):
        rt.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
