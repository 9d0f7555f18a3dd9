"""Sparse units' residency: which slices of the sparse units stay (see
:mod:`tensorstream.sparse_kinds` for what a sparse unit and a slice are). The transfer path
reads and drops the slices (``Transfer.load_slices``, ``drop_slices``); the runtime binds and
runs the unit (``Runtime._compute``), as for a whole unit.

Reading a slice is one request per tensor (``Layout.select``). On the CPU paths a sparse
unit's parameters are views of one buffer of the unit's full size whose pages are committed
only where a slice was read: an anonymous mapping (pread) or the store's own mapping (mmap).
transformers' eager, ``grouped_mm`` and ``batched_mm`` experts implementations read only
the slices of the experts in ``top_k_index``, and an embedding only its tokens' rows, so
the slices not read are never touched; another experts implementation gets every expert of
its layer. On CUDA sparse units stream whole through the planner.

Residency (:class:`SparseCache`): the slices a token needs do not repeat in an order the
planner could learn, so the planner's rule (evict what is needed furthest ahead) does not
apply. The cache keeps the slices used most often, counted per call and halved every
``HALF_LIFE`` calls of their unit so that the counts follow a drift; ties go to the slice used
last. A layer's routed experts are all resident while it computes (splitting the computation
would change the order of its sums), so the cache's share of the budget is at least the
largest experts unit: a prefill may route to every expert. An embedding's lookup is exact per
row, so a call whose rows do not fit is computed in parts. The first call of an experts unit
reads it whole with its checksum (verified once, as a mapping is); later reads are of single
slices, which checksums (over whole units) do not cover.

Lookahead: while layer ``l``'s experts are fetched, layer ``l+1``'s router (resident) is
applied to layer ``l``'s expert input and the experts it picks are prefetched. A wrong guess
costs bandwidth only: demand loads decide what is computed.
"""

from __future__ import annotations

import heapq
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .config import MemoryPressureMode
from .consts import PAGE
from .errors import BudgetError
from .sparse_kinds import (
    INDEX_ARGUMENTS,
    SPARSE_IMPLEMENTATIONS,
    SparseKind,
    kind_of,
    page_span,
    router_of,
    share_bounds,
    slice_ranges,
    slicing,
    sparse_units,
)

HALF_LIFE = 64
"""Calls of a unit after which its slices' use counts are halved."""


def _selectable(layout, ranges: list) -> bool:
    """Whether each slice can be read alone: its bytes are stored raw."""
    try:
        for r in ranges:
            layout.select(r)
    except ValueError:
        return False
    return True


@dataclass
class _Unit:
    """One sparse unit's state in the cache."""

    index: int
    kind: SparseKind
    slices: int
    ranges: list  # per slice: [(offset, nbytes)] of its bytes in each tensor
    cost: int  # bytes one slice holds: the pages it touches
    size: int
    selectable: bool  # stored raw: a single slice can be read
    per: Optional[int] = None  # rows: rows per slice
    router: Optional[nn.Module] = None  # experts: the resident router, for lookahead
    top_k: int = 0
    resident: set = field(default_factory=set)
    tickets: dict = field(default_factory=dict)  # slice -> read in flight
    whole: object = None  # the unit's whole read in flight
    counts: list = field(default_factory=list)
    last_used: list = field(default_factory=list)
    calls: int = 0
    verified: bool = False
    predicted: Optional[set] = None

    @property
    def held(self) -> int:
        if self.whole is not None:
            return self.size
        return min(self.size, self.cost * (len(self.resident) + len(self.tickets)))

    def page_held(self, page: int) -> bool:
        """Whether a slice held now (resident or in flight) has bytes in the page at `page`
        of the unit's buffer, in any of its tensors."""
        held = (*self.resident, *self.tickets)
        for o, b in ((r[t][0], r[t][1]) for r in self.ranges[:1] for t in range(len(r))):
            # Slice k of this tensor starts at o + k * b (the rows' last slice is shorter).
            first, last = (page - o) // b, (page + PAGE - 1 - o) // b
            if any(first <= k <= last for k in held):
                return True
        return False


class SparseCache:
    """The slices of every sparse unit, held within `share` bytes of the budget, read and
    dropped through `transfer` (a path that ``reads_slices``). `track_peak` is called after
    reads were started (the runtime's peak of bytes held)."""

    def __init__(
        self, model: nn.Module, units: list, layouts: list, transfer, config, share: int, track_peak
    ):
        self.units_spec = units
        self.layouts = layouts
        self.placement = transfer.ctx.placement
        self.transfer = transfer
        self.share = share
        self.track_peak: Callable[[], None] = track_peak
        self.units: dict = {}
        self.stats = {
            kind: dict(
                calls=0,
                hits=0,
                prefetch_hits=0,
                misses=0,
                prefetched=0,
                bytes_read=0,
                predicted=0,
                hit_pred=0,
            )
            for kind in SparseKind
        }
        self.rows = config.sparse_embeddings
        self.conservative = config.memory_pressure_mode == MemoryPressureMode.CONSERVATIVE
        self._parents = {id(c): m for m in model.modules() for c in m.children()}
        self._streamed = {id(p.get()) for u in units for p in u.params}
        sizes = self.placement.sizes
        for i in sparse_units(units, self.rows):
            self.units[i] = self._unit(units[i], sizes[i])
        self.order = [i for i, u in self.units.items() if u.kind is SparseKind.EXPERTS]
        need = share_bounds(units, sizes, self.rows)[0]
        if share < need:
            raise BudgetError(
                f"the sparse units' share of the budget ({share} bytes) is below their minimum ({need})"
            )

    def _unit(self, spec, size: int) -> _Unit:
        i = spec.index
        kind = kind_of(spec, self.rows)
        n, per = slicing(spec)
        ranges = slice_ranges(kind, spec, self.placement.slots[i], n, per)
        u = _Unit(
            index=i,
            kind=kind,
            slices=n,
            ranges=ranges,
            cost=max(sum(page_span(o, b)[1] for o, b in r) for r in ranges),
            size=size,
            # A parameter built in another dtype in the buffer's tail is converted whole.
            selectable=_selectable(self.layouts[i], ranges) and not self.placement.converts[i],
            per=per,
            counts=[0.0] * n,
            last_used=[0] * n,
        )
        if kind is SparseKind.EXPERTS:
            mod = spec.modules[0]
            u.router = self._router(mod)
            u.top_k = int(
                getattr(u.router, "top_k", 0)
                or getattr(getattr(mod, "config", None), "num_experts_per_tok", 0)
                or 0
            )
        else:
            u.verified = u.selectable  # rows are never read whole unless they must be
        return u

    def _router(self, experts: nn.Module) -> Optional[nn.Module]:
        """The resident router beside `experts` (None when it streams: it cannot predict)."""
        parent = self._parents.get(id(experts))
        r = router_of(parent, experts) if parent is not None else None
        if r is None or any(id(p) in self._streamed for p in r.parameters()):
            return None
        return r

    # ------------------------------------------------------------ accounting

    def held_bytes(self) -> int:
        """Bytes of slices held now, resident or in flight."""
        return sum(u.held for u in self.units.values())

    def _evict(self, u: _Unit, s: int) -> None:
        t = u.tickets.pop(s, None)
        if t is not None:
            self.transfer.cancel(t)
        u.resident.discard(s)
        self.transfer.drop_slices(u.index, u.ranges[s], u.page_held)

    def _make_room(self, nbytes: int, keep: set, below: float = float("inf")) -> bool:
        """Evict the slices used least (ties: used longest ago), never one in `keep`
        ((unit, slice) pairs) nor one counted `below` or more, until `nbytes` more fit in the
        share; False if they cannot."""
        held = self.held_bytes()
        if held + nbytes <= self.share:
            return True
        victims = [
            (u.counts[s], u.last_used[s], u.index, s)
            for u in self.units.values()
            for s in (*u.resident, *u.tickets)
            if (u.index, s) not in keep and u.counts[s] < below
        ]
        heapq.heapify(victims)
        while held + nbytes > self.share:
            if not victims:
                return False
            _c, _l, i, s = heapq.heappop(victims)
            u = self.units[i]
            before = u.held
            self._evict(u, s)
            held -= before - u.held
        return True

    def _room(self, nbytes: int, keep: set) -> None:
        if not self._make_room(nbytes, keep):
            raise BudgetError(
                f"the sparse units' share of the budget ({self.share} bytes) cannot hold {nbytes} more bytes beside "
                f"the {len(keep)} slices this call needs; raise vram_budget_gb"
            )

    # ------------------------------------------------------------ loading

    def _submit(self, layout, u: _Unit, demand: bool):
        self.stats[u.kind]["bytes_read"] += layout.bytes_to_read
        return self.transfer.load_slices(u.index, layout, demand)

    def _load_whole(self, u: _Unit) -> None:
        """Read all of the unit: an experts unit's first read (with its checksum), and every
        read of a unit whose slices cannot be read alone (coded)."""
        for s in (*u.resident, *u.tickets):
            self._evict(u, s)
        self._room(u.size, {(u.index, s) for s in range(u.slices)})
        layout = self.layouts[u.index]
        u.whole = self._submit(layout.without_checksum() if u.verified else layout, u, demand=True)
        self.track_peak()
        self.transfer.wait(u.whole)
        u.whole = None
        u.verified = True
        u.resident = set(range(u.slices))

    def _load(self, u: _Unit, slices: list, demand: bool, keep: set) -> None:
        """Start reading `slices` of `u` that are neither resident nor in flight. A demand load
        evicts what it must (never a slice in `keep`). A prefetch only evicts slices used less
        often than the one it reads, so that a guess never displaces what routing keeps asking
        for."""
        for s in slices:
            if s in u.resident or s in u.tickets:
                continue
            if demand:
                self._room(u.cost, keep)
            elif not self._make_room(u.cost, keep, below=u.counts[s]):
                continue
            u.tickets[s] = self._submit(self.layouts[u.index].select(u.ranges[s]), u, demand)
            self.stats[u.kind]["prefetched"] += not demand
        self.track_peak()

    def _fetch(self, u: _Unit, needed: list, hidden=None) -> None:
        """Make `needed` slices of `u` resident (and start the lookahead meanwhile)."""
        st = self.stats[u.kind]
        st["calls"] += 1
        if u.predicted is not None:
            st["predicted"] += len(needed)
            st["hit_pred"] += len(u.predicted.intersection(needed))
            u.predicted = None
        keep = {(u.index, s) for s in needed}
        if not u.verified or (not u.selectable and not u.resident.issuperset(needed)):
            st["misses"] += len(needed)
            self._load_whole(u)
        else:
            for s in needed:
                if s in u.resident:
                    st["hits"] += 1
                elif s in u.tickets:
                    st["prefetch_hits"] += 1
                else:
                    st["misses"] += 1
            self._load(u, needed, demand=True, keep=keep)
        if hidden is not None:
            self._lookahead(u, hidden, keep)
        for s in needed:
            t = u.tickets.pop(s, None)
            if t is not None:
                self.transfer.wait(t)
                u.resident.add(s)
        u.calls += 1
        if u.calls % HALF_LIFE == 0:
            u.counts = [c / 2 for c in u.counts]
        for s in needed:
            u.counts[s] += 1
            u.last_used[s] = u.calls

    # ------------------------------------------------------------ a call

    def run(self, i: int, fn, args, kwargs, compute: Callable):
        """Run sparse unit `i`'s forward with the slices its input names resident;
        ``compute(i, fn, args, kwargs)`` binds the unit and runs it (the runtime's)."""
        u = self.units[i]
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
        if u.kind is SparseKind.ROWS:
            return self._run_rows(u, fn, args, kwargs, next(iter(bound.values())), compute)
        mod = self.units_spec[i].modules[0]
        index = next((bound[n] for n in INDEX_ARGUMENTS if n in bound), None)
        impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
        if impl in SPARSE_IMPLEMENTATIONS and isinstance(index, torch.Tensor) and u.selectable:
            needed = sorted(e for e in set(index.flatten().tolist()) if 0 <= e < u.slices)
        else:
            needed = list(range(u.slices))
        self._fetch(u, needed, bound.get("hidden_states"))
        return self._compute(u, compute, fn, args, kwargs)

    def _run_rows(self, u: _Unit, fn, args, kwargs, ids, compute: Callable):
        """An embedding: fetch its tokens' row blocks and look them up; where they do not all
        fit the share, in parts (a lookup is exact per row, so parts give the same values)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point:
            self._fetch(u, list(range(u.slices)))  # not token ids: let the module see everything
            return self._compute(u, compute, fn, args, kwargs)
        blocks = torch.div(ids.flatten(), u.per, rounding_mode="floor")
        needed = sorted(b for b in set(blocks.tolist()) if 0 <= b < u.slices)
        cap = max(self.share // u.cost, 1)
        if len(needed) <= cap or not u.selectable:
            self._fetch(u, needed)
            return self._compute(u, compute, fn, args, kwargs)
        flat, out = ids.flatten(), None
        rows = self.units_spec[u.index].params[0].shape[0]
        bad = (flat < 0) | (flat >= rows)
        if bad.any():  # in no part: the module's own lookup refuses them (IndexError)
            self._compute(u, compute, fn, (flat[bad],), {})
            raise IndexError(f"{self.units_spec[u.index].name}: token ids outside the {rows} rows")
        for k in range(0, len(needed), cap):
            part = needed[k : k + cap]
            mask = torch.isin(blocks, torch.tensor(part, dtype=blocks.dtype))
            self._fetch(u, part)
            values = self._compute(u, compute, fn, (flat[mask],), {})
            if out is None:
                out = values.new_empty((flat.numel(), *values.shape[1:]))
            out[mask] = values
        return out.view(*ids.shape, *out.shape[1:])

    def _compute(self, u: _Unit, compute: Callable, fn, args, kwargs):
        out = compute(u.index, fn, args, kwargs)
        if self.conservative:  # CONSERVATIVE gives memory back as soon as a unit has run
            for s in (*u.resident, *u.tickets):
                self._evict(u, s)
        return out

    def _lookahead(self, u: _Unit, hidden, keep: set) -> None:
        """Prefetch the experts the next experts unit's router picks for `hidden`."""
        pos = self.order.index(u.index)
        if pos + 1 >= len(self.order) or not isinstance(hidden, torch.Tensor):
            return
        nxt = self.units[self.order[pos + 1]]
        if nxt.router is None or not nxt.verified or not nxt.selectable or nxt.top_k <= 0:
            return
        w = nxt.router.weight
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden.reshape(-1, w.shape[1]).to(w.dtype), w)
            picked = torch.topk(logits, min(nxt.top_k, nxt.slices), dim=-1).indices
        guess = sorted(set(picked.flatten().tolist()))
        nxt.predicted = set(guess)
        # A guess never evicts this call's experts, nor the next layer's resident ones.
        self._load(nxt, guess, demand=False, keep=keep | {(nxt.index, e) for e in (*nxt.resident, *guess)})

    # ------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """Cancel every read and drop every slice (recovery, teardown)."""
        for u in self.units.values():
            if u.whole is not None:
                self.transfer.cancel(u.whole)
                u.whole = None
            for s in (*u.resident, *u.tickets):
                self._evict(u, s)
            u.predicted = None

    def close(self) -> None:
        self.reset()

    def abandon(self) -> list:
        """After fork(): the reads in flight, which the caller keeps alive forever."""
        out = [t for u in self.units.values() for t in (*u.tickets.values(), u.whole) if t is not None]
        for u in self.units.values():
            u.tickets = {}
            u.whole = None
        return out


def statistics(cache: SparseCache, kind: SparseKind) -> Optional[dict]:
    """The entries of ``get_model_statistics()[kind.value]`` for `cache`'s units of `kind`."""
    units = [u for u in cache.units.values() if u.kind is kind]
    if not units:
        return None
    s = cache.stats[kind]
    demanded = s["hits"] + s["prefetch_hits"] + s["misses"]
    out = {
        "units": len(units),
        "slices_per_unit": max(u.slices for u in units),
        "slice_bytes": max(u.cost for u in units),
        "resident_slices": sum(len(u.resident) for u in units),
        "held_bytes": sum(u.held for u in units),
        "share_bytes": cache.share,
        "calls": s["calls"],
        "hits": s["hits"],
        "prefetch_hits": s["prefetch_hits"],
        "misses": s["misses"],
        "hit_rate": (s["hits"] + s["prefetch_hits"]) / demanded if demanded else 0.0,
        "bytes_read": s["bytes_read"],
    }
    if kind is SparseKind.EXPERTS:
        out["prefetched"] = s["prefetched"]
        out["prediction_hit_rate"] = s["hit_pred"] / s["predicted"] if s["predicted"] else 0.0
    return out
