"""Unit sizes and budgets: the one place that decides what a budget must hold.

`offload()`, `from_pretrained()` and the runtime all size units with
:func:`tensorstream.placement.slot_sizes` (the bytes a unit's buffer takes, conversion tails
included) and check a budget with :func:`plan`; the minimum for the streaming window is the
planner's own (`_core.Planner.min_budget`: the largest units the window holds at once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import nn

from . import _core
from .config import Config
from .consts import PAGE, GiB
from .errors import BudgetError, InvalidArgumentError
from .memory import available_ram, total_ram
from .pressure import read_memory
from .sparse_kinds import is_rows, share_bounds, sparse_units, streams_sparse
from .speculative import draft_of
from .units import resident_bytes


@dataclass(frozen=True)
class BudgetPlan:
    """The budget for one device, split as the planner sees it."""

    budget: int
    """All weight bytes TensorStream may keep on the device (the user's budget or the default)."""
    resident: int
    """Bytes of the modules that are not streamed."""
    units: int
    """Bytes the planner may fill with streamed units (resident units and reads in flight)."""
    sparse: int = 0
    """Bytes the sparse cache may fill with slices of sparse units (:mod:`tensorstream.sparse`)."""

    def effective(self, units_budget: int) -> int:
        """The effective budget when the planner may fill `units_budget` (it yields to memory
        pressure): resident modules, the sparse cache's share and the units' budget."""
        return self.resident + self.sparse + units_budget


def oom_ceiling(ceiling: int, held: int, largest: int) -> int:
    """The units' budget after an out-of-memory error while `held` bytes of units were held
    under `ceiling`: half of what was held, never below the largest unit."""
    return max(min(ceiling, held) // 2, largest)


HOST_TIER_SHARE = 0.4
"""Share of the available RAM the CUDA path's host tier takes by default."""


def host_tier(config: Config) -> tuple:
    """(bytes of pinned RAM the CUDA path's host tier may hold, why it is less than asked
    or None): ``Config.host_cache_gb``, else 40% of the available RAM; at most half the RAM."""
    cap = total_ram() // 2
    want = (
        int(config.host_cache_gb * GiB)
        if config.host_cache_gb is not None
        else int(HOST_TIER_SHARE * available_ram())
    )
    if want > cap:
        return cap, (
            f"host_cache_gb={want / GiB:.1f} exceeds the pinned-memory cap of half the RAM; using {cap / GiB:.1f} GiB"
        )
    return want, None


def default_budget(device: torch.device) -> int:
    """The budget when the user sets none: 80% of the free GPU memory; on CPU the available
    RAM (within the memory cgroup's limit) minus a headroom of max(2 GiB, 10% of RAM)."""
    if device.type not in ("cuda", "cpu"):
        raise InvalidArgumentError(
            f"device {device} is not supported; TensorStream streams to CPU or CUDA devices"
        )
    mem = read_memory(device)
    if device.type == "cuda":
        return int(mem.free * 0.8)
    return max(mem.free - max(2 * GiB, mem.capacity // 10), 0)


def window_bytes(sizes: list, config: Config) -> int:
    """Bytes the streaming window holds at once for these unit sizes and settings."""
    return _core.Planner.min_budget(
        list(sizes), config.prefetch_strategy.value, config.memory_pressure_mode.value
    )


def planner_sizes(units: list, sizes: list, config: Config, device: Optional[torch.device]) -> list:
    """The unit sizes the planner streams: on a device where sparse units stream slice by
    slice, the sparse cache holds them and the planner sees them as 0 bytes."""
    if device is None or not streams_sparse(device):
        return list(sizes)
    apart = set(sparse_units(units, config.sparse_embeddings))
    return [0 if i in apart else s for i, s in enumerate(sizes)]


def needs(units: list, sizes: list, config: Config, device: Optional[torch.device]) -> tuple:
    """(bytes the streaming window holds at once, bytes the sparse cache needs at least)."""
    dense = planner_sizes(units, sizes, config, device)
    sparse = share_bounds(units, sizes, config.sparse_embeddings)[0] if dense != list(sizes) else 0
    return window_bytes(dense, config), sparse


def model_bytes(model: nn.Module, units: list) -> int:
    """The model's own weight bytes: resident modules plus the streamed parameters."""
    return resident_bytes(model, units) + sum(u.nbytes for u in units)


def device_capacity(device: torch.device) -> int:
    """All the memory of the device: the GPU's, or the machine's RAM (or the cgroup's limit)."""
    return read_memory(device).capacity


def kept_beside(model: nn.Module, units: list = ()) -> int:
    """Bytes kept resident beside the model's own modules and counted in its budget: the
    draft given to ``offload(..., draft=)``, which runs on the same device. A tensor the
    draft shares with the model (``draft="int8"`` shares the embeddings and norms) counts
    once, with the model, while the model keeps it resident; one that `units` stream counts
    here, as the draft's own copy (``offload`` makes it)."""
    draft = draft_of(model)
    if draft is None:
        return 0
    streamed = {id(p.get()) for u in units for p in u.params}
    held = {id(t) for t in list(model.parameters()) + list(model.buffers())} - streamed
    own = {id(t): t for t in list(draft.parameters()) + list(draft.buffers()) if id(t) not in held}
    return sum(t.numel() * t.element_size() for t in own.values())


def _draft_note(model: nn.Module, units: list) -> str:
    beside = kept_beside(model, units)
    return f" (the draft {beside} of them)" if beside else ""


def room_for_units(model: nn.Module, units: list, sizes: list, budget: int, explicit: bool = True) -> int:
    """Bytes the planner may fill with `units` (of buffer sizes `sizes`) under `budget`: what
    the modules left resident leave, or room for every unit when an `explicit` budget holds
    the whole model and the buffers add only their alignment (a budget of the model's own
    size is never refused). :func:`plan` and :func:`streamed_subset` both decide with it."""
    resident = resident_bytes(model, units) + kept_beside(model, units)
    streamed = sum(u.nbytes for u in units)
    room = budget - resident
    padding = sum(sizes) - streamed
    alignment = sum(PAGE * (len(u.params) + 1) for u in units)  # what buffers add beyond the bytes
    if explicit and budget >= resident + streamed and padding <= alignment:  # the model's own bytes
        room = max(room, sum(sizes))
    return room


def plan(
    model: nn.Module,
    units: list,
    sizes: list,
    config: Config,
    device: torch.device,
    others: list = (),
    warn: bool = True,
) -> BudgetPlan:
    """The budget for streaming `units` (of buffer sizes `sizes`) to `device`, or a
    BudgetError with the numbers and what to do. A budget that holds the whole model is never
    refused: the planner then gets room for every unit (their buffers' alignment padding,
    under 4 KiB a tensor, is the only excess).

    `others` are (budget, bytes held now) of the other models streaming to this device in
    this process. A default budget is what the model needs at most (its own buffers), within
    what the device has free minus what the others were promised and do not hold yet; explicit
    budgets that add up past the device's memory warn (if `warn`: once per model)."""
    resident = resident_bytes(model, units) + kept_beside(model, units)
    unused = sum(max(b - held, 0) for b, held in others)
    if config.budget_bytes is not None:
        budget = config.budget_bytes
        promised = budget + sum(b for b, _ in others)
        if warn and others and promised > device_capacity(device):
            warnings.warn(
                f"TensorStream: the budgets of the {len(others) + 1} models streaming to {device} add up to "
                f"{promised / GiB:.1f} GiB, more than its {device_capacity(device) / GiB:.1f} GiB",
                RuntimeWarning,
                stacklevel=4,
            )
    else:
        budget = min(max(default_budget(device) - unused, 0), resident + sum(sizes))
    unit_budget = room_for_units(model, units, sizes, budget, explicit=config.budget_bytes is not None)
    window, sparse = needs(units, sizes, config, device)
    need = window + sparse
    if unit_budget < need:
        largest = max(sizes) if sizes else 0
        strategy = config.prefetch_strategy.value
        pmode = config.memory_pressure_mode.value
        held = f"{window} bytes of units at once"
        if sparse:
            held += f", and the sparse cache at least {sparse} bytes (a layer's experts: a prefill may route to all)"
        raise BudgetError(
            f"a budget of {budget / GiB:.4g} GiB ({budget} bytes) cannot work on {device}: the modules that "
            f"are not streamed take {resident} bytes{_draft_note(model, units)}, leaving {unit_budget} for streamed units, but the "
            f"largest unit takes {largest} bytes and prefetch strategy {strategy!r} ({pmode}) holds up to "
            f"{held}. Raise vram_budget_gb to at least {(resident + need) / GiB:.4g} "
            f"({resident + need} bytes), or stream more modules (Config.units)."
        )
    if not sparse:
        return BudgetPlan(budget=budget, resident=resident, units=unit_budget)
    # A dense unit is used by every token, a slice by a few: the planner gets room to keep
    # every dense unit first, the sparse cache the rest (what it asks for at least).
    dense = sum(planner_sizes(units, sizes, config, device))
    wanted = max(sparse, share_bounds(units, sizes, config.sparse_embeddings)[1])
    planner = max(window, min(dense, unit_budget - wanted))
    return BudgetPlan(budget=budget, resident=resident, units=planner, sparse=unit_budget - planner)


def fits(
    model: nn.Module, units: list, sizes: dict, config: Config, device: Optional[torch.device] = None
) -> bool:
    """Whether streaming `units` (`sizes`: buffer bytes by unit name) to `device` fits the
    config's explicit budget beside the modules left resident, as :func:`plan` decides; True
    without an explicit budget."""
    budget: Optional[int] = config.budget_bytes
    if budget is None:
        return True
    us_sizes = [sizes[u.name] for u in units]
    return room_for_units(model, units, us_sizes, budget) >= sum(needs(units, us_sizes, config, device))


def streamed_subset(
    model: nn.Module,
    units: list,
    candidates: list,
    sizes: dict,
    config: Config,
    device: Optional[torch.device] = None,
) -> list:
    """The units to stream to `device`: `units`, plus as few `candidates` (largest first) as
    it takes for the modules left resident to fit the budget beside the streaming window,
    decided as :func:`plan` decides. `sizes` maps a unit's name to its buffer size. With
    ``Config.sparse_embeddings``, where sparse units stream slice by slice (the CPU), an
    untied input embedding always streams, a row block at a time (:mod:`tensorstream.sparse`).
    Returns fresh UnitSpecs indexed from 0."""
    chosen = list(units)
    if config.sparse_embeddings and device is not None and streams_sparse(device):
        chosen += [c for c in candidates if is_rows(c)]
    for spec in candidates:
        if spec in chosen:
            continue
        if fits(model, chosen, sizes, config, device):
            break
        chosen.append(spec)
    return [replace(u, index=i) for i, u in enumerate(chosen)]
