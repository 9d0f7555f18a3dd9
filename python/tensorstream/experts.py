"""Expert-granular streaming of mixture-of-experts layers: read only the experts the router
picks, keep the experts used most, and prefetch the next layer's by its router.

transformers' MoE families keep a layer's experts in one module whose parameters are fused
``[num_experts, ...]`` tensors, called as ``experts(hidden_states, top_k_index,
top_k_weights)`` after the router ran (:func:`is_experts`). By default such a module is a
unit of its own (:func:`tensorstream.units.analyse`); its expert ``e`` is the ``e``-th slice
of each fused tensor, contiguous in the store, so reading it is one request per tensor
(``Layout.select``).

On the CPU paths the unit's parameters are views of one buffer of the unit's full size whose
pages are committed only where an expert was read: an anonymous mapping (pread) or the
store's own mapping (mmap). The experts forward reads only the slices of the experts in
``top_k_index`` (transformers' eager, ``grouped_mm`` and ``batched_mm`` implementations
all do), so the slices of experts not read are never touched. Any other implementation gets
every expert of the layer. On CUDA the experts unit streams whole through the planner.

Residency (:class:`ExpertCache`): which experts a token needs does not repeat in an order
the planner could learn, so the planner's rule (evict what is needed furthest ahead) does not
apply. The cache keeps the experts routed to most often, counted per call and halved every
``HALF_LIFE`` calls of their layer so that the counts follow a drift in routing; ties go to
the expert used last. A layer's routed experts must all be resident while it computes, so
the cache's share of the budget is at least the largest experts unit (a prefill may route to
every expert). The first call of each unit reads it whole with its checksum (verified once,
as a mapping is); later reads are of single experts.

Lookahead: while layer ``l``'s experts are fetched, layer ``l+1``'s router (resident) is
applied to layer ``l``'s expert input and the experts it picks are prefetched. A wrong guess
costs bandwidth only: demand loads decide what is computed.
"""

from __future__ import annotations

import inspect
import mmap
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .errors import BudgetError

PAGE = 4096
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
HALF_LIFE = 64
"""Calls of a layer after which its experts' routing counts are halved."""
SPARSE_IMPLEMENTATIONS = frozenset((None, "eager", "grouped_mm", "batched_mm"))
"""transformers' experts implementations that read only the routed experts' slices."""


def is_experts(module: nn.Module) -> bool:
    """True for a module of fused experts called after routing: an int ``num_experts``,
    parameters that are all ``[num_experts, ...]`` tensors, no children holding parameters,
    and a forward taking ``top_k_index``."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or n < 2:
        return False
    params = [p for p in module._parameters.values() if p is not None]
    if not params or any(p.dim() < 2 or p.shape[0] != n for p in params):
        return False
    if any(True for c in module.children() for _ in c.parameters()):
        return False
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return False
    return "top_k_index" in sig.parameters


def router_of(parent: nn.Module, experts: nn.Module) -> Optional[nn.Module]:
    """The router beside `experts` in `parent`: a child with a ``[num_experts, hidden]``
    weight (the gate of Mixtral, Qwen-MoE, DeepSeek and the others)."""
    for child in parent.children():
        w = getattr(child, "weight", None)
        if child is not experts and isinstance(w, torch.Tensor) and w.dim() == 2:
            if w.shape[0] == experts.num_experts:
                return child
    return None


def experts_and_routers(block: nn.Module) -> list:
    """(experts module, its router or None) of every experts module inside `block`."""
    out = []
    for parent in block.modules():
        for child in parent.children():
            if is_experts(child):
                out.append((child, router_of(parent, child)))
    return out


def streams_experts(device: torch.device) -> bool:
    """Whether experts units stream expert by expert on `device` (the CPU paths)."""
    return device.type == "cpu"


def expert_units(units: list) -> list:
    """Indices of the units that are experts modules."""
    return [u.index for u in units if len(u.modules) == 1 and is_experts(u.modules[0])]


def _span(offset: int, nbytes: int) -> tuple:
    """The pages a byte range touches: (first page's offset, bytes to its last page's end)."""
    lo = offset // PAGE * PAGE
    hi = (offset + nbytes + PAGE - 1) // PAGE * PAGE
    return lo, hi - lo


def _selectable(layout, ranges: list) -> bool:
    """Whether each expert can be read alone: its slices are stored raw."""
    try:
        for r in ranges:
            layout.select(r)
    except ValueError:
        return False
    return True


@dataclass
class _Unit:
    """One experts unit's state in the cache."""

    index: int
    experts: int
    ranges: list  # per expert: [(offset, nbytes)] of its slice of each fused tensor
    cost: int  # bytes one expert holds: the pages its slices touch
    router: Optional[nn.Module]
    top_k: int
    selectable: bool  # stored raw: a single expert can be read
    resident: set = field(default_factory=set)
    tickets: dict = field(default_factory=dict)  # expert -> read in flight
    whole: object = None  # the unit's whole read in flight (its first, verified read)
    counts: list = field(default_factory=list)
    last_used: list = field(default_factory=list)
    calls: int = 0
    verified: bool = False
    predicted: Optional[set] = None


class ExpertCache:
    """The experts of every experts unit, held within `share` bytes of the budget."""

    def __init__(self, rt, share: int):
        self.rt = rt
        self.share = share
        self.engine = rt.engine
        tr = rt.transfer
        self.mapped = tr.zero_copy  # mmap: the store's mapping; pread: anonymous buffers
        self.units: dict = {}
        self.order = expert_units(rt.units)
        self.buffers: dict = {}
        self.stats = dict(
            calls=0, hits=0, prefetch_hits=0, misses=0, prefetched=0, bytes_read=0, predicted=0, predicted_hits=0
        )
        self.tokens = 0
        for i in self.order:
            u = rt.units[i]
            mod = u.modules[0]
            n = mod.num_experts
            ranges = [[] for _ in range(n)]
            for slot in rt.placement.slots[i]:
                step = slot.part.nbytes // n
                for e in range(n):
                    ranges[e].append((slot.part.offset + e * step, step))
            cost = sum(_span(o, b)[1] for o, b in ranges[0])
            parent_router = self._router(mod)
            self.units[i] = _Unit(
                index=i,
                experts=n,
                ranges=ranges,
                cost=cost,
                router=parent_router,
                top_k=int(getattr(parent_router, "top_k", 0) or getattr(getattr(mod, "config", None), "num_experts_per_tok", 0) or 0),
                selectable=_selectable(rt.layouts[i], ranges),
                counts=[0.0] * n,
                last_used=[0] * n,
            )
            if not self.mapped:
                m = mmap.mmap(-1, rt.sizes[i])
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.buffers[i] = (m, torch.frombuffer(m, dtype=torch.uint8))
        need = max((rt.sizes[i] for i in self.order), default=0)
        if share < need:
            raise BudgetError(f"the experts' share of the budget ({share} bytes) is below its largest unit ({need})")

    def _router(self, experts: nn.Module) -> Optional[nn.Module]:
        """The resident router beside `experts` (None when it streams: it cannot predict)."""
        for parent in self.rt.model.modules():
            if any(c is experts for c in parent.children()):
                r = router_of(parent, experts)
                streamed = {id(p.get()) for u in self.rt.units for p in u.params}
                if r is not None and not any(id(p) in streamed for p in r.parameters()):
                    return r
        return None

    # ------------------------------------------------------------ accounting

    def held_bytes(self) -> int:
        """Bytes of experts held now, resident or in flight."""
        total = 0
        for u in self.units.values():
            size = self.rt.sizes[u.index]
            total += size if u.whole is not None else min(size, u.cost * len(u.resident | set(u.tickets)))
        return total

    def _evict_expert(self, u: _Unit, e: int) -> None:
        t = u.tickets.pop(e, None)
        if t is not None:
            self.engine.cancel(t)
            try:
                self.engine.wait(t)
            except Exception:  # noqa: BLE001 - a cancelled read is dropped either way
                pass
        u.resident.discard(e)
        self._drop_pages(u, u.ranges[e])

    def _drop_pages(self, u: _Unit, ranges: list) -> None:
        """Give an expert's pages back. A mapping of the store refaults a dropped page with
        its content, so whole pages go; an anonymous buffer would refault zeros, so only the
        pages inside the expert's slices go (a page shared with a neighbour stays)."""
        if self.mapped:
            tr = self.rt.transfer
            base = tr.offsets[u.index]
            for o, b in ranges:
                lo, n = _span(base + o, b)
                tr.map.madvise(MADV_DONTNEED, lo, n)
            return
        m = self.buffers[u.index][0]
        for o, b in ranges:
            lo = (o + PAGE - 1) // PAGE * PAGE
            hi = (o + b) // PAGE * PAGE
            if hi > lo:
                m.madvise(MADV_DONTNEED, lo, hi - lo)

    def _make_room(self, nbytes: int, keep: set) -> bool:
        """Evict the experts counted least (ties: used longest ago), never one in `keep`
        ((unit, expert) pairs), until `nbytes` more fit in the share; False if they cannot."""
        while self.held_bytes() + nbytes > self.share:
            victims = [
                (u.counts[e], u.last_used[e], u.index, e)
                for u in self.units.values()
                for e in (u.resident | set(u.tickets))
                if (u.index, e) not in keep
            ]
            if not victims:
                return False
            _c, _l, i, e = min(victims)
            self._evict_expert(self.units[i], e)
        return True

    def _room(self, nbytes: int, keep: set) -> None:
        if not self._make_room(nbytes, keep):
            raise BudgetError(
                f"the experts' share of the budget ({self.share} bytes) cannot hold {nbytes} more bytes beside the "
                f"{len(keep)} experts this call needs; raise vram_budget_gb"
            )

    # ------------------------------------------------------------ loading

    def _ptr(self, u: _Unit) -> tuple:
        """(address of the unit's buffer, the object keeping it alive)."""
        if self.mapped:
            tr = self.rt.transfer
            return tr.base.data_ptr() + tr.offsets[u.index], tr.base
        buf = self.buffers[u.index][1]
        return buf.data_ptr(), buf

    def _submit(self, layout, u: _Unit, demand: bool):
        ptr, keep = self._ptr(u)
        self.stats["bytes_read"] += layout.bytes_to_read
        if self.mapped:
            return self.engine.submit_populate(layout, ptr, demand, keep)
        return self.engine.submit(layout, ptr, self.rt.sizes[u.index], demand, keep)

    def _load_whole(self, u: _Unit) -> None:
        """Read all of the unit: its first read (with its checksum), and every read of a unit
        whose experts cannot be read alone (coded)."""
        for e in list(u.resident | set(u.tickets)):
            self._evict_expert(u, e)
        self._room(self.rt.sizes[u.index], {(u.index, e) for e in range(u.experts)})
        layout = self.rt.layouts[u.index]
        u.whole = self._submit(layout.without_checksum() if u.verified else layout, u, demand=True)
        self.rt._track_peak()
        self._wait(u.whole)
        u.whole = None
        u.verified = True
        u.resident = set(range(u.experts))

    def _load(self, u: _Unit, experts: list, demand: bool, keep: set) -> None:
        """Start reading `experts` of `u` that are neither resident nor in flight."""
        for e in experts:
            if e in u.resident or e in u.tickets:
                continue
            if not demand and not self._make_room(u.cost, keep):
                break  # a guess never displaces what this call needs
            if demand:
                self._room(u.cost, keep)
            layout = self.rt.layouts[u.index].select(u.ranges[e])
            u.tickets[e] = self._submit(layout, u, demand)
            self.stats["prefetched"] += not demand
        self.rt._track_peak()

    def _wait(self, ticket) -> None:
        if not ticket.is_finished():
            t0 = time.perf_counter()
            self.engine.wait(ticket)
            self.rt.counters.stall_seconds += time.perf_counter() - t0
        else:
            self.engine.wait(ticket)

    # ------------------------------------------------------------ a call

    def run(self, i: int, fn, args, kwargs):
        """Run experts unit `i`'s forward with its routed experts resident."""
        u = self.units[i]
        mod = self.rt.units[i].modules[0]
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
        index = bound.get("top_k_index", args[1] if len(args) > 1 else None)
        impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
        if impl in SPARSE_IMPLEMENTATIONS and isinstance(index, torch.Tensor) and u.selectable:
            needed = sorted(e for e in set(index.flatten().tolist()) if 0 <= e < u.experts)
        else:
            needed = list(range(u.experts))
        s = self.stats
        s["calls"] += 1
        if i == self.order[0] and isinstance(index, torch.Tensor):
            self.tokens += index.shape[0]
        if u.predicted is not None:
            s["predicted"] += len(needed)
            s["predicted_hits"] += len(u.predicted.intersection(needed))
            u.predicted = None
        keep = {(i, e) for e in needed}
        if not u.verified or (not u.selectable and not u.resident.issuperset(needed)):
            s["misses"] += len(needed)
            self._load_whole(u)
        else:
            for e in needed:
                if e in u.resident:
                    s["hits"] += 1
                elif e in u.tickets:
                    s["prefetch_hits"] += 1
                else:
                    s["misses"] += 1
            self._load(u, needed, demand=True, keep=keep)
        hidden = bound.get("hidden_states", args[0] if args else None)
        self._lookahead(i, hidden, keep)
        for e in needed:
            t = u.tickets.pop(e, None)
            if t is not None:
                self._wait(t)
                u.resident.add(e)
        self._count(u, needed)
        return self._compute(i, fn, args, kwargs)

    def _compute(self, i: int, fn, args, kwargs):
        pl = self.rt.placement
        if self.mapped:
            pl.set_bound(i, True)
        else:
            pl.bind(i, self.buffers[i][1])
        pl.snapshot_versions(i)
        try:
            with self.rt.reads.saved_tensor_guard():
                out = fn(*args, **kwargs)
            pl.check_unwritten(i)
        finally:
            if self.mapped:
                pl.set_bound(i, False)
            else:
                pl.unbind(i, self.rt.device)
        return out

    def _count(self, u: _Unit, needed: list) -> None:
        u.calls += 1
        if u.calls % HALF_LIFE == 0:
            u.counts = [c / 2 for c in u.counts]
        for e in needed:
            u.counts[e] += 1
            u.last_used[e] = u.calls

    def _lookahead(self, i: int, hidden, keep: set) -> None:
        """Prefetch the experts the next experts unit's router picks for `hidden`."""
        pos = self.order.index(i)
        if pos + 1 >= len(self.order) or not isinstance(hidden, torch.Tensor):
            return
        nxt = self.units[self.order[pos + 1]]
        if nxt.router is None or not nxt.verified or not nxt.selectable or nxt.top_k <= 0:
            return
        w = nxt.router.weight
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden.reshape(-1, w.shape[1]).to(w.dtype), w)
            picked = torch.topk(logits, min(nxt.top_k, nxt.experts), dim=-1).indices
        guess = sorted(set(picked.flatten().tolist()))
        nxt.predicted = set(guess)
        # A guess may evict what a demand load would, but not this call's experts, nor the
        # next layer's resident ones.
        self._load(nxt, guess, demand=False, keep=keep | {(nxt.index, e) for e in nxt.resident | set(guess)})

    # ------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """Cancel every read and drop every expert (recovery, teardown)."""
        for u in self.units.values():
            if u.whole is not None:
                self.engine.cancel(u.whole)
                try:
                    self.engine.wait(u.whole)
                except Exception:  # noqa: BLE001
                    pass
                u.whole = None
            for e in list(u.resident | set(u.tickets)):
                self._evict_expert(u, e)
            u.predicted = None

    def close(self) -> None:
        self.reset()
        for m, _t in self.buffers.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it
        self.buffers = {}

    def abandon(self) -> list:
        """After fork(): the reads in flight, which the caller keeps alive forever."""
        out = [t for u in self.units.values() for t in u.tickets.values()]
        for u in self.units.values():
            u.tickets = {}
            u.whole = None
        return out

    def statistics(self) -> dict:
        s = self.stats
        demanded = s["hits"] + s["prefetch_hits"] + s["misses"]
        resident = sum(len(u.resident) for u in self.units.values())
        return {
            "units": len(self.units),
            "experts_per_unit": max((u.experts for u in self.units.values()), default=0),
            "expert_bytes": max((u.cost for u in self.units.values()), default=0),
            "resident_experts": resident,
            "share_bytes": self.share,
            "held_bytes": self.held_bytes(),
            "calls": s["calls"],
            "tokens": self.tokens,
            "hits": s["hits"],
            "prefetch_hits": s["prefetch_hits"],
            "misses": s["misses"],
            "prefetched": s["prefetched"],
            "hit_rate": (s["hits"] + s["prefetch_hits"]) / demanded if demanded else 0.0,
            "bytes_read": s["bytes_read"],
            "prediction_hit_rate": s["predicted_hits"] / s["predicted"] if s["predicted"] else 0.0,
        }
