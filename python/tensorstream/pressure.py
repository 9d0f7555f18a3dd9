"""Memory pressure: what the device has free, and the budget that yields to it.

The budget a user sets is a ceiling, not a promise. At unit boundaries (at most every
:data:`PROBE_INTERVAL` seconds per device) the runtime reads the device's free memory
(:func:`read_memory`). When it falls below the headroom (``Config.memory_headroom_gb``, by
default a share of the device's capacity that depends on the ``MemoryPressureMode``), every
offloaded model on that device shrinks its units' budget so that one and a half headrooms
are free again: the kept units go first, then the prefetch window, down to one unit. When
more than two headrooms are free, the budgets grow back towards what the users set, again
aiming at one and a half. Between one and two headrooms nothing changes: the gap between
the two thresholds is what keeps the budgets from oscillating. See "Memory pressure" in
docs/design.md.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import InvalidArgumentError
from .memory import available_ram, total_ram

PROBE_INTERVAL = 0.01
"""Seconds between two probes of one device's free memory (tests set 0)."""

HEADROOM_SHARE = {"conservative": 0.10, "balanced": 0.05, "aggressive": 0.02}
"""Default headroom by memory pressure mode, as a share of the device's capacity:
conservative yields early, aggressive keeps the most."""

HISTORY = 16
"""Pressure events each model keeps for its statistics."""


@dataclass(frozen=True)
class MemoryReading:
    """One probe of a device's memory."""

    free: int
    """Bytes the process can still allocate there."""
    capacity: int
    """The most the process may use there: the GPU's memory (or its per-process cap), the
    machine's RAM, or the container's limit."""


_probe: list = []


def set_memory_probe(fn: Optional[Callable[[torch.device], MemoryReading]]) -> None:
    """Replace how free memory is read: `fn(device)` returns a :class:`MemoryReading` (for
    tests, or to budget against a limit of your own). ``None`` restores the built-in probe.

    Each reading is checked: ``free`` must be a finite number of bytes >= 0 and ``capacity``
    one > 0 (an int, or a float, rounded down). Anything else (NaN, inf, a
    negative number, a tuple, ``None``) raises :class:`~tensorstream.errors.InvalidArgumentError`
    naming the probe and what it returned, from the forward that read it (the model is
    recovered and runs again once the probe is fixed or ``set_memory_probe(None)`` is called):
    a budget computed from nonsense would be silently wrong, so it is never used."""
    _probe.clear()
    if fn is not None:
        if not callable(fn):
            raise InvalidArgumentError(f"memory probe must be callable, got {fn!r}")
        _probe.append(fn)


def read_memory(device: torch.device) -> MemoryReading:
    """The free memory of `device`: on CUDA the driver's free memory plus what the caching
    allocator holds unused, within ``torch.cuda.set_per_process_memory_fraction``'s cap; on
    CPU the available RAM, within the memory cgroup's limit when there is one."""
    if _probe:
        return checked_reading(_probe[0], _probe[0](device), device)
    if device.type == "cuda":
        return _cuda(device)
    return _cpu()


def checked_reading(fn, reading, device: torch.device) -> MemoryReading:
    """`reading`, what probe `fn` returned for `device`, as a valid :class:`MemoryReading`
    (numbers made ints), or InvalidArgumentError naming the probe and the value."""

    def nonsense(why: str) -> InvalidArgumentError:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        return InvalidArgumentError(
            f"the memory probe {name} set with tensorstream.set_memory_probe returned {reading!r} for "
            f"{device}: {why}. Return MemoryReading(free=<bytes>, capacity=<bytes>), or call "
            "set_memory_probe(None) to use the built-in probe"
        )

    if not isinstance(reading, MemoryReading):
        raise nonsense(f"not a MemoryReading but a {type(reading).__name__}")
    values = {}
    for name, least in (("free", 0), ("capacity", 1)):
        v = getattr(reading, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise nonsense(f"{name} must be a finite number of bytes, not {v!r}")
        if v < least:
            raise nonsense(f"{name} must be {'>= 0' if least == 0 else '> 0'} bytes, not {v!r}")
        values[name] = int(v)
    return MemoryReading(**values)


def _cuda(device: torch.device) -> MemoryReading:
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    free += torch.cuda.memory_reserved(device) - allocated
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
    fraction = get_fraction(device) if get_fraction else 1.0
    if fraction < 1:
        total = int(total * fraction)
        free = min(free, total - allocated)
    return MemoryReading(free=max(free, 0), capacity=total)


def _cpu() -> MemoryReading:
    return MemoryReading(free=available_ram(), capacity=total_ram())


def headroom(config, capacity: int) -> int:
    """The free memory below which the budget yields."""
    if config.memory_headroom_gb is not None:
        return int(config.memory_headroom_gb * (1 << 30))
    return int(capacity * HEADROOM_SHARE[config.memory_pressure_mode.value])


@dataclass
class Yielding:
    """One model's state under memory pressure (``Runtime.pressure``)."""

    ceiling: Optional[int] = None
    """The units' budget now, when it yields (None: the budget as planned)."""
    pending: Optional[tuple] = None
    """(allowance, reading) another thread decided while this model ran; applied at its
    next unit."""
    level: str = "none"
    learned_headroom: int = 0
    """Bytes an out-of-memory error made the model give up beyond the headroom: later probes
    keep them free too (the forward needs more than the headroom left)."""
    oom_retries: int = 0
    free: Optional[int] = None
    """Free bytes at the last probe."""

    def __post_init__(self) -> None:
        self.history: deque = deque(maxlen=HISTORY)


_last_probe: dict = {}


def due(device: torch.device) -> bool:
    """Whether the device's free memory should be read again now (rate limit)."""
    key = str(device)
    now = time.monotonic()
    if now - _last_probe.get(key, float("-inf")) < PROBE_INTERVAL:
        return False
    _last_probe[key] = now
    return True


def allowances(peers: list, reading: MemoryReading) -> Optional[list]:
    """The units' budget each of `peers` (runtimes streaming to one device) may have now, or
    None when free memory is within the band where nothing changes. Together they may hold
    what they hold now, plus what is free, less one and a half headrooms; it is shared in
    proportion to the budgets their users set, each between its largest unit and its budget."""
    room = max(headroom(rt.config, reading.capacity) + rt.pressure.learned_headroom for rt in peers)
    shrink = reading.free < room
    grow = reading.free > 2 * room and any(rt.pressure.ceiling is not None for rt in peers)
    if not (shrink or grow):
        return None
    # Bytes a model holds that the probe does not already count as free (a mapping's pages
    # are page cache, which MemAvailable counts).
    own = sum(rt.transfer.private_bytes(rt.held_bytes()) for rt in peers)
    total = max(own + reading.free - room * 3 // 2, 0)
    asked = [rt.budget_plan.units for rt in peers]
    whole = max(sum(asked), 1)
    return [total * a // whole for a in asked]


def level(allowance: int, plan: int, largest: int, window: int) -> str:
    """The pressure level (see :class:`tensorstream.MemoryPressureEvent`) of a model allowed
    `allowance` bytes of units, planned `plan`, whose largest unit takes `largest` and whose
    prefetch window needs `window`."""
    if allowance >= plan:
        return "none"
    if allowance < largest:
        return "critical"
    return "low" if allowance >= window else "high"
