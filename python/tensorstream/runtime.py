"""The streaming runtime: the planner loop that makes each unit's weights resident just
before it runs, and the recovery that keeps the model consistent when anything raises.

One :class:`Runtime` per offloaded model (``model._tensorstream``). It owns the planner,
the engines, the placement of parameters and one transfer path (:mod:`.transfer`); the
module layer (:mod:`.module`) calls :meth:`Runtime.run_pass` around the model's forward and
:meth:`Runtime.run_unit` around each unit's. Both hold the model's lock, so threads take
turns one pass at a time, and both reset every transfer and the planner on any exception
(``KeyboardInterrupt`` included), so the next call starts clean.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import threading
import time
import warnings
import weakref
from typing import Optional

import torch
from torch import nn

from . import _core, budget, pressure
from .config import BackendType
from .errors import OutOfMemoryError, TensorStreamError
from .memory import available_ram
from .placement import Placement
from .reads import Reads
from .sparse import SparseCache
from .speculative import Speculation, draft_of
from .stats import Counters, MemoryPressureEvent, notify_pressure, statistics
from .transfer import PATHS, Context, probe_gds, select_path
from .units import ParamRef, UnitSpec

log = logging.getLogger("tensorstream")

make_engine = _core.Engine
"""Makes the runtime's engines; tests swap in ``_core.Engine.with_faults`` to inject faults."""

OOM_RETRY_DEVICES = {"cuda"}
"""Devices whose out-of-memory errors in a unit are retried (tests add "cpu" to simulate them).
Each unit call there first records the state of its inputs (:func:`_state`)."""

_RUNTIMES: weakref.WeakSet = weakref.WeakSet()
_FORK_LEFTOVERS: list = []  # engines and tickets of the parent: never dropped in a child


class Runtime:
    """Per-model streaming state, attached to the model as ``model._tensorstream``."""

    # Set by configure() (a deep copy not yet resolved has only these defaults).
    transfer = None
    planner = None
    engine = None
    sparse: Optional[SparseCache] = None  # units streamed slice by slice (CPU paths)
    budget_plan: Optional[budget.BudgetPlan] = None
    transfer_device: Optional[torch.device] = None  # the device configure() last streamed to
    _forked_paths = False  # a forked child reopens its files through /proc/self/fd
    _forked_cuda = False
    _in_pass = False  # the model's forward is running (units accessed now are part of a pass)
    _ran_outside = False  # a unit ran outside the model's forward since the last pass began
    _relearned = False  # the planner was started afresh once so that it learns a real pass

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
        self._engines: dict = {}
        self._fallback_if_run: Optional[str] = None
        self._lock = threading.RLock()
        self._depth = 0
        self._units_running = 0
        self.pressure = pressure.Yielding()
        self.speculation = Speculation()
        self.reads = Reads(self)
        self._pending = None  # a deep copy not yet resolved
        _RUNTIMES.add(self)
        if config.debug_mode:
            logging.basicConfig()
            log.setLevel(logging.DEBUG)

    # ------------------------------------------------------------ configuration

    def check_budget(self) -> budget.BudgetPlan:
        if len(_RUNTIMES) > 1:
            gc.collect()  # a model and its runtime form a cycle: collect deleted ones first
        others = [
            (rt.budget_plan.budget, rt.budget_plan.resident + rt.held_bytes())
            for rt in list(_RUNTIMES)
            if rt is not self and rt.budget_plan is not None and rt.device.type == self.device.type
        ]
        return budget.plan(
            self.model,
            self.units,
            self.sizes,
            self.config,
            self.device,
            others,
            warn=self.budget_plan is None,
        )

    def configure(self) -> None:
        """(Re)build the planner, engine and transfer path for the current device."""
        self.teardown()
        cfg = self.config
        self.budget_plan = self.check_budget()
        if self.transfer_device != self.device:  # another device: another memory to yield to
            self.pressure = pressure.Yielding()
            self.transfer_device = self.device
        gds = None
        if self.device.type == "cuda" and cfg.backend == BackendType.GPUDIRECT:
            gds = probe_gds(self.source.files[0])
        # Parameters converted in their buffer's tail (another dtype) cannot be views of a mapping.
        zero_copy = self.source.zero_copy and not any(self.placement.converts)
        choice = select_path(cfg, self.device, zero_copy, self.source.file_len, available_ram(), gds)
        if choice.fallback:
            self.fallback(choice.fallback)
        self._fallback_if_run = choice.fallback_if_run
        self.planner = self._new_planner()
        self._relearned = False
        self.engine = self._engine(choice.engine_backend)
        ctx = Context(
            units=self.units,
            layouts=self.layouts,
            placement=self.placement,
            source=self.source,
            config=cfg,
            device=self.device,
            unit_budget=self.planner.budget,
            engine=self.engine,
            counters=self.counters,
            planner_used=lambda: self.planner.stats()["used"] if self.planner else 0,
            fallback=self.fallback,
        )
        self.transfer = PATHS[choice.kind](ctx)
        if self.budget_plan.sparse:
            self.sparse = SparseCache(self, self.budget_plan.sparse)
        log.debug("configured %s: %s", choice.kind, self.budget_plan)

    def _new_planner(self):
        cfg = self.config
        planner = _core.Planner(
            budget.planner_sizes(self.units, self.sizes, self.config, self.device),
            self.budget_plan.units,
            cfg.prefetch_strategy.value,
            cfg.memory_pressure_mode.value,
        )
        if self.pressure.ceiling is not None:
            planner.set_budget(self.pressure.ceiling)
        return planner

    def _engine(self, backend: str):
        """One engine per backend for the runtime's life: it holds the files validated when
        the source was opened, so a file replaced on disk later is never read with this
        layout. In a forked child the engine is new and reopens the inherited descriptors."""
        engine = self._engines.get(backend)
        if engine is None:
            cfg = self.config
            engine = make_engine(backend, cfg.num_io_threads, cfg.chunk_mb << 20)
            if self._forked_paths:
                engine.preopen([f"/proc/self/fd/{self.source.fds[f]}" for f in self.source.files])
            else:
                engine.preopen(list(self.source.files))
            self._engines[backend] = engine
        return engine

    def teardown(self) -> None:
        """Drop every loaded unit and buffer (device change, reconfiguration)."""
        if self.sparse is not None:
            self.sparse.close()
        if self.transfer is not None:
            self.transfer.close()
            for i in range(len(self.units)):
                self.placement.unbind(i, self.device)
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
        with self._lock:
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
        it is retried once after every streamed unit was released (see :meth:`_retry_oom`)."""
        with self._lock:
            self._depth += 1
            try:
                inputs = _state(args, kwargs) if self.device.type in OOM_RETRY_DEVICES else None
                try:
                    return self._attempt(i, fn, args, kwargs)
                except torch.OutOfMemoryError as e:
                    self._retry_oom(i, e, inputs, args, kwargs)
                    try:
                        return self._attempt(i, fn, args, kwargs)
                    except torch.OutOfMemoryError as again:
                        raise OutOfMemoryError(
                            f"{self.units[i].name}: out of memory on {self.device} again after TensorStream released "
                            "every streamed unit it held; the rest of the model (activations, the KV cache) needs "
                            "more than the device has. Lower vram_budget_gb, the batch size or the context length."
                        ) from again
            except BaseException:
                self.recover()
                raise
            finally:
                self._depth -= 1

    def _attempt(self, i: int, fn, args, kwargs):
        self._units_running += 1
        try:
            self.ensure_configured()
            if self._is_sparse(i):
                self._check_unit(i)
                return self.sparse.run(i, fn, args, kwargs)
            self._enter_unit(i)
            with self.reads.saved_tensor_guard():
                out = fn(*args, **kwargs)
            self._exit_unit(i)
            return out
        finally:
            self._units_running -= 1

    def _retry_oom(self, i: int, error: BaseException, inputs: list, args, kwargs) -> None:
        """After an out-of-memory error in unit `i`: release every streamed unit and lower the
        ceiling, so that the retry has the memory they held, or raise OutOfMemoryError when a
        retry could not give the un-offloaded model's answer: the unit runs inside another
        one (whose weights must stay), it changed its inputs before failing (a KV cache it
        had appended to), or TensorStream held nothing to release."""
        if inputs is None:  # not a device whose out-of-memory errors are retried
            raise error
        name = self.units[i].name
        held = self.held_bytes()
        why = None
        if self._units_running:
            why = "it runs inside another streamed unit, whose weights must stay"
        elif _state(args, kwargs) != inputs:
            why = "it had already changed its inputs (the KV cache, for example) before it failed"
        elif held <= self.sizes[i]:
            why = "TensorStream held no other streamed unit to release"
        if why is not None:
            raise OutOfMemoryError(
                f"{name}: out of memory on {self.device} and not retried: {why}. Lower vram_budget_gb (or set "
                "Config.memory_headroom_gb higher, so the budget yields earlier), the batch size or the context length."
            ) from error
        log.debug("%s: out of memory holding %d bytes of units; releasing them and retrying once", name, held)
        p = self.pressure
        p.oom_retries += 1
        ceiling = max(min(p.ceiling or self.budget_plan.units, held) // 2, max(self.sizes))
        p.learned_headroom += max(held - ceiling, 0)
        names = [self.units[v].name for v in self.planner.resident()]
        self._drop_all()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._set_ceiling(ceiling, pressure.read_memory(self.device), "oom", names)

    def ensure_configured(self) -> None:
        self.resolve()
        tr = self.transfer
        if tr is None or tr.zero_copy or not self.source.checksummed:
            # Reads into buffers of a checksummed store are verified anyway; a mapping is
            # verified once, and a checkpoint never: check that their files did not change.
            self.source.files_open.check_unchanged()
        if self._forked_cuda:
            raise TensorStreamError(
                "this model streams to CUDA and the process was forked: CUDA cannot run in a forked child. "
                "Start worker processes with multiprocessing's 'spawn' method, or offload the model in the child."
            )
        if self.transfer is None or self.transfer.ctx.device != self.device:
            self.configure()

    def _begin_pass(self) -> None:
        self.ensure_configured()
        if self._fallback_if_run and self.device.type == "cpu":
            self.fallback(self._fallback_if_run)
        if torch.is_grad_enabled():
            for u in self.units:
                self._check_frozen(u.index)
        if self._ran_outside and not self._relearned and self.planner.learned_order() is None:
            self._relearn()
        self._ran_outside = False
        self.planner.begin_pass()
        self.counters.passes += 1

    def _end_pass(self) -> None:
        """Until the next pass nothing runs (a draft drafts, the caller samples): the planner
        prefetches the next pass's first units into the room the budget has."""
        evict, prefetch = self.planner.end_pass()
        for v in evict:
            self._evict(v)
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
        self._relearned = True
        if self.config.prefetch_strategy.value != "adaptive":
            return  # only ADAPTIVE learns an order
        self._drop_all()
        self.planner = self._new_planner()

    def _check_frozen(self, i: int) -> None:
        for p in self.units[i].params:
            if p.get().requires_grad:
                raise TensorStreamError(
                    f"{self.units[i].name}: streamed weights are read-only, and this forward would train "
                    f"{p.store_name!r} (requires_grad=True, grad mode on). Run inference under torch.no_grad() or "
                    "torch.inference_mode(), or freeze the streamed weights, for example "
                    "`for p in model.parameters(): p.requires_grad_(False)`, and train adapters on top "
                    "(peft LoRA works)."
                )

    def _check_unit(self, i: int) -> None:
        """Refuse a unit whose parameters were replaced, or that this forward would train."""
        self.placement.check_same_objects(i)
        if torch.is_grad_enabled():
            self._check_frozen(i)

    def _enter_unit(self, i: int) -> None:
        self._respond_to_pressure()
        if not self._in_pass:
            self._ran_outside = True
        self._check_unit(i)
        c = self.counters
        acc = self.planner.access(i)
        c.accesses += 1
        c.hits += acc.hit
        c.prefetch_hits += acc.prefetched
        c.misses += acc.load
        log.debug("access %s: %s", self.units[i].name, acc)
        for v in acc.evict:
            self._evict(v)
        tr = self.transfer
        if acc.load:
            tr.load(i, demand=True)
        self._prefetch(acc.prefetch)
        bind = tr.ready(i)
        if bind is None:
            self.placement.set_bound(i, True)
        else:
            self.placement.bind(i, *bind)
        self.placement.snapshot_versions(i)

    def _exit_unit(self, i: int) -> None:
        self.placement.check_unwritten(i)
        self.placement.set_bound(i, False)
        self.transfer.after_compute(i)
        for v in self.planner.release(i):
            self._evict(v)

    def _is_sparse(self, i: int) -> bool:
        """Whether unit `i` is a sparse unit the sparse cache streams (the planner sees it as
        0 bytes and never loads or evicts it)."""
        return self.sparse is not None and i in self.sparse.units

    def _evict(self, i: int) -> None:
        if self._is_sparse(i):
            return
        if not self.transfer.zero_copy:
            self.placement.unbind(i, self.device)
        self.transfer.evict(i)

    def recover(self) -> None:
        """After an exception anywhere in a pass: cancel every read, drop every unit and reset
        the planner, so the accounting is back to zero and the next pass starts clean."""
        if self._depth == 1:
            self.counters.errors += 1
        self._drop_all()

    def _drop_all(self) -> None:
        """Cancel every read, drop every unit and reset the planner (its learned order kept)."""
        if self.sparse is not None:
            self.sparse.reset()
        if self.transfer is not None:
            self.transfer.reset()
            for i in range(len(self.units)):
                if self.transfer.zero_copy:
                    self.placement.set_bound(i, False)
                else:
                    self.placement.unbind(i, self.device)
        if self.planner is not None:
            self.planner.reset()

    # ------------------------------------------------------------ memory pressure

    def _respond_to_pressure(self) -> None:
        """At a unit boundary: apply a ceiling decided while this model ran, then (at most
        every ``pressure.PROBE_INTERVAL``) read the device's free memory and set the ceiling of
        every model streaming to this device (those running in another thread at their next
        unit)."""
        p = self.pressure
        if p.pending is not None:
            self._set_ceiling(*p.pending)
        if not pressure.due(self.device):
            return
        peers = [
            rt
            for rt in list(_RUNTIMES)
            if rt.device == self.device and rt.planner is not None and rt.transfer is not None
        ]
        reading = pressure.read_memory(self.device)
        allowed = pressure.allowances(peers, reading)
        for rt, allowance in zip(peers, allowed or [None] * len(peers)):
            rt.pressure.free = reading.free
            if allowance is None:
                continue
            if rt is self:
                self._set_ceiling(allowance, reading)
            elif rt._lock.acquire(blocking=False):
                try:
                    rt._set_ceiling(allowance, reading)
                finally:
                    rt._lock.release()
            else:
                rt.pressure.pending = (allowance, reading)

    def _set_ceiling(self, allowance: int, reading, level: Optional[str] = None, evicted: list = ()) -> None:
        """Make `allowance` the units' budget (never above the planned one), evicting what no
        longer fits, and tell the callback when the pressure level changed."""
        p = self.pressure
        p.pending = None
        p.free = reading.free
        plan = self.budget_plan.units
        ceiling = None if allowance >= plan else allowance
        evicted = list(evicted)
        if ceiling != p.ceiling:
            p.ceiling = ceiling
            dropped, _ = self.planner.set_budget(plan if ceiling is None else ceiling)
            for v in dropped:
                self._evict(v)
            evicted += [self.units[v].name for v in dropped]
            self.transfer.set_limit(self.planner.budget)
        level = level or pressure.level(
            allowance, plan, max(self.sizes), budget.window_bytes(self.sizes, self.config)
        )
        if level != p.level:
            ev = MemoryPressureEvent(
                level=level,
                previous=p.level,
                model=type(self.model).__name__,
                free_bytes=reading.free,
                budget_bytes=self.budget_plan.resident + self.budget_plan.sparse + self.planner.budget,
                requested_budget_bytes=self.budget_plan.budget,
                evicted=evicted,
                mode=self.config.memory_pressure_mode.value,
                device=str(self.device),
            )
            p.level = level
            p.history.append(ev)
            log.debug("memory pressure: %s", ev)
            notify_pressure(ev)

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
        with self._lock:
            self.resolve()
            return statistics(self)

    # ------------------------------------------------------------ copies, pickling, fork

    def __deepcopy__(self, memo):
        """A copy for a deep copy of the model: it shares the source (read-only) and gets its
        own engines and buffers, built when the copy is first used."""
        new = Runtime.__new__(Runtime)
        memo[id(self)] = new
        self.resolve()
        names = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        spec = [
            (u.name, [names[id(m)] for m in u.modules], [(names[id(p.module)], p) for p in u.params])
            for u in self.units
        ]
        new.__dict__.update(
            _lock=threading.RLock(),
            _depth=0,
            _pending=(
                copy.deepcopy(self.model, memo),
                spec,
                self.source,
                copy.deepcopy(self.config, memo),
                self.device,
            ),
        )
        _RUNTIMES.add(new)
        return new

    def resolve(self) -> None:
        """Finish a deep copy: find the copied model's units and parameters."""
        pending = self.__dict__.get("_pending")
        if pending is None:
            return
        model, spec, source, config, device = pending
        mods = dict(model.named_modules(remove_duplicate=False))
        units = []
        for idx, (name, paths, params) in enumerate(spec):
            refs = [ParamRef(mods[mp], p.attr, p.store_name, p.dtype, p.shape, p.recipe) for mp, p in params]
            units.append(UnitSpec(index=idx, name=name, modules=[mods[m] for m in paths], params=refs))
        Runtime.__init__(self, model, units, source, config, device)
        self.placement.adopt(self)
        for i in range(len(units)):
            self.placement.unbind(i, device)

    def __reduce_ex__(self, proto):
        raise TensorStreamError(
            "an offloaded model cannot be pickled: its streamed weights live in the store "
            f"{self.source.path}, not in the model. Save it with model.save_pretrained(DIR) or "
            "torch.save(model.state_dict(), FILE) (both read the real weights), or copy it with copy.deepcopy."
        )

    def after_fork_in_child(self) -> None:
        """The I/O workers do not exist in a forked child: keep the parent's engines and
        reads alive forever (dropping them would wait for those workers) and start afresh."""
        self._lock = threading.RLock()
        self._depth = 0
        self._in_pass = False
        if self.transfer is not None:
            _FORK_LEFTOVERS.extend(self.transfer.abandon())
            _FORK_LEFTOVERS.append(self.transfer)
        if self.sparse is not None:
            _FORK_LEFTOVERS.extend(self.sparse.abandon())
            _FORK_LEFTOVERS.append(self.sparse)
            self.sparse = None
        _FORK_LEFTOVERS.extend(self._engines.values())
        self._engines = {}
        self.transfer = None
        self.planner = None
        self.engine = None
        self.reads.clear()
        self._forked_paths = True
        if self.device.type == "cuda":
            self._forked_cuda = True
        for i in range(len(self.units)):
            self.placement.unbind(i, self.device)


def _state(args, kwargs) -> list:
    """What a unit's inputs are now: every tensor reachable from them (through lists, dicts,
    a KV cache's layers and other plain objects, a few levels deep) with its version counter,
    which in-place writes advance. Two equal states mean nothing was appended or written."""
    out: list = []

    def version(t: torch.Tensor) -> tuple:
        # Inference tensors have no version counter; their writes go unseen (a KV cache
        # appends by making new tensors, which is seen).
        return id(t), t.data_ptr() if t.is_inference() else t._version

    def walk(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(version(obj))
        elif type(obj) in _ATOMS or depth > 4 or isinstance(obj, nn.Module):
            return
        elif type(getattr(obj, "layers", None)) is list and hasattr(obj, "get_seq_length"):
            # transformers' KV cache (the common case, made fast): each layer's tensors.
            for layer in obj.layers:
                attrs = getattr(layer, "__dict__", {}).values()
                out.extend(version(t) for t in attrs if isinstance(t, torch.Tensor))
        elif isinstance(obj, (list, tuple)):
            out.append(len(obj))
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            out.append(len(obj))
            for x in obj.values():
                walk(x, depth + 1)
        elif hasattr(obj, "__dict__"):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(args, 0)
    walk(kwargs, 0)
    return out


_ATOMS = frozenset((type(None), bool, int, float, str, torch.device, torch.dtype))


def _after_fork_in_child() -> None:
    for rt in list(_RUNTIMES):
        rt.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
