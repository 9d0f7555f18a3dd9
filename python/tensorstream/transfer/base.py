"""The interface every transfer path implements, and the state they share.

A transfer path gets a unit's bytes from the engine to the device that runs the model. It
owns its buffers (slot pool, staging ring, host tier, mapping); the runtime's planner loop
decides what to load and evict and calls:

- ``load(i, demand)``: start getting unit `i`'s bytes;
- ``prefetched(units)``: after the prefetches of one access were submitted;
- ``bind(i)``: wait for unit `i` (``ready(i)``) and bind its parameters to its bytes;
- ``release(i)``: unit `i` has run; its parameters read from the source again;
- ``evict(i)``: drop unit `i`'s bytes (and unbind its parameters where they viewed them);
- ``reset()``: drop every unit and cancel every read, returning all accounting to zero
  (recovery after an exception, teardown);
- ``set_limit(nbytes)``: the units' budget changed under memory pressure;
- ``held_bytes()``, ``private_bytes(held)``, ``describe()``, ``close()``, and ``abandon()``
  after ``fork()``; ``reads_verified``: whether every read is checked against the store's
  checksums; ``slot_storages()``: the buffers a saved tensor must not outlive;
- ``extra_stats()``: the path's own entries of :func:`tensorstream.get_model_statistics`.

A path that can read byte ranges of a unit alone (the slices of a sparse unit, see
:mod:`tensorstream.sparse`) sets ``reads_slices`` and implements, next to the whole-unit
methods: ``load_slices(i, layout, demand)`` (a ticket), ``wait(ticket)``,
``cancel(ticket)``, ``drop_slices(i, ranges, held)``, ``bind_slices(i)`` and
``release_slices(i)``. The buffer a sparse unit's slices land in is the path's, of the
unit's full size, its pages committed only where a slice was read.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..config import MemoryPressureMode
from ..errors import BudgetError
from ..memory import aligned_empty
from ..placement import Placement


@dataclass
class UnitIO:
    """One unit's transfer state."""

    slot: Optional[torch.Tensor] = None
    slot_event: object = None  # CUDA: event after which the slot may be overwritten
    ticket: object = None
    staging: Optional[int] = None  # CUDA: index of the staging buffer holding its read
    ready_event: object = None  # CUDA: event after the copy to the slot
    needs_convert: bool = False


@dataclass
class Context:
    """What a transfer path needs from the runtime."""

    units: list
    layouts: list
    placement: Placement
    source: object
    config: object
    device: torch.device
    unit_budget: int
    engine: object
    counters: object
    planner_used: Callable[[], int]
    fallback: Callable[[str], None]
    fallback_when_run: Optional[str] = None
    """A fallback that counts once a unit computes through this path (a GPU backend asked
    for, the model on the CPU: offloading on the CPU, then ``model.to("cuda")``, is the usual
    order): reported at the first bind, whether the unit runs in the model's forward or by
    itself (``model.model(ids)``, an encoder ``generate()`` runs alone)."""
    sizes: list = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = self.placement.sizes


class Transfer:
    """Base of the transfer paths; see the module docstring for the protocol."""

    kind = ""
    zero_copy = False
    """True when parameters are views that stay valid when the unit is evicted (mmap)."""
    reads_slices = False
    """True when the path reads a sparse unit's slices alone (see the module docstring)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.engine = ctx.engine
        self.io = [UnitIO() for _ in ctx.units]

    def load(self, i: int, demand: bool) -> None:
        raise NotImplementedError

    def prefetched(self, units: list) -> None:
        pass

    def ready(self, i: int) -> Optional[tuple]:
        raise NotImplementedError

    def after_compute(self, i: int) -> None:
        pass

    def computes(self) -> None:
        """A unit is about to compute through this path: report the fallback that counts
        only then (:attr:`Context.fallback_when_run`), once."""
        msg = self.ctx.fallback_when_run
        if msg is not None:
            self.ctx.fallback(msg)  # first: an interrupt here leaves it to the next bind
            self.ctx.fallback_when_run = None

    def bind(self, i: int) -> None:
        """Wait for unit `i` and point its parameters at its bytes."""
        self.computes()
        pl = self.ctx.placement
        args = self.ready(i)
        if args is None:
            pl.set_bound(i, True)
        else:
            pl.bind(i, *args)

    def release(self, i: int) -> None:
        """Unit `i` has run: its parameters read from the source again until the next bind."""
        self.ctx.placement.set_bound(i, False)
        self.after_compute(i)

    def evict(self, i: int) -> None:
        raise NotImplementedError

    def held_bytes(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def set_limit(self, nbytes: int) -> None:
        """The units' budget changed (memory pressure): hold at most `nbytes` of buffers."""

    def extra_stats(self) -> dict:
        """Entries this path adds to the model's statistics (none by default)."""
        return {}

    @property
    def reads_verified(self) -> bool:
        """Whether every read is verified against the store's checksums (else the runtime
        checks that the source's files did not change)."""
        return self.ctx.source.checksummed

    def private_bytes(self, held: int) -> int:
        """Of `held` bytes of units held through this path, those the device's free memory
        does not count as free (a mapping's pages are page cache, which it counts)."""
        return held

    def slot_storages(self) -> dict:
        """Storage address -> (unit, buffer) of every buffer holding a unit's bytes now that
        is reused or refilled with zeros later: a tensor autograd saves in one is read again
        for backward (:meth:`tensorstream.reads.Reads.saved_tensor_guard`)."""
        return {}

    def _unbind_all(self) -> None:
        """After reset: every parameter reads from the source (views of buffers that are gone
        are dropped)."""
        self.ctx.placement.unbind_all(self.ctx.device)

    def reset(self) -> None:
        for i in range(len(self.io)):
            self._cancel(i)
        self.io = [UnitIO() for _ in self.ctx.units]
        self._unbind_all()

    # ------------------------------------------------------------ slices of sparse units

    def load_slices(self, i: int, layout, demand: bool):
        """Start reading `layout` (unit `i`'s layout, or some byte ranges of it) into the
        unit's slice buffer; returns the ticket."""
        raise NotImplementedError

    def drop_slices(self, i: int, ranges: list, held: Callable[[int], bool]) -> None:
        """Give back the pages of byte `ranges` of unit `i`'s slice buffer; `held(page)` says
        whether a page also holds bytes of a slice still held."""
        raise NotImplementedError

    def bind_slices(self, i: int) -> None:
        """Point sparse unit `i`'s parameters at its slice buffer."""
        raise NotImplementedError

    def release_slices(self, i: int) -> None:
        """Sparse unit `i` has run: its parameters read from the source again."""
        self.ctx.placement.set_bound(i, False)

    def wait(self, ticket) -> None:
        """Wait for a read this path started, counting the time a demand waits as a stall."""
        wait_counting(self.engine, ticket, self.ctx.counters)

    def cancel(self, ticket) -> None:
        cancel(self.engine, ticket)

    def close(self) -> None:
        self.reset()

    def abandon(self) -> list:
        """After fork(): forget every read without touching the engine (its workers do not
        exist in the child). Returns the tickets, which the caller must keep alive forever."""
        tickets = [st.ticket for st in self.io if st.ticket is not None]
        self.io = [UnitIO() for _ in self.ctx.units]
        return tickets

    def _wait(self, i: int) -> None:
        """Wait for unit `i`'s read, counting the time a demand waits as a stall."""
        wait_counting(self.engine, self.io[i].ticket, self.ctx.counters)
        self.io[i].ticket = None

    def _cancel(self, i: int) -> None:
        st = self.io[i]
        if st.ticket is not None:
            cancel(self.engine, st.ticket)
        st.ticket = None


def wait_counting(engine, ticket, counters) -> None:
    """Wait for `ticket`, counting the time spent waiting as a stall."""
    if ticket.is_finished():
        engine.wait(ticket)
        return
    t0 = time.perf_counter()
    engine.wait(ticket)
    counters.stall_seconds += time.perf_counter() - t0


def cancel(engine, ticket) -> None:
    """Cancel `ticket` and wait until no worker touches its buffer."""
    engine.cancel(ticket)
    try:
        engine.wait(ticket)
    except Exception:  # noqa: BLE001 - a cancelled or failed read is dropped either way
        pass


class SlotPool:
    """Buffers for units, reused by size. Tracks every byte it has allocated, idle or not,
    and never holds more than `limit`."""

    def __init__(self, device: torch.device, limit: int):
        self.device = device
        self.limit = limit
        self.idle: dict = defaultdict(list)
        self.allocated = 0
        self.peak = 0

    def take(self, nbytes: int) -> tuple:
        """A buffer of `nbytes` and the event after which it may be overwritten (or None)."""
        free = self.idle.get(nbytes)
        if free:
            return free.pop()
        while self.allocated + nbytes > self.limit and any(self.idle.values()):
            for size, lst in self.idle.items():
                if lst:
                    lst.pop()
                    self.allocated -= size
                    break
        if self.allocated + nbytes > self.limit:
            raise BudgetError(
                f"slot pool: {self.allocated} + {nbytes} bytes would exceed the {self.limit}-byte budget"
            )
        if self.device.type == "cpu":
            buf = aligned_empty(nbytes)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        return buf, None

    def give(self, buf: torch.Tensor, ready_event=None) -> None:
        self.idle[buf.numel()].append((buf, ready_event))

    def free(self, buf: torch.Tensor) -> None:
        """Release a buffer's memory instead of keeping it for reuse."""
        self.allocated -= buf.numel()

    def clear(self) -> None:
        self.idle.clear()
        self.allocated = 0

    def set_limit(self, limit: int) -> None:
        """Hold at most `limit` bytes from now on, freeing idle buffers until it does."""
        self.limit = limit
        for size, lst in self.idle.items():
            while lst and self.allocated > limit:
                lst.pop()
                self.allocated -= size


class PooledTransfer(Transfer):
    """A path whose units live in budgeted slots from a SlotPool (pread, CUDA)."""

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.pool = SlotPool(ctx.device, ctx.unit_budget)

    def _take_slot(self, i: int) -> torch.Tensor:
        st = self.io[i]
        st.slot, st.slot_event = self.pool.take(self.ctx.sizes[i])
        st.needs_convert = self.ctx.placement.converts[i]
        return st.slot

    def _bind_args(self, i: int) -> tuple:
        st = self.io[i]
        convert, st.needs_convert = st.needs_convert, False
        return st.slot, 0, convert

    def evict(self, i: int) -> None:
        self.ctx.placement.unbind(i, self.ctx.device)
        self._cancel(i)
        st = self.io[i]
        if st.slot is not None:
            if self.ctx.config.memory_pressure_mode == MemoryPressureMode.CONSERVATIVE:
                self.pool.free(st.slot)  # give the memory back, not just the slot
            else:
                self.pool.give(st.slot, st.slot_event)
        self.io[i] = UnitIO()

    def held_bytes(self) -> int:
        return self.pool.allocated

    def set_limit(self, nbytes: int) -> None:
        self.pool.set_limit(nbytes)

    def reset(self) -> None:
        super().reset()
        self.pool.clear()

    def slot_storages(self) -> dict:
        """Storage address -> (unit, slot) of every slot holding a unit now (for saved-tensor
        hooks: a tensor autograd saves that lives in a slot must not see the slot reused)."""
        out = {}
        for i, st in enumerate(self.io):
            if st.slot is not None:
                out[st.slot.untyped_storage().data_ptr()] = (i, st.slot)
        return out
