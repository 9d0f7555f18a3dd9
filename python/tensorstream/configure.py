"""Configuring a runtime for its device: the budget plan, the transfer path, the planner,
the engines and the sparse cache (:func:`build`, run by ``Runtime.configure`` whenever the
device changes or after a teardown)."""

from __future__ import annotations

import logging

from . import _core, budget, pressure, registry
from .config import BackendType
from .memory import available_ram
from .sparse import SparseCache
from .transfer import PATHS, Context, probe_gds, select_path

log = logging.getLogger("tensorstream")

make_engine = _core.Engine
"""Makes the runtime's engines; tests swap in ``_core.Engine.with_faults`` to inject faults."""


def check_budget(rt) -> budget.BudgetPlan:
    """The budget plan of runtime `rt` beside the other models streaming to its device."""
    others = [
        (peer.budget_plan.budget, peer.budget_plan.resident + peer.held_bytes())
        for peer in registry.peers(rt.device, collect=True)
        if peer is not rt and peer.budget_plan is not None
    ]
    return budget.plan(
        rt.model, rt.units, rt.sizes, rt.config, rt.device, others, warn=rt.budget_plan is None
    )


def build(rt) -> None:
    """Give runtime `rt` (torn down) its budget plan, transfer path, planner, engine and
    sparse cache for its current device."""
    cfg = rt.config
    rt.budget_plan = check_budget(rt)
    if rt.transfer_device != rt.device:  # another device: another memory to yield to
        rt.pressure = pressure.Yielding()
        rt.transfer_device = rt.device
    gds = None
    if rt.device.type == "cuda" and cfg.backend == BackendType.GPUDIRECT:
        gds = probe_gds(rt.source.files[0])
    # Parameters converted in their buffer's tail (another dtype) cannot be views of a mapping.
    mappable = rt.source.mappable and not any(rt.placement.converts)
    choice = select_path(cfg, rt.device, mappable, rt.source.file_len, available_ram(), gds)
    if choice.fallback:
        rt.fallback(choice.fallback)
    rt.planner = new_planner(rt)
    rt.relearned = False
    rt.engine = engine_for(rt, choice.engine_backend)
    ctx = Context(
        units=rt.units,
        layouts=rt.layouts,
        placement=rt.placement,
        source=rt.source,
        config=cfg,
        device=rt.device,
        unit_budget=rt.planner.budget,
        engine=rt.engine,
        counters=rt.counters,
        planner_used=lambda: rt.planner.stats()["used"] if rt.planner else 0,
        fallback=rt.fallback,
        fallback_when_run=choice.fallback_if_run,
    )
    rt.transfer = PATHS[choice.kind](ctx)
    if rt.budget_plan.sparse:
        rt.sparse = SparseCache(
            rt.model, rt.units, rt.layouts, rt.transfer, cfg, rt.budget_plan.sparse, lambda: rt._track_peak()
        )
    log.debug("configured %s: %s", choice.kind, rt.budget_plan)


def new_planner(rt):
    """A planner for `rt`'s units and budget plan, under the ceiling memory pressure set."""
    cfg = rt.config
    planner = _core.Planner(
        budget.planner_sizes(rt.units, rt.sizes, cfg, rt.device),
        rt.budget_plan.units,
        cfg.prefetch_strategy.value,
        cfg.memory_pressure_mode.value,
    )
    if rt.pressure.ceiling is not None:
        planner.set_budget(rt.pressure.ceiling)
    return planner


def engine_for(rt, backend: str):
    """One engine per backend for the runtime's life: it holds the files validated when the
    source was opened, so a file replaced on disk later is never read with this layout. In a
    forked child the engine is new and reopens the inherited descriptors."""
    engine = rt.engines.get(backend)
    if engine is None:
        cfg = rt.config
        engine = make_engine(backend, cfg.num_io_threads, cfg.chunk_mb << 20)
        if rt.forked:
            engine.preopen([f"/proc/self/fd/{rt.source.fds[f]}" for f in rt.source.files])
        else:
            engine.preopen(list(rt.source.files))
        rt.engines[backend] = engine
    return engine
