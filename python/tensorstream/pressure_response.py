"""The response to memory pressure and to out-of-memory errors: the units' budget of every
model streaming to a device yields to what the device has free (see :mod:`.pressure` for the
probe and the rule, and "Memory pressure" in docs/design.md).

What it asks of a runtime (:class:`tensorstream.runtime.Runtime`): ``pressure`` (its
:class:`~tensorstream.pressure.Yielding` state), ``budget_plan``, ``planner``, ``transfer``,
``evict(i)``, ``drop_all()``, ``held_bytes()``, ``units_running``, ``offer_ceiling(allowance,
reading)`` and its description (``model``, ``device``, ``config``, ``units``, ``sizes``)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import budget, oom, pressure, registry
from .stats import MemoryPressureEvent, notify_pressure

log = logging.getLogger("tensorstream")


def respond(rt) -> None:
    """At a unit boundary of `rt`: apply a ceiling decided while it ran, then (at most every
    ``pressure.PROBE_INTERVAL``) read the device's free memory and set the ceiling of every
    model streaming to this device (those running in another thread at their next unit)."""
    p = rt.pressure
    if p.pending is not None:
        set_ceiling(rt, *p.pending)
    if not pressure.due(rt.device):
        return
    peers = [
        other
        for other in registry.peers(rt.device)
        if other.planner is not None and other.transfer is not None
    ]
    reading = pressure.read_memory(rt.device)
    allowed = pressure.allowances(peers, reading)
    for other, allowance in zip(peers, allowed or [None] * len(peers)):
        other.pressure.free = reading.free
        if allowance is None:
            continue
        if other is rt:
            set_ceiling(rt, allowance, reading)
        else:
            other.offer_ceiling(allowance, reading)


def set_ceiling(rt, allowance: int, reading, level: Optional[str] = None, evicted: list = ()) -> None:
    """Make `allowance` the units' budget of `rt` (never above the planned one), evicting
    what no longer fits, and tell the callback when the pressure level changed."""
    p = rt.pressure
    p.pending = None
    p.free = reading.free
    plan = rt.budget_plan.units
    ceiling = None if allowance >= plan else allowance
    evicted = list(evicted)
    if ceiling != p.ceiling:
        p.ceiling = ceiling
        dropped, _ = rt.planner.set_budget(plan if ceiling is None else ceiling)
        for v in dropped:
            rt.evict(v)
        evicted += [rt.units[v].name for v in dropped]
        rt.transfer.set_limit(rt.planner.budget)
    level = level or pressure.level(allowance, plan, max(rt.sizes), budget.window_bytes(rt.sizes, rt.config))
    if level != p.level:
        ev = MemoryPressureEvent(
            level=level,
            previous=p.level,
            model=type(rt.model).__name__,
            free_bytes=reading.free,
            budget_bytes=rt.budget_plan.effective(rt.planner.budget),
            requested_budget_bytes=rt.budget_plan.budget,
            evicted=evicted,
            mode=rt.config.memory_pressure_mode.value,
            device=str(rt.device),
        )
        p.level = level
        p.history.append(ev)
        log.debug("memory pressure: %s", ev)
        notify_pressure(ev)


def before_oom_retry(rt, i: int, error: BaseException, inputs: list, args, kwargs) -> None:
    """After an out-of-memory error in unit `i` of `rt`: release every streamed unit and lower
    the ceiling (half of what it held, at least the largest unit), learning the extra headroom
    the forward needs, so that the retry has the memory they held; or raise OutOfMemoryError
    when a retry could not give the un-offloaded model's answer (:func:`oom.why_not_retried`)."""
    held = rt.held_bytes()
    why = oom.why_not_retried(rt.units_running > 0, inputs, args, kwargs, held, rt.sizes[i])
    if why is not None:
        raise oom.not_retried(rt.units[i].name, rt.device, why) from error
    log.debug(
        "%s: out of memory holding %d bytes of units; releasing them and retrying once",
        rt.units[i].name,
        held,
    )
    p = rt.pressure
    p.oom_retries += 1
    ceiling = budget.oom_ceiling(p.ceiling or rt.budget_plan.units, held, max(rt.sizes))
    p.learned_headroom += max(held - ceiling, 0)
    names = [rt.units[v].name for v in rt.planner.resident()]
    rt.drop_all()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    set_ceiling(rt, ceiling, pressure.read_memory(rt.device), "oom", names)
