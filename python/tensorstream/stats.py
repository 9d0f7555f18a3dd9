"""Statistics and memory-pressure events: counters the runtime keeps, and the dictionary
:func:`tensorstream.get_model_statistics` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from .consts import GiB
from .errors import InvalidArgumentError
from .sparse import statistics as sparse_statistics
from .sparse_kinds import SparseKind


@dataclass
class MemoryPressureEvent:
    """Passed to the callback of :func:`tensorstream.set_memory_pressure_callback` when a
    model's memory pressure level changes (see :mod:`tensorstream.pressure`)."""

    level: str
    """The level now: "none" (the budget as set), "low" (kept units yielded), "high" (the
    prefetch window yielded too), "critical" (down to one unit and still short of memory),
    or "oom" (an out-of-memory error made it release every unit)."""
    previous: str
    model: str
    """The model's class name."""
    free_bytes: int
    """Free memory on the device when the level changed."""
    budget_bytes: int
    """The effective budget now: resident modules plus what streamed units may take."""
    requested_budget_bytes: int
    """The budget the user set (or the default): the effective one never exceeds it."""
    evicted: list
    """Names of the units this change evicted."""
    mode: str
    device: str

    def __str__(self) -> str:
        return (
            f"{self.model} on {self.device}: pressure {self.previous} -> {self.level}, "
            f"{self.free_bytes / GiB:.2f} GiB free, budget {self.budget_bytes / GiB:.2f} of "
            f"{self.requested_budget_bytes / GiB:.2f} GiB, {len(self.evicted)} unit(s) evicted ({self.mode})"
        )

    def as_dict(self) -> dict:
        return dict(self.__dict__)


_pressure_callbacks: list = []


def set_memory_pressure_callback(fn: Optional[Callable[[MemoryPressureEvent], None]]) -> None:
    """Call `fn(event)` whenever an offloaded model's memory pressure level changes (free
    memory fell below the headroom and its budget yielded, or it recovered). ``None``
    removes the callback."""
    _pressure_callbacks.clear()
    if fn is not None:
        if not callable(fn):
            raise InvalidArgumentError(f"memory pressure callback must be callable, got {fn!r}")
        _pressure_callbacks.append(fn)


def notify_pressure(event: MemoryPressureEvent) -> None:
    for cb in list(_pressure_callbacks):
        cb(event)


@dataclass
class Counters:
    accesses: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    stall_seconds: float = 0.0
    pass_seconds: float = 0.0
    bytes_h2d: int = 0
    passes: int = 0
    errors: int = 0
    peak_held: int = 0
    fallbacks: list = field(default_factory=list)


def statistics(rt) -> dict:
    """The statistics of runtime `rt` (see :func:`tensorstream.get_model_statistics`)."""
    c = rt.counters
    tr = rt.transfer
    ps = rt.planner.stats() if rt.planner else {}
    es = rt.engine.stats() if rt.engine else {}
    sparse = rt.sparse.units if rt.sparse else {}  # the planner sees them as 0 bytes: not its to count
    kept = [v for v in rt.planner.kept() if v not in sparse] if rt.planner else []
    resident = [v for v in rt.planner.resident() if v not in sparse] if rt.planner else []
    accesses = max(c.accesses, 1)
    if es.get("direct_refused_files"):
        rt.fallback("the filesystem refused O_DIRECT; reads went through the page cache")
    held = rt.held_bytes()
    plan = rt.budget_plan
    budget = plan.budget if plan else 0
    resident_bytes = plan.resident if plan else 0
    effective = resident_bytes + plan.sparse + rt.planner.budget if rt.planner else budget
    pr = rt.pressure
    source = rt.source
    out = {
        "device": str(rt.device),
        "mode": tr.kind if tr else None,
        "backend": tr.describe() if tr else "unconfigured",
        "requested_backend": rt.config.backend.value,
        "fallbacks": list(c.fallbacks),
        "prefetch_strategy": rt.config.prefetch_strategy.value,
        "memory_pressure_mode": rt.config.memory_pressure_mode.value,
        "budget_gb": budget / GiB,
        "budget_bytes": budget,
        "effective_budget_gb": effective / GiB,
        "effective_budget_bytes": effective,
        "pressure_level": pr.level,
        "pressure_history": [ev.as_dict() for ev in pr.history],
        "memory_free_bytes": pr.free,
        "oom_retries": pr.oom_retries,
        "resident_module_bytes": resident_bytes,
        "vram_usage_gb": held / GiB,
        "streamed_bytes_held": held,
        "peak_usage_bytes": resident_bytes + c.peak_held,
        "peak_usage_gb": (resident_bytes + c.peak_held) / GiB,
        "units": len(rt.units),
        "unit_bytes": list(rt.sizes),
        "offloaded_layers": len(rt.units) - len(kept) if kept else len(rt.units),
        "resident_layers": len(resident),
        "kept_layers": len(kept),
        "accesses": c.accesses,
        "cache_hits": c.hits,
        "prefetch_hits": c.prefetch_hits,
        "misses": c.misses,
        "cache_hit_rate": c.hits / accesses,
        "prefetch_hit_rate": c.prefetch_hits / accesses,
        "bytes_read": es.get("bytes_read", 0),
        "bytes_h2d": c.bytes_h2d,
        "pinned_host_bytes": getattr(tr, "pinned_bytes", 0),
        "stall_seconds": c.stall_seconds,
        "io_busy_seconds": es.get("busy_seconds", 0.0),
        "forward_passes": c.passes,
        "errors": c.errors,
        "buffered_fallback_bytes": es.get("buffered_fallback_bytes", 0),
        **{kind.value: sparse_statistics(rt.sparse, kind) if rt.sparse else None for kind in SparseKind},
        "store_path": source.path,
        "source": source.kind,
        "compression_ratio": getattr(source, "compression_ratio", 1.0),
        "store_raw_bytes": getattr(source, "raw_bytes", None),
        "store_stored_bytes": getattr(source, "stored_bytes", None),
        "decoded_bytes": es.get("decoded_bytes", 0),
        "decode_seconds": es.get("decode_seconds", 0.0),
        "planner": ps,
        "engine": es,
    }
    if rt.draft is not None or rt.speculation.calls:
        out["speculative"] = rt.speculation.as_dict()
    if tr is not None:
        out.update(tr.extra_stats())
    return out
