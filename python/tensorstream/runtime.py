"""The streaming runtime: hooks that make each unit's weights resident just before it runs,
driven by the Rust planner and engine.

Three ways of getting a unit's bytes to the device that runs it:

- ``cpu-mmap``: the store is memory-mapped and the parameters are zero-copy views of the
  mapping. Loading a unit asks the I/O workers to fault it in (and verify its checksum the
  first time); evicting it drops its pages from this process (MADV_DONTNEED), which returns
  them to the page cache. Resident set = the planner's resident units.
- ``cpu-pread``: units are read with O_DIRECT into budgeted, 4 KiB-aligned buffers, bypassing
  the page cache: for models larger than RAM.
- ``cuda``: units are read into pinned host memory (a host-RAM tier, or a ring of staging
  buffers allocated once), then copied to GPU slots on a dedicated copy stream; the compute
  stream waits on a per-unit event, and a slot is overwritten only after the compute that
  used it has finished.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from . import _core
from .config import BackendType, Config, MemoryPressureMode
from .errors import BudgetError, InvalidArgumentError, StoreMismatchError, TensorStreamError
from .memory import aligned_empty, available_ram, pinned_empty, total_ram
from .units import ST_TO_TORCH, UnitSpec, _itemsize, _numel, resident_bytes

log = logging.getLogger("tensorstream")

GiB = 1 << 30
MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


@dataclass
class MemoryPressureEvent:
    """Passed to the callback of :func:`tensorstream.set_memory_pressure_callback` when a
    unit had to be loaded on demand and the planner evicted others to make room."""

    level: float
    """Fraction of the budget in use after the access (0..1)."""
    unit: str
    evicted: list
    bytes_in_use: int
    budget_bytes: int
    mode: str

    def __str__(self) -> str:
        return (
            f"{self.level:.0%} of {self.budget_bytes / GiB:.2f} GiB in use; loading {self.unit} "
            f"evicted {len(self.evicted)} unit(s) ({self.mode})"
        )


_pressure_callbacks: list = []


def set_memory_pressure_callback(fn: Optional[Callable[[MemoryPressureEvent], None]]) -> None:
    """Call `fn(event)` whenever the planner must evict units to load one on demand
    (budget pressure). ``None`` removes the callback."""
    _pressure_callbacks.clear()
    if fn is not None:
        if not callable(fn):
            raise InvalidArgumentError(f"memory pressure callback must be callable, got {fn!r}")
        _pressure_callbacks.append(fn)


def _file_mappings() -> list:
    """(start, end) of this process's file-backed memory mappings (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
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

    def take(self, nbytes: int):
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


class StagingRing:
    """Pinned host buffers, allocated once, that disk reads land in before their copy to the
    GPU. A buffer is handed out again only after the event recorded after its copy completed."""

    def __init__(self, count: int, nbytes: int, alloc):
        self.buffers = [alloc(nbytes) for _ in range(count)]
        self.events: list = [None] * count
        self.busy = [False] * count
        self.nbytes = nbytes
        self.waits = 0

    def acquire(self) -> int:
        for _ in range(2):
            for i, b in enumerate(self.busy):
                if not b:
                    ev = self.events[i]
                    if ev is not None and not ev.query():
                        continue
                    self.busy[i] = True
                    return i
            # Every free buffer still has a copy in flight: wait for the oldest one.
            pending = [i for i, b in enumerate(self.busy) if not b and self.events[i] is not None]
            if not pending:
                break
            self.waits += 1
            self.events[pending[0]].synchronize()
        raise TensorStreamError(
            "staging ring exhausted: every pinned staging buffer holds a read in progress"
        )

    def release(self, i: int, event=None) -> None:
        self.busy[i] = False
        self.events[i] = event


@dataclass
class _UnitState:
    slot: Optional[torch.Tensor] = None
    slot_event: object = None  # event after which the slot may be overwritten
    ticket: object = None
    staging: Optional[int] = None
    ready_event: object = None
    verified: bool = False
    needs_convert: bool = False


@dataclass
class Counters:
    accesses: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    stall_seconds: float = 0.0
    bytes_h2d: int = 0
    passes: int = 0
    errors: int = 0
    peak_held: int = 0
    fallbacks: list = field(default_factory=list)


class Runtime:
    """Per-model streaming state, attached to the model as ``model._tensorstream``."""

    def __init__(self, model: nn.Module, units: list, source, config: Config, device: torch.device):
        self.model = model
        self.units: list[UnitSpec] = units
        self.source = source
        self.config = config
        self.layouts = source.layouts(units)
        self.read_len = [lay.buffer_len for lay in self.layouts]
        # Per parameter: (parts, shape, converted offset or None, dtype), parts being the
        # (stored dtype, offset, nbytes) of the stored tensors it is made of. A parameter
        # whose stored dtype differs from the model's, or that is assembled from several
        # stored tensors, is built in the tail of its unit's own slot, so it costs no memory
        # outside the budget.
        self._slots = []
        self.sizes = []
        for u, lay in zip(units, self.layouts):
            by_name = {t[0]: t for t in lay.tensors}
            entries, tail = [], lay.buffer_len
            for p in u.params:
                parts, numel = [], 0
                for name in p.source_names:
                    _n, st_dtype, shape, off, nbytes = by_name[name]
                    parts.append((ST_TO_TORCH[st_dtype], off, nbytes))
                    numel += _numel(shape)
                if len(parts) == 1 and tuple(shape) != tuple(p.shape) or numel != _numel(p.shape):
                    raise StoreMismatchError(
                        f"{source.path}: tensor {p.store_name!r} of unit {u.name!r} has shape {tuple(shape)}, "
                        f"the model expects {tuple(p.shape)}"
                    )
                conv = None
                if len(parts) > 1 or parts[0][0] != p.dtype:
                    tail = (tail + 255) // 256 * 256
                    conv = tail
                    tail += numel * _itemsize(p.dtype)
                entries.append((parts, tuple(p.shape), conv, p.dtype))
            self._slots.append(entries)
            self.sizes.append((tail + 4095) // 4096 * 4096)
        self.device = device
        self.state = [_UnitState() for _ in units]
        self.counters = Counters()
        self.mode: Optional[str] = None
        self.engine = None
        self.planner = None
        self.pool: Optional[SlotPool] = None
        self.ring: Optional[StagingRing] = None
        self.host_cache: dict = {}
        self.host_valid: set = set()
        self.host_plan: set = set()
        self.pinned_bytes = 0
        self.copy_stream = None
        self.budget = 0
        self.resident_bytes = 0
        self._map = None
        self._map_base: Optional[torch.Tensor] = None
        self._placeholders: dict = {}
        self._hooks: list = []
        self._engine_backend = ""
        self._debug = config.debug_mode
        self._cpu_fallback: Optional[str] = None
        self._fault_in_now = False
        self._engines: dict = {}
        # The store file validated at open, held for mappings made after a device move.
        self._store_fd = os.open(source.path, os.O_RDONLY) if source.zero_copy else -1
        if self._debug:
            logging.basicConfig()
            log.setLevel(logging.DEBUG)

    # ----------------------------------------------------------------- setup

    def install(self) -> None:
        """Free the units' memory, set up streaming for the current device and install hooks.
        The budget is checked first: a model refused for its budget is left untouched."""
        self._budget_plan()
        self._detach_resident_from_unit_storage()
        for u in self.units:
            self._unbind(u.index)
            for m in u.modules:
                self._hooks.append(m.register_forward_pre_hook(partial(self._pre, u.index)))
                self._hooks.append(m.register_forward_hook(partial(self._post, u.index)))
            top = u.modules[0]
            top._apply = partial(self._unit_apply, top)  # instance attribute shadows nn.Module._apply
        # The root checks a dtype change before anything moves, so a refused model.half()
        # leaves no module converted.
        self.model._apply = partial(self._root_apply, self.model)
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre))
        _trim_heap()
        self.configure()

    def _detach_resident_from_unit_storage(self) -> None:
        """Give resident tensors their own memory where they live in the same file mapping as
        streamed ones. transformers loads a checkpoint with mmap: a resident embedding viewing
        that mapping keeps the whole file mapped, and every page the store writer touched in
        RSS, after the units are gone."""
        maps = _file_mappings()
        if not maps:
            return

        def mapping_of(ptr: int):
            for lo, hi in maps:
                if lo <= ptr < hi:
                    return (lo, hi)
            return None

        shared = {mapping_of(p.get().data_ptr()) for u in self.units for p in u.params} - {None}
        if not shared:
            return
        streamed_ids = {id(p.get()) for u in self.units for p in u.params}
        for mod in self.model.modules():
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is None or id(t) in streamed_ids or t.device.type != "cpu" or t.numel() == 0:
                    continue
                if mapping_of(t.data_ptr()) in shared:
                    t.data = t.data.clone()

    def _placeholder(self, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
        """A one-element tensor expanded to `shape`: right dtype, device and shape, no memory."""
        key = (dtype, str(device))
        base = self._placeholders.get(key)
        if base is None:
            base = torch.zeros((), dtype=dtype, device=device)
            self._placeholders[key] = base
        return base.expand(shape)

    def _unbind(self, i: int) -> None:
        for p in self.units[i].params:
            p.get().data = self._placeholder(p.dtype, self.device, p.shape)

    def _bind(self, i: int, buf: torch.Tensor, base_offset: int = 0, convert: bool = False) -> None:
        for p, (parts, shape, conv, dtype) in zip(self.units[i].params, self._slots[i]):
            if conv is None:
                stored, off, nbytes = parts[0]
                start = base_offset + off
                p.get().data = buf[start : start + nbytes].view(stored).view(shape)
                continue
            flat = buf[conv : conv + _numel(shape) * _itemsize(dtype)].view(dtype)
            if convert:
                k = 0
                for stored, off, nbytes in parts:
                    src = buf[base_offset + off : base_offset + off + nbytes].view(stored)
                    flat[k : k + src.numel()].copy_(src)
                    k += src.numel()
            p.get().data = flat.view(shape)

    def _budget_plan(self) -> tuple:
        """(budget, resident module bytes) for the current device; raises BudgetError, with the
        numbers, if the budget cannot work."""
        cfg = self.config
        dev = self.device
        resident = resident_bytes(self.model, self.units)
        if dev.type == "cuda":
            default_budget = int(torch.cuda.mem_get_info(dev)[0] * 0.8)
        elif dev.type == "cpu":
            default_budget = max(available_ram() - max(2 * GiB, total_ram() // 10), 0)
        else:
            raise InvalidArgumentError(
                f"device {dev} is not supported; TensorStream streams to CPU or CUDA devices"
            )
        budget = cfg.budget_bytes if cfg.budget_bytes is not None else default_budget
        unit_budget = budget - resident
        strategy = cfg.prefetch_strategy.value
        pmode = cfg.memory_pressure_mode.value
        need = _core.Planner.min_budget(self.sizes, strategy, pmode)
        if unit_budget < need:
            largest = max(self.sizes) if self.sizes else 0
            raise BudgetError(
                f"a budget of {budget / GiB:.4g} GiB ({budget} bytes) cannot work on {dev}: the modules that "
                f"are not streamed take {resident} bytes, leaving {unit_budget} for streamed units, but the "
                f"largest unit takes {largest} bytes and prefetch strategy {strategy!r} ({pmode}) needs "
                f"{need // max(largest, 1)} of them in memory at once ({need} bytes). Raise vram_budget_gb to at "
                f"least {(resident + need) / GiB:.4g} ({resident + need} bytes), or stream more modules (Config.units)."
            )
        return budget, resident

    def configure(self) -> None:
        """(Re)build the planner, engine and buffers for the current device."""
        self._teardown()
        cfg = self.config
        dev = self.device
        self.budget, self.resident_bytes = self._budget_plan()
        self._cpu_fallback = None
        requested = cfg.backend
        if dev.type == "cuda":
            mode = "cuda"
            if requested == BackendType.GPUDIRECT:
                self._probe_gds()
            engine_backend = "mmap" if requested == BackendType.MMAP else "pread_direct"
        else:
            if requested in (BackendType.CUDA, BackendType.GPUDIRECT):
                # Offloading on CPU and then calling model.to("cuda") is the usual order, so
                # this is only a fallback if a forward actually runs on CPU.
                self._cpu_fallback = (
                    f"backend {requested.value!r} needs the model on a CUDA device; it runs on CPU, "
                    "so units are read with O_DIRECT pread"
                )
                mode = "cpu-pread"
            elif requested == BackendType.MMAP and self.source.zero_copy:
                mode = "cpu-mmap"
            elif requested == BackendType.MMAP:
                mode = "cpu-pread"  # reads through the page cache into budgeted buffers
            elif requested == BackendType.PREAD:
                mode = "cpu-pread"
            else:
                mode = (
                    "cpu-mmap"
                    if self.source.zero_copy and self.source.file_len < 0.5 * available_ram()
                    else "cpu-pread"
                )
            engine_backend = "mmap" if requested == BackendType.MMAP else "pread_direct"
        unit_budget = self.budget - self.resident_bytes
        strategy = cfg.prefetch_strategy.value
        pmode = cfg.memory_pressure_mode.value
        self.planner = _core.Planner(self.sizes, unit_budget, strategy, pmode)
        # One engine per backend for the runtime's life: it holds the files validated at
        # offload open from its first configuration on, so a store or shard replaced on disk
        # later (even across device moves) is never read with this layout.
        engine = self._engines.get(engine_backend)
        if engine is None:
            engine = _core.Engine(engine_backend, cfg.num_io_threads, cfg.chunk_mb << 20)
            engine.preopen(list(self.source.files))
            self._engines[engine_backend] = engine
        self.engine = engine
        self._engine_backend = self.engine.backend_name
        self.mode = mode
        self._fault_in_now = mode == "cpu-mmap" and torch.get_num_threads() >= _usable_cores()
        if mode == "cpu-mmap":
            self._map_store()
        else:
            self.pool = SlotPool(dev, unit_budget)
        if mode == "cuda":
            self.copy_stream = torch.cuda.Stream(device=dev)
            self._plan_host_cache()
        log.debug(
            "configured %s: budget %d, resident modules %d, units %d",
            mode,
            self.budget,
            self.resident_bytes,
            len(self.units),
        )

    def _fallback(self, msg: str) -> None:
        if msg not in self.counters.fallbacks:
            self.counters.fallbacks.append(msg)
            warnings.warn("TensorStream: " + msg, RuntimeWarning, stacklevel=3)

    def _pinned(self, nbytes: int) -> torch.Tensor:
        """Pinned host memory, or pageable memory with a visible warning if pinning fails."""
        t, ok = pinned_empty(nbytes)
        if ok:
            self.pinned_bytes += nbytes
        else:
            self._fallback(
                "cudaHostRegister failed; host buffers are pageable, so copies to the GPU run about 8x slower"
            )
        return t

    def _probe_gds(self) -> None:
        """GPUDirect Storage needs cuFile to register the file. Probe it and say what happens."""
        reason = None
        try:
            from torch.cuda import gds  # noqa: F401

            f = gds.GdsFile(self.source.files[0], os.O_RDONLY)
            del f
            reason = (
                "GPUDirect Storage registered the store, but direct reads are not implemented in this version"
            )
        except Exception as e:  # noqa: BLE001 - any failure means no GDS here
            reason = f"GPUDirect Storage is unavailable ({type(e).__name__}: {e})"
        self._fallback(reason + "; falling back to pinned-memory CUDA copies")

    def _plan_host_cache(self) -> None:
        cfg = self.config
        cap = total_ram() // 2
        want = int(cfg.host_cache_gb * GiB) if cfg.host_cache_gb is not None else int(0.4 * available_ram())
        if want > cap:
            self._fallback(
                f"host_cache_gb={want / GiB:.1f} exceeds the pinned-memory cap of half the RAM; using {cap / GiB:.1f} GiB"
            )
            want = cap
        room = want
        self.host_plan = set()
        for i, size in enumerate(self.read_len):
            if size <= room:
                self.host_plan.add(i)
                room -= size
        self.host_cache_limit = want
        if len(self.host_plan) < len(self.units):
            self.ring = StagingRing(3, max(self.read_len), self._pinned)

    def _map_store(self) -> None:
        self._map = mmap.mmap(self._store_fd, 0, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._map_base = torch.frombuffer(self._map, dtype=torch.uint8)
        for u in self.units:
            self._bind(u.index, self._map_base, self.source.unit_offsets[u.name])

    def _teardown(self) -> None:
        """Drop every loaded unit and buffer (device change, reconfiguration)."""
        for i, st in enumerate(self.state):
            self._cancel(i)
            st.slot = None
            st.slot_event = None
            st.ready_event = None
        if self.units and self.mode is not None:
            for u in self.units:
                self._unbind(u.index)
        if self.pool is not None:
            self.pool.clear()
        self.pool = None
        self.ring = None
        self.host_cache = {}
        self.host_valid = set()
        self.pinned_bytes = 0
        self._map_base = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views still exported; the mapping goes when they do
        self._map = None
        self.engine = None
        self.planner = None
        self.mode = None

    def _root_apply(self, model: nn.Module, fn, recurse: bool = True):
        """`model._apply`: refuse a dtype change of streamed units before anything moves."""
        self._check_dtype_unchanged(fn)
        return type(model)._apply(model, fn, recurse)

    def _check_dtype_unchanged(self, fn) -> None:
        for unit in self.units:
            for p in unit.params:
                probe = fn(torch.empty(0, dtype=p.dtype, device=self.device))
                if probe.dtype != p.dtype:
                    raise InvalidArgumentError(
                        f"changing the dtype of a streamed unit after offload() is not supported ({unit.name}: "
                        f"{p.dtype} -> {probe.dtype}); cast the model before offloading it"
                    )

    def _unit_apply(self, module: nn.Module, fn, recurse: bool = True):
        """`module._apply` of a unit: move what is resident, and stream to the new device."""
        unit = next(u for u in self.units if u.modules[0] is module)
        self._check_dtype_unchanged(fn)
        self._teardown()
        for p in unit.params:
            p.get().data = torch.empty(0, dtype=p.dtype, device=self.device)
        type(module)._apply(module, fn, recurse)
        new_device = unit.params[0].get().device if unit.params else self.device
        self.device = new_device
        for p in unit.params:
            p.get().data = self._placeholder(p.dtype, new_device, p.shape)
        self.mode = None  # reconfigured lazily, once every unit has moved
        return module

    def __del__(self):
        fd = getattr(self, "_store_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    # ----------------------------------------------------------------- hooks

    def _root_pre(self, _module, _args):
        if self.mode is None:
            self.configure()
        if self._cpu_fallback and self.device.type == "cpu":
            self._fallback(self._cpu_fallback)
        self.planner.begin_pass()
        self.counters.passes += 1

    def _pre(self, i: int, _module, _args):
        if self.mode is None:
            self.configure()
        c = self.counters
        hit, prefetched, load, evict, prefetch, pressure = self.planner.access(i)
        c.accesses += 1
        c.hits += hit
        c.prefetch_hits += prefetched
        c.misses += load
        if self._debug:
            log.debug(
                "access %s: hit=%s prefetched=%s load=%s evict=%s prefetch=%s",
                self.units[i].name,
                hit,
                prefetched,
                load,
                evict,
                prefetch,
            )
        for v in evict:
            self._evict(v)
        if pressure:
            self._notify_pressure(i, evict)
        if load:
            self._load(i, demand=True)
        for v in prefetch:
            self._load(v, demand=False)
        self._track_peak()
        try:
            if self._fault_in_now:
                # Faulting pages in is CPU work: when compute already uses every core, doing it
                # beside compute only stalls torch's threads. Do it now, in parallel, then compute.
                for v in prefetch:
                    self._finish_read(v, wait=True)
            self._ensure_ready(i)
        except BaseException:
            c.errors += 1
            # Forget this unit and every read still outstanding (a fault often hits the
            # prefetches too), so the next call starts clean.
            for v, st in enumerate(self.state):
                if v == i or st.ticket is not None:
                    self._drop_failed(v)
            raise

    def _post(self, i: int, _module, _args, _output):
        st = self.state[i]
        if self.mode == "cuda" and st.slot is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            st.slot_event = ev
        for v in self.planner.release(i):
            self._evict(v)

    def _notify_pressure(self, i: int, evicted: list) -> None:
        if not _pressure_callbacks:
            return
        s = self.planner.stats()
        ev = MemoryPressureEvent(
            level=s["used"] / max(self.planner.budget, 1),
            unit=self.units[i].name,
            evicted=[self.units[v].name for v in evicted],
            bytes_in_use=self.resident_bytes + s["used"],
            budget_bytes=self.budget,
            mode=self.config.memory_pressure_mode.value,
        )
        for cb in list(_pressure_callbacks):
            cb(ev)

    def _track_peak(self) -> None:
        held = self.held_bytes()
        if held > self.counters.peak_held:
            self.counters.peak_held = held

    def held_bytes(self) -> int:
        """Bytes of streamed units held on the device now, loaded or in flight."""
        if self.mode == "cpu-mmap":
            return self.planner.stats()["used"] if self.planner else 0
        return self.pool.allocated if self.pool else 0

    # ----------------------------------------------------------------- transfers

    def _load(self, i: int, demand: bool) -> None:
        st = self.state[i]
        lay = self.layouts[i]
        if self.mode == "cpu-mmap":
            layout = lay if not st.verified else lay.without_checksum()
            ptr = self._map_base.data_ptr() + self.source.unit_offsets[self.units[i].name]
            st.ticket = self.engine.submit_populate(layout, ptr, demand, self._map_base)
            return
        buf, ev = self.pool.take(self.sizes[i])
        st.slot, st.slot_event = buf, ev
        st.needs_convert = any(e[2] is not None for e in self._slots[i])
        if self.mode == "cpu-pread":
            st.ticket = self.engine.submit(lay, buf.data_ptr(), buf.numel(), demand, buf)
            return
        # cuda
        if i in self.host_valid:
            self._h2d(i, self.host_cache[i])
            return
        if i in self.host_plan:
            host = self.host_cache.get(i)
            if host is None:
                host = self._pinned(self.read_len[i])
                self.host_cache[i] = host
        else:
            k = self.ring.acquire()
            st.staging = k
            host = self.ring.buffers[k]
        st.ticket = self.engine.submit(lay, host.data_ptr(), self.read_len[i], demand, host)

    def _h2d(self, i: int, host: torch.Tensor) -> None:
        st = self.state[i]
        n = self.read_len[i]
        with torch.cuda.stream(self.copy_stream):
            if st.slot_event is not None:
                self.copy_stream.wait_event(st.slot_event)
            st.slot[:n].copy_(host[:n], non_blocking=True)
            st.slot.record_stream(self.copy_stream)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        st.ready_event = ev
        st.slot_event = None
        self.counters.bytes_h2d += n
        if st.staging is not None:
            self.ring.release(st.staging, ev)
            st.staging = None

    def _finish_read(self, i: int, wait: bool) -> None:
        """Collect a finished (or, with `wait`, any) disk read and start its copy."""
        st = self.state[i]
        if st.ticket is None:
            return
        t = st.ticket
        if wait and not t.is_finished():
            t0 = time.perf_counter()
            self.engine.wait(t)
            self.counters.stall_seconds += time.perf_counter() - t0
        else:
            self.engine.wait(t)
        st.ticket = None
        if self.mode == "cuda":
            if i in self.host_plan:
                self.host_valid.add(i)
                self._h2d(i, self.host_cache[i])
            else:
                self._h2d(i, self.ring.buffers[st.staging])
        elif self.mode == "cpu-mmap":
            st.verified = True

    def _ensure_ready(self, i: int) -> None:
        st = self.state[i]
        if self.mode == "cuda":
            self._poll_cuda_except(i)
        if st.ticket is not None:
            self._finish_read(i, wait=True)
        if self.mode == "cpu-mmap":
            return
        if self.mode == "cuda":
            if st.ready_event is not None:
                torch.cuda.current_stream(self.device).wait_event(st.ready_event)
        self._bind(i, st.slot, convert=st.needs_convert)
        st.needs_convert = False

    def _poll_cuda_except(self, i: int) -> None:
        for v, st in enumerate(self.state):
            if v != i and st.ticket is not None and st.ticket.is_finished():
                try:
                    self._finish_read(v, wait=False)
                except TensorStreamError:
                    self._drop_failed(v)

    def _cancel(self, i: int) -> None:
        st = self.state[i]
        if st.ticket is not None and self.engine is not None:
            self.engine.cancel(st.ticket)
            try:
                self.engine.wait(st.ticket)
            except TensorStreamError:
                pass
        st.ticket = None
        if st.staging is not None and self.ring is not None:
            self.ring.release(st.staging, None)
        st.staging = None

    def _evict(self, i: int) -> None:
        st = self.state[i]
        self._cancel(i)
        if self.mode == "cpu-mmap":
            off = self.source.unit_offsets[self.units[i].name]
            self._map.madvise(MADV_DONTNEED, off, self.sizes[i])
            return
        self._unbind(i)
        if st.slot is not None:
            if self.config.memory_pressure_mode == MemoryPressureMode.CONSERVATIVE:
                self.pool.free(st.slot)  # give the memory back, not just the slot
            else:
                self.pool.give(st.slot, st.slot_event)
        st.slot = None
        st.slot_event = None
        st.ready_event = None

    def _drop_failed(self, i: int) -> None:
        """After a failed load: free what the unit holds and forget it, so the next access
        loads it again. The budget accounting returns to where it was."""
        try:
            self._evict(i)
        finally:
            self.planner.forget(i)

    # ----------------------------------------------------------------- stats

    def statistics(self) -> dict:
        c = self.counters
        ps = self.planner.stats() if self.planner else {}
        es = self.engine.stats() if self.engine else {}
        kept = self.planner.kept() if self.planner else []
        resident = self.planner.resident() if self.planner else []
        accesses = max(c.accesses, 1)
        if self.mode == "cuda":
            backend = f"cuda ({self._engine_backend} -> pinned -> H2D copy stream)"
        elif self.mode == "cpu-mmap":
            backend = "mmap (zero-copy views)"
        elif self.mode == "cpu-pread":
            backend = self._engine_backend
        else:
            backend = "unconfigured"
        if es.get("direct_refused_files"):
            self._fallback("the filesystem refused O_DIRECT; reads went through the page cache")
        held = self.held_bytes()
        return {
            "device": str(self.device),
            "mode": self.mode,
            "backend": backend,
            "requested_backend": self.config.backend.value,
            "fallbacks": list(c.fallbacks),
            "prefetch_strategy": self.config.prefetch_strategy.value,
            "memory_pressure_mode": self.config.memory_pressure_mode.value,
            "budget_gb": self.budget / GiB,
            "budget_bytes": self.budget,
            "resident_module_bytes": self.resident_bytes,
            "vram_usage_gb": held / GiB,
            "streamed_bytes_held": held,
            "peak_usage_bytes": self.resident_bytes + c.peak_held,
            "peak_usage_gb": (self.resident_bytes + c.peak_held) / GiB,
            "units": len(self.units),
            "unit_bytes": list(self.sizes),
            "offloaded_layers": len(self.units) - len(kept) if kept else len(self.units),
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
            "pinned_host_bytes": self.pinned_bytes,
            "stall_seconds": c.stall_seconds,
            "io_busy_seconds": es.get("busy_seconds", 0.0),
            "forward_passes": c.passes,
            "errors": c.errors,
            "buffered_fallback_bytes": es.get("buffered_fallback_bytes", 0),
            "store_path": self.source.path,
            "source": self.source.kind,
            "compression_ratio": getattr(self.source, "compression_ratio", 1.0),
            "store_raw_bytes": getattr(self.source, "raw_bytes", None),
            "store_stored_bytes": getattr(self.source, "stored_bytes", None),
            "decoded_bytes": es.get("decoded_bytes", 0),
            "decode_seconds": es.get("decode_seconds", 0.0),
            "planner": ps,
            "engine": es,
        }
