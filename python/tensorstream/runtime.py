"""The streaming runtime: the planner loop that makes each unit's weights resident just
before it runs, and the recovery that keeps the model consistent when anything raises.

One :class:`Runtime` per offloaded model (``model._tensorstream``). It owns the planner,
the engines, the placement of parameters and one transfer path (:mod:`.transfer`); the
module layer (:mod:`.module`) calls :meth:`Runtime.run_pass` around the model's forward and
:meth:`Runtime.run_unit` around each unit's. Both hold the model's lock, so threads take
turns one pass at a time, and both reset every transfer and the planner on any exception
(``KeyboardInterrupt`` included), so the next call starts clean.

Beside it: the live runtimes (:mod:`.registry`), the response to memory pressure and the
out-of-memory retry (:mod:`.pressure_response`, :mod:`.oom`), and copies, pickling and
fork (:mod:`.copies`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from typing import Optional

import torch
from torch import nn

from . import budget, configure, copies, oom, pressure, pressure_response, registry
from .errors import TensorStreamError
from .placement import Placement
from .reads import Reads
from .speculative import Speculation, draft_of
from .stats import Counters, statistics
from .units import UnitSpec

log = logging.getLogger("tensorstream")


class Runtime:
    """Per-model streaming state, attached to the model as ``model._tensorstream``."""

    # Set by configure() (a deep copy not yet resolved has only these defaults).
    transfer = None
    planner = None
    engine = None
    sparse = None  # the SparseCache of the units streamed slice by slice (CPU paths)
    budget_plan: Optional[budget.BudgetPlan] = None
    transfer_device: Optional[torch.device] = None  # the device configure() last streamed to
    forked = False  # in a forked child: files are reopened through /proc/self/fd
    forked_cuda = False  # forked while streaming to CUDA, which cannot run in the child
    _in_pass = False  # the model's forward is running (units accessed now are part of a pass)
    _ran_outside = False  # a unit ran outside the model's forward since the last pass began
    relearned = False  # the planner was started afresh once so that it learns a real pass
    units_running = 0  # unit calls in progress (a unit may run inside another)

    def __init__(self, model: nn.Module, units: list, source, config, device: torch.device):
        self.model = model
        self.units: list[UnitSpec] = units
        self.source = source
        self.config = config
        self.device = device
        self.layouts = source.layouts(units)
        self.placement = Placement(units, self.layouts, source.path)
        self.sizes = self.placement.sizes
        self.counters = Counters()
        self.engines: dict = {}  # read backend -> engine, kept for the runtime's life
        self.lock = threading.RLock()
        """The model's lock: passes, units and reads outside them take turns."""
        self._depth = 0
        self.units_running = 0
        self.pressure = pressure.Yielding()
        self.speculation = Speculation()
        self.reads = Reads(self)
        self._pending = None  # a deep copy not yet resolved
        registry.register(self)
        if config.debug_mode:
            logging.basicConfig()
            log.setLevel(logging.DEBUG)

    # ------------------------------------------------------------ configuration

    def configure(self) -> None:
        """(Re)build the planner, engine and transfer path for the current device."""
        self.teardown()
        configure.build(self)

    def teardown(self) -> None:
        """Drop every loaded unit and buffer (device change, reconfiguration)."""
        if self.sparse is not None:
            self.sparse.close()
        if self.transfer is not None:
            self.transfer.close()
            self.placement.unbind_all(self.device)
        self.transfer = None
        self.sparse = None
        self.planner = None
        self.engine = None
        self.reads.clear()

    def fallback(self, msg: str) -> None:
        if msg not in self.counters.fallbacks:
            self.counters.fallbacks.append(msg)
            warnings.warn("TensorStream: " + msg, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------ passes and units

    def run_pass(self, fn, args, kwargs):
        """Run the model's forward `fn` as one pass, holding the model's lock."""
        with self.lock:
            self._depth += 1
            outermost = self._depth == 1  # a model called from inside its own forward is one pass
            t0 = time.perf_counter()
            try:
                if outermost:
                    self._in_pass = True
                    self._begin_pass()
                out = fn(*args, **kwargs)
                if outermost:
                    self._end_pass()
                return out
            except BaseException:
                self.recover()
                raise
            finally:
                self._depth -= 1
                if outermost:
                    self._in_pass = False
                    self.counters.pass_seconds += time.perf_counter() - t0

    def run_unit(self, i: int, fn, args, kwargs):
        """Run unit `i`'s forward `fn` with its weights resident. An out-of-memory error in
        it is retried once after every streamed unit was released (see :mod:`.oom`)."""
        with self.lock:
            self._depth += 1
            try:
                inputs = oom.inputs_state(self.device, args, kwargs)
                try:
                    return self._attempt(i, fn, args, kwargs)
                except torch.OutOfMemoryError as e:
                    if inputs is None:  # not a device whose out-of-memory errors are retried
                        raise
                    pressure_response.before_oom_retry(self, i, e, inputs, args, kwargs)
                    try:
                        return self._attempt(i, fn, args, kwargs)
                    except torch.OutOfMemoryError as again:
                        raise oom.failed_again(self.units[i].name, self.device) from again
            except BaseException:
                self.recover()
                raise
            finally:
                self._depth -= 1

    def _attempt(self, i: int, fn, args, kwargs):
        self.units_running += 1
        try:
            self.ensure_configured()
            if self._is_sparse(i):
                self.placement.check_usable(i)
                return self.sparse.run(i, fn, args, kwargs, self._compute)
            self._enter_unit(i)
            out = self._compute(i, fn, args, kwargs)
            self._exit_unit(i)
            return out
        finally:
            self.units_running -= 1

    def _compute(self, i: int, fn, args, kwargs):
        """Unit `i`'s forward with its parameters bound to its bytes, whole or sparse: bind,
        run (tensors autograd saves from a buffer are packed), check that nothing wrote the
        weights, release."""
        tr = self.transfer
        sparse = self._is_sparse(i)
        (tr.bind_slices if sparse else tr.bind)(i)
        self.placement.snapshot_versions(i)
        try:
            with self.reads.saved_tensor_guard():
                out = fn(*args, **kwargs)
            self.placement.check_unwritten(i)
        finally:
            (tr.release_slices if sparse else tr.release)(i)
        return out

    def ensure_configured(self) -> None:
        self.resolve()
        tr = self.transfer
        if tr is None or not tr.reads_verified:
            # Reads into buffers of a checksummed store are verified anyway; a mapping is
            # verified once, and a checkpoint never: check that their files did not change.
            self.source.files_open.check_unchanged()
        if self.forked_cuda:
            raise TensorStreamError(
                "this model streams to CUDA and the process was forked: CUDA cannot run in a forked child. "
                "Start worker processes with multiprocessing's 'spawn' method, or offload the model in the child."
            )
        if self.transfer is None or self.transfer.ctx.device != self.device:
            self.configure()

    def _begin_pass(self) -> None:
        self.ensure_configured()
        if self._ran_outside and not self.relearned and self.planner.learned_order() is None:
            self._relearn()
        self._ran_outside = False
        self.planner.begin_pass()
        self.counters.passes += 1

    def _end_pass(self) -> None:
        """Until the next pass nothing runs (a draft drafts, the caller samples): the planner
        prefetches the next pass's first units into the room the budget has."""
        evict, prefetch = self.planner.end_pass()
        for v in evict:
            self.evict(v)
        self._prefetch(prefetch)

    def _prefetch(self, units: list) -> None:
        """Start loading `units` in the background, in order."""
        units = [v for v in units if not self._is_sparse(v)]
        for v in units:
            self.transfer.load(v, demand=False)
        self._track_peak()
        self.transfer.prefetched(units)

    def _relearn(self) -> None:
        """Units ran outside the model's forward before the first pass: the encoder that
        ``generate()`` runs by itself (T5, BART, Whisper), the vision tower it runs on the
        prompt (Llava). ADAPTIVE would learn them as the order every pass repeats and keep them
        resident while the passes run the decoder. Once, before it has learned anything, the
        planner starts afresh (every unit dropped), so it learns a pass of the model's forward."""
        self.relearned = True
        if self.config.prefetch_strategy.value != "adaptive":
            return  # only ADAPTIVE learns an order
        self.drop_all()
        self.planner = configure.new_planner(self)

    def _enter_unit(self, i: int) -> None:
        pressure_response.respond(self)
        if not self._in_pass:
            self._ran_outside = True
        self.placement.check_usable(i)
        c = self.counters
        acc = self.planner.access(i)
        c.accesses += 1
        c.hits += acc.hit
        c.prefetch_hits += acc.prefetched
        c.misses += acc.load
        log.debug("access %s: %s", self.units[i].name, acc)
        for v in acc.evict:
            self.evict(v)
        if acc.load:
            self.transfer.load(i, demand=True)
        self._prefetch(acc.prefetch)

    def _exit_unit(self, i: int) -> None:
        for v in self.planner.release(i):
            self.evict(v)

    def _is_sparse(self, i: int) -> bool:
        """Whether unit `i` is a sparse unit the sparse cache streams (the planner sees it as
        0 bytes and never loads or evicts it)."""
        return self.sparse is not None and i in self.sparse.units

    def evict(self, i: int) -> None:
        """Drop unit `i`'s bytes (the planner decided; a sparse unit's slices are the sparse
        cache's to drop)."""
        if not self._is_sparse(i):
            self.transfer.evict(i)

    def recover(self) -> None:
        """After an exception anywhere in a pass: cancel every read, drop every unit and reset
        the planner, so the accounting is back to zero and the next pass starts clean."""
        if self._depth == 1:
            self.counters.errors += 1
        self.drop_all()

    def drop_all(self) -> None:
        """Cancel every read, drop every unit and reset the planner (its learned order kept)."""
        if self.sparse is not None:
            self.sparse.reset()
        if self.transfer is not None:
            self.transfer.reset()
        if self.planner is not None:
            self.planner.reset()

    def offer_ceiling(self, allowance: int, reading) -> None:
        """Memory pressure decided in another model's thread: apply the units' budget
        `allowance` now if this model is idle (its lock free), else at its next unit."""
        if self.lock.acquire(blocking=False):
            try:
                pressure_response.set_ceiling(self, allowance, reading)
            finally:
                self.lock.release()
        else:
            self.pressure.pending = (allowance, reading)

    def _track_peak(self) -> None:
        self.counters.peak_held = max(self.counters.peak_held, self.held_bytes())

    @property
    def draft(self) -> Optional[nn.Module]:
        """The draft given to ``offload(..., draft=)``, or None."""
        return draft_of(self.model)

    def held_bytes(self) -> int:
        """Bytes of streamed units held on the device now, loaded or in flight."""
        held = self.transfer.held_bytes() if self.transfer else 0
        return held + (self.sparse.held_bytes() if self.sparse else 0)

    def statistics(self) -> dict:
        with self.lock:
            self.resolve()
            return statistics(self)

    # ------------------------------------------------------------ copies, pickling, fork

    def __deepcopy__(self, memo):
        return copies.deep_copy(self, memo)

    def resolve(self) -> None:
        """Finish a deep copy (see :mod:`.copies`)."""
        copies.resolve(self)

    def __reduce_ex__(self, proto):
        raise copies.refuse_pickle(self)

    def after_fork_in_child(self) -> None:
        copies.after_fork_in_child(self)
