"""Sparse units: units read slice by slice, only the slices their forward's input names.

- **Experts.** transformers' mixture-of-experts families keep a layer's experts in one module
  whose parameters are fused ``[num_experts, ...]`` tensors, called as ``experts(hidden_states,
  top_k_index, top_k_weights)`` after the router ran (:func:`is_experts`). By default such a
  module is a unit of its own (:func:`tensorstream.units.analyse`). A slice is an expert: the
  ``e``-th slice of each fused tensor, contiguous in the store.
- **Rows.** An embedding (:func:`is_rows`) reads one row per token. A slice is a block of
  rows (about ``ROW_BLOCK`` bytes). With ``Config(sparse_embeddings=True)`` an untied input
  embedding streams this way on the CPU (:func:`tensorstream.budget.streamed_subset`), so its
  budget goes to the layers; a head is dense and a tied embedding stays as it was.

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
import math
import mmap
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .config import MemoryPressureMode
from .errors import BudgetError
from .transfer.base import cancel, wait_counting

PAGE = 4096
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
HALF_LIFE = 64
"""Calls of a unit after which its slices' use counts are halved."""
ROW_BLOCK = 64 << 10
"""Bytes of an embedding's slice (whole rows, a multiple of a page where the rows allow)."""
ROWS_HELD = 64
"""Slices of an embedding the cache's share asks for where the budget has room (it works
with one)."""
INDEX_ARGUMENTS = ("top_k_index", "router_indices")
"""The names transformers' experts forwards give the routed experts (GPT-OSS: router_indices)."""
SPARSE_IMPLEMENTATIONS = frozenset((None, "eager", "grouped_mm", "batched_mm"))
"""transformers' experts implementations that read only the routed experts' slices."""


def is_experts(module: nn.Module) -> bool:
    """True for a module of fused experts called after routing: an int ``num_experts``,
    parameters that are all ``[num_experts, ...]`` tensors, no children holding parameters,
    and a forward taking the routed experts (``top_k_index``, GPT-OSS's ``router_indices``)."""
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
    return any(name in sig.parameters for name in INDEX_ARGUMENTS)


def is_rows(spec) -> bool:
    """True for a unit that is one embedding, read a row per token: an ``nn.Embedding``
    streaming only its own 2-D weight, without ``max_norm`` (which writes the rows)."""
    if len(spec.modules) != 1 or len(spec.params) != 1:
        return False
    m = spec.modules[0]
    p = spec.params[0]
    return isinstance(m, nn.Embedding) and m.max_norm is None and p.attr == "weight" and len(p.shape) == 2


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


def streams_sparse(device: torch.device) -> bool:
    """Whether sparse units stream slice by slice on `device` (the CPU paths)."""
    return device.type == "cpu"


def kind_of(spec, rows: bool) -> Optional[str]:
    """ "experts", "rows" (embeddings stream sparse only if `rows`) or None (a dense unit)."""
    if len(spec.modules) == 1 and is_experts(spec.modules[0]):
        return "experts"
    return "rows" if rows and is_rows(spec) else None


def _row_block(row_bytes: int) -> int:
    """Rows per slice: about ROW_BLOCK bytes, whole pages where the rows allow."""
    per_page = PAGE // math.gcd(row_bytes, PAGE)  # rows that fill whole pages
    rows = max(ROW_BLOCK // row_bytes, 1)
    return max(rows // per_page, 1) * per_page if rows >= per_page else rows


def slicing(spec) -> tuple:
    """(slices, rows per slice or None) of a sparse unit."""
    if kind_of(spec, rows=False) == "experts":
        return spec.modules[0].num_experts, None
    rows, width = spec.params[0].shape
    row_bytes = width * spec.params[0].get().element_size()
    per = _row_block(row_bytes)
    return -(-rows // per), per


def share_bounds(units: list, sizes: list, rows: bool) -> tuple:
    """(the least share of the budget the sparse cache works with, the share it asks for
    where the budget has room) for these units: the largest experts unit (a prefill may
    route to every expert) and an embedding's slice; the share asked for holds `ROWS_HELD`
    of an embedding's slices."""
    least = wanted = 0
    for u, size in zip(units, sizes):
        kind = kind_of(u, rows)
        if kind == "experts":
            least, wanted = max(least, size), max(wanted, size)
        elif kind == "rows":
            n, _per = slicing(u)
            block = min(size, size // n + 2 * PAGE)  # a slice, with the pages it may straddle
            least, wanted = max(least, block), max(wanted, min(size, ROWS_HELD * block))
    return least, wanted


def sparse_units(units: list, rows: bool) -> list:
    """Positions of the sparse units in `units`."""
    return [i for i, u in enumerate(units) if kind_of(u, rows)]


def _span(offset: int, nbytes: int) -> tuple:
    """The pages a byte range touches: (first page's offset, bytes to its last page's end)."""
    lo = offset // PAGE * PAGE
    hi = (offset + nbytes + PAGE - 1) // PAGE * PAGE
    return lo, hi - lo


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
    kind: str
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


class SparseCache:
    """The slices of every sparse unit, held within `share` bytes of the budget."""

    def __init__(self, rt, share: int):
        self.rt = rt
        self.share = share
        self.engine = rt.engine
        self.mapped = rt.transfer.zero_copy  # mmap: the store's mapping; pread: anonymous buffers
        self.units: dict = {}
        self.buffers: dict = {}
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
            for kind in ("experts", "rows")
        }
        self.rows = rt.config.sparse_embeddings
        self.conservative = rt.config.memory_pressure_mode == MemoryPressureMode.CONSERVATIVE
        self._parents = {id(c): m for m in rt.model.modules() for c in m.children()}
        self._streamed = {id(p.get()) for u in rt.units for p in u.params}
        for i in sparse_units(rt.units, self.rows):
            self.units[i] = self._unit(rt.units[i])
            if not self.mapped:
                # Private: MADV_DONTNEED frees its pages (a shared anonymous mapping is shmem,
                # whose pages outlive it and stay in RAM).
                m = mmap.mmap(-1, rt.sizes[i], flags=mmap.MAP_PRIVATE)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.buffers[i] = (m, torch.frombuffer(m, dtype=torch.uint8))
        self.order = [i for i, u in self.units.items() if u.kind == "experts"]
        need = share_bounds(rt.units, rt.sizes, self.rows)[0]
        if share < need:
            raise BudgetError(
                f"the sparse units' share of the budget ({share} bytes) is below their minimum ({need})"
            )

    def _unit(self, spec) -> _Unit:
        rt = self.rt
        i = spec.index
        kind = kind_of(spec, self.rows)
        n, per = slicing(spec)
        ranges = [[] for _ in range(n)]
        for slot in rt.placement.slots[i]:
            if kind == "experts":
                step = slot.part.nbytes // n
                for e in range(n):
                    ranges[e].append((slot.part.offset + e * step, step))
            else:
                row = slot.part.nbytes // spec.params[0].shape[0]
                for s in range(n):
                    lo = s * per * row
                    ranges[s].append((slot.part.offset + lo, min(per * row, slot.part.nbytes - lo)))
        u = _Unit(
            index=i,
            kind=kind,
            slices=n,
            ranges=ranges,
            cost=max(sum(_span(o, b)[1] for o, b in r) for r in ranges),
            size=rt.sizes[i],
            # A parameter built in another dtype in the buffer's tail is converted whole.
            selectable=_selectable(rt.layouts[i], ranges) and not rt.placement.converts[i],
            per=per,
            counts=[0.0] * n,
            last_used=[0] * n,
        )
        if kind == "experts":
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
            cancel(self.engine, t)
        u.resident.discard(s)
        self._drop_pages(u, u.ranges[s])

    def storages(self) -> dict:
        """Storage address -> (unit, buffer) of the anonymous buffers (see
        :meth:`tensorstream.reads.Reads.saved_tensor_guard`); none on the mmap path, whose
        views stay valid."""
        return {buf.untyped_storage().data_ptr(): (i, buf) for i, (_m, buf) in self.buffers.items()}

    def _drop_pages(self, u: _Unit, ranges: list) -> None:
        """Give a slice's pages back. A mapping of the store refaults a dropped page with its
        content, so all its pages go. An anonymous buffer refaults zeros, so a page the slice
        shares with a slice still held stays (that slice's cost counts it)."""
        if self.mapped:
            tr = self.rt.transfer
            base = tr.offsets[u.index]
            for o, b in ranges:
                lo, n = _span(base + o, b)
                tr.map.madvise(MADV_DONTNEED, lo, n)
            return
        m = self.buffers[u.index][0]
        for o, b in ranges:
            lo, n = _span(o, b)
            hi = lo + n
            if lo < o and self._page_held(u, lo):
                lo += PAGE
            if hi > o + b and hi - PAGE >= lo and self._page_held(u, hi - PAGE):
                hi -= PAGE
            if hi > lo:
                m.madvise(MADV_DONTNEED, lo, hi - lo)

    def _page_held(self, u: _Unit, page: int) -> bool:
        """Whether a slice of `u` held now (resident or in flight) has bytes in the page at
        `page` of its buffer, in any of its tensors."""
        held = (*u.resident, *u.tickets)
        for o, b in ((r[t][0], r[t][1]) for r in u.ranges[:1] for t in range(len(r))):
            # Slice k of this tensor starts at o + k * b (the rows' last slice is shorter).
            first, last = (page - o) // b, (page + PAGE - 1 - o) // b
            if any(first <= k <= last for k in held):
                return True
        return False

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

    def _ptr(self, u: _Unit) -> tuple:
        """(address of the unit's buffer, the object keeping it alive)."""
        if self.mapped:
            tr = self.rt.transfer
            return tr.base.data_ptr() + tr.offsets[u.index], tr.base
        buf = self.buffers[u.index][1]
        return buf.data_ptr(), buf

    def _submit(self, layout, u: _Unit, demand: bool):
        ptr, keep = self._ptr(u)
        self.stats[u.kind]["bytes_read"] += layout.bytes_to_read
        if self.mapped:
            return self.engine.submit_populate(layout, ptr, demand, keep)
        return self.engine.submit(layout, ptr, u.size, demand, keep)

    def _load_whole(self, u: _Unit) -> None:
        """Read all of the unit: an experts unit's first read (with its checksum), and every
        read of a unit whose slices cannot be read alone (coded)."""
        for s in (*u.resident, *u.tickets):
            self._evict(u, s)
        self._room(u.size, {(u.index, s) for s in range(u.slices)})
        layout = self.rt.layouts[u.index]
        u.whole = self._submit(layout.without_checksum() if u.verified else layout, u, demand=True)
        self.rt._track_peak()
        self._wait(u.whole)
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
            u.tickets[s] = self._submit(self.rt.layouts[u.index].select(u.ranges[s]), u, demand)
            self.stats[u.kind]["prefetched"] += not demand
        self.rt._track_peak()

    def _wait(self, ticket) -> None:
        wait_counting(self.engine, ticket, self.rt.counters)

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
                self._wait(t)
                u.resident.add(s)
        u.calls += 1
        if u.calls % HALF_LIFE == 0:
            u.counts = [c / 2 for c in u.counts]
        for s in needed:
            u.counts[s] += 1
            u.last_used[s] = u.calls

    # ------------------------------------------------------------ a call

    def run(self, i: int, fn, args, kwargs):
        """Run sparse unit `i`'s forward with the slices its input names resident."""
        u = self.units[i]
        bound = inspect.signature(fn).bind(*args, **kwargs).arguments
        if u.kind == "rows":
            return self._run_rows(u, fn, args, kwargs, next(iter(bound.values())))
        mod = self.rt.units[i].modules[0]
        index = next((bound[n] for n in INDEX_ARGUMENTS if n in bound), None)
        impl = getattr(getattr(mod, "config", None), "_experts_implementation", None)
        if impl in SPARSE_IMPLEMENTATIONS and isinstance(index, torch.Tensor) and u.selectable:
            needed = sorted(e for e in set(index.flatten().tolist()) if 0 <= e < u.slices)
        else:
            needed = list(range(u.slices))
        self._fetch(u, needed, bound.get("hidden_states"))
        return self._compute(u, fn, args, kwargs)

    def _run_rows(self, u: _Unit, fn, args, kwargs, ids):
        """An embedding: fetch its tokens' row blocks and look them up; where they do not all
        fit the share, in parts (a lookup is exact per row, so parts give the same values)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point:
            self._fetch(u, list(range(u.slices)))  # not token ids: let the module see everything
            return self._compute(u, fn, args, kwargs)
        blocks = torch.div(ids.flatten(), u.per, rounding_mode="floor")
        needed = sorted(b for b in set(blocks.tolist()) if 0 <= b < u.slices)
        cap = max(self.share // u.cost, 1)
        if len(needed) <= cap or not u.selectable:
            self._fetch(u, needed)
            return self._compute(u, fn, args, kwargs)
        flat, out = ids.flatten(), None
        rows = self.rt.units[u.index].params[0].shape[0]
        bad = (flat < 0) | (flat >= rows)
        if bad.any():  # in no part: the module's own lookup refuses them (IndexError)
            self._compute(u, fn, (flat[bad],), {})
            raise IndexError(f"{self.rt.units[u.index].name}: token ids outside the {rows} rows")
        for k in range(0, len(needed), cap):
            part = needed[k : k + cap]
            mask = torch.isin(blocks, torch.tensor(part, dtype=blocks.dtype))
            self._fetch(u, part)
            values = self._compute(u, fn, (flat[mask],), {})
            if out is None:
                out = values.new_empty((flat.numel(), *values.shape[1:]))
            out[mask] = values
        return out.view(*ids.shape, *out.shape[1:])

    def _compute(self, u: _Unit, fn, args, kwargs):
        pl = self.rt.placement
        i = u.index
        if self.mapped:
            pl.set_bound(i, True)
        else:
            pl.bind(i, self.buffers[i][1], 0, pl.converts[i])
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
                cancel(self.engine, u.whole)
                u.whole = None
            for s in (*u.resident, *u.tickets):
                self._evict(u, s)
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
        out = [t for u in self.units.values() for t in (*u.tickets.values(), u.whole) if t is not None]
        for u in self.units.values():
            u.tickets = {}
            u.whole = None
        return out

    def statistics(self, kind: str) -> Optional[dict]:
        """The entries of ``get_model_statistics()[kind]`` ("experts" or "embedding")."""
        kind = "rows" if kind == "embedding" else kind
        units = [u for u in self.units.values() if u.kind == kind]
        if not units:
            return None
        s = self.stats[kind]
        demanded = s["hits"] + s["prefetch_hits"] + s["misses"]
        out = {
            "units": len(units),
            "slices_per_unit": max(u.slices for u in units),
            "slice_bytes": max(u.cost for u in units),
            "resident_slices": sum(len(u.resident) for u in units),
            "held_bytes": sum(u.held for u in units),
            "share_bytes": self.share,
            "calls": s["calls"],
            "hits": s["hits"],
            "prefetch_hits": s["prefetch_hits"],
            "misses": s["misses"],
            "hit_rate": (s["hits"] + s["prefetch_hits"]) / demanded if demanded else 0.0,
            "bytes_read": s["bytes_read"],
        }
        if kind == "experts":
            out["prefetched"] = s["prefetched"]
            out["prediction_hit_rate"] = s["hit_pred"] / s["predicted"] if s["predicted"] else 0.0
        return out
