"""CUDA: disk reads land in pinned host memory, the host tier (`host_cache_gb`, units
assigned in model order) or, for units outside it, a ring of three pinned staging buffers
allocated once; copies to GPU slots run on a dedicated stream. The compute stream waits on a
per-unit event; a slot is overwritten only after the event recorded after the compute that
used it; a staging buffer is reused only after its copy's event.

A unit stored with the table code (a store written for a GPU) travels coded: the engine
reads its stored bytes unchanged (`Store.stored_layout`, verified against the stored
checksum) into the host tier or a staging buffer, the copy stream moves them into the tail
of the unit's slot, and the decode stream decodes them in place (`gpucodec.decode_unit`)
after the copy's event; the compute stream waits on the decode's event. The host tier
then holds coded bytes, and the link carries them."""

from __future__ import annotations

import torch

from .. import gpucodec
from ..budget import host_tier
from ..errors import TensorStreamError
from ..memory import pinned_empty
from .base import Context, PooledTransfer


def gpu_coded_units(ctx: Context) -> dict:
    """Unit index -> (stored layout, chunks) for the units whose stored bytes the GPU
    decodes: coded units of a store that records their stored checksum, every chunk of
    them in a mode `gpucodec` decodes. Other units are read decoded, as they are."""
    store = getattr(ctx.source, "store", None)
    if store is None:
        return {}
    out = {}
    for i, unit in enumerate(ctx.units):
        j = store.unit_index(unit.name)
        stored = None if j is None else store.stored_layout(j)
        if stored is None:
            continue
        chunks = store.chunks(j)
        if all(c.mode in gpucodec.GPU_MODES for c in chunks):
            out[i] = (stored, chunks)
    return out


def stage_coded(unit: gpucodec.CodedUnit, host: torch.Tensor, slot: torch.Tensor) -> None:
    """The copy a coded unit's stored bytes take: from host memory into the tail of its
    slot, where `gpucodec.decode_unit(unit, slot, slot)` decodes them in place. On CUDA it
    runs on the copy stream; the CPU tests run the same two steps on CPU tensors."""
    slot[unit.image_start : unit.buffer_len].copy_(host[: unit.image_len], non_blocking=True)


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


class CudaTransfer(PooledTransfer):
    kind = "cuda"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.pinned_bytes = 0
        self.copy_stream = torch.cuda.Stream(device=ctx.device)
        self.coded = gpu_coded_units(ctx)
        self.decode_stream = torch.cuda.Stream(device=ctx.device) if self.coded else None
        # What the engine reads for each unit: its stored bytes for a coded unit.
        self.reads = [self.coded[i][0] if i in self.coded else lay for i, lay in enumerate(ctx.layouts)]
        self.read_len = [lay.buffer_len for lay in self.reads]
        self.plans: dict = {}  # unit -> gpucodec.CodedUnit checked from its host bytes
        self.broken: dict = {}  # unit -> the error its stored bytes gave once read
        self.timings: list = []  # (start event, end event, bytes decoded), not yet collected
        self.pcie_bytes = 0
        self.delivered_bytes = 0
        self.decoded_bytes = 0
        self.decode_seconds = 0.0
        self.host_cache: dict = {}
        self.host_valid: set = set()
        self.host_plan: set = set()
        self.ring = None
        self._plan_host_cache()

    def _pinned(self, nbytes: int) -> torch.Tensor:
        """Pinned host memory, or pageable memory with a visible warning if pinning fails."""
        t, ok = pinned_empty(nbytes)
        if ok:
            self.pinned_bytes += nbytes
        else:
            self.ctx.fallback(
                "cudaHostRegister failed; host buffers are pageable, so copies to the GPU run about 8x slower"
            )
        return t

    def _plan_host_cache(self) -> None:
        room, note = host_tier(self.ctx.config)
        if note:
            self.ctx.fallback(note)
        for i, size in enumerate(self.read_len):
            if size <= room:
                self.host_plan.add(i)
                room -= size
        if len(self.host_plan) < len(self.ctx.units):
            self.ring = StagingRing(3, max(self.read_len), self._pinned)

    def _take_slot(self, i: int) -> torch.Tensor:
        slot = super()._take_slot(i)
        st = self.io[i]
        if st.slot_event is None:
            # A fresh allocation: kernels still queued on the compute stream (of an aborted
            # pass, say) may use this memory; the copy stream must wait for them.
            st.slot_event = torch.cuda.Event()
            st.slot_event.record(torch.cuda.current_stream(self.ctx.device))
        return slot

    def load(self, i: int, demand: bool) -> None:
        st = self.io[i]
        self._take_slot(i)
        if i in self.host_valid:
            self._h2d(i, self.host_cache[i])
            return
        if i in self.host_plan:
            host = self.host_cache.get(i)
            if host is None:
                host = self.host_cache[i] = self._pinned(self.read_len[i])
        else:
            st.staging = self.ring.acquire()
            host = self.ring.buffers[st.staging]
        st.ticket = self.engine.submit(self.reads[i], host.data_ptr(), self.read_len[i], demand, host)

    def _h2d(self, i: int, host: torch.Tensor) -> None:
        st = self.io[i]
        n = self.read_len[i]
        plan = self.plans.get(i)
        with torch.cuda.stream(self.copy_stream):
            if st.slot_event is not None:
                self.copy_stream.wait_event(st.slot_event)
            if plan is None:
                st.slot[:n].copy_(host[:n], non_blocking=True)
            else:
                stage_coded(plan, host, st.slot)
            st.slot.record_stream(self.copy_stream)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        st.ready_event = ev if plan is None else self._decode(i, plan, ev)
        st.slot_event = None
        self.ctx.counters.bytes_h2d += n
        self.pcie_bytes += n
        self.delivered_bytes += n if plan is None else plan.buffer_len
        if st.staging is not None:
            self.ring.release(st.staging, ev)  # the decode reads the slot, not the staging
            st.staging = None
        if i not in self.host_plan:
            self.plans.pop(i, None)

    def _decode(self, i: int, plan, copied):
        """Decode unit `i`'s stored bytes in its slot on the decode stream, after the copy
        event `copied`; returns the event after the decode."""
        slot = self.io[i].slot
        with torch.cuda.stream(self.decode_stream):
            self.decode_stream.wait_event(copied)
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.decode_stream)
            gpucodec.decode_unit(plan, slot, slot)
            end = torch.cuda.Event(enable_timing=True)
            end.record(self.decode_stream)
            slot.record_stream(self.decode_stream)
        self.timings.append((start, end, plan.raw_bytes))
        return end

    def _collect_timings(self, block: bool) -> None:
        """Add the decode times of the decodes that finished (all of them with `block`)."""
        pending = []
        for start, end, nbytes in self.timings:
            if block:
                end.synchronize()
            elif not end.query():
                pending.append((start, end, nbytes))
                continue
            self.decode_seconds += start.elapsed_time(end) / 1e3
            self.decoded_bytes += nbytes
        self.timings = pending

    def _finish_read(self, i: int) -> None:
        """Collect unit `i`'s disk read (waiting if needed) and start its copy to the GPU.
        A coded unit's stored bytes are checked on the host first (`gpucodec.parse_unit`);
        a unit whose bytes do not decode raises, now and whenever it is needed."""
        self._wait(i)
        host = self.host_cache[i] if i in self.host_plan else self.ring.buffers[self.io[i].staging]
        if i in self.coded:
            try:
                self.plans[i] = gpucodec.parse_unit(
                    host[: self.read_len[i]],
                    self.ctx.units[i].name,
                    self.coded[i][1],
                    self.ctx.layouts[i].buffer_len,
                )
            except TensorStreamError as e:
                self.broken[i] = e
                raise
        if i in self.host_plan:
            self.host_valid.add(i)
        self._h2d(i, host)

    def ready(self, i: int) -> tuple:
        # Start the copies of reads that finished meanwhile, so the link stays busy. A failed
        # one keeps its ticket and raises when its own unit needs it.
        for v, st in enumerate(self.io):
            if v != i and st.ticket is not None and st.ticket.is_finished():
                try:
                    self._finish_read(v)
                except TensorStreamError:
                    pass  # the ticket stays: its own unit's access raises the error
        if i in self.broken:
            raise self.broken[i]
        st = self.io[i]
        if st.ticket is not None:
            self._finish_read(i)
        if len(self.timings) > 64:
            self._collect_timings(block=False)
        if st.ready_event is not None:
            torch.cuda.current_stream(self.ctx.device).wait_event(st.ready_event)
        return self._bind_args(i)

    def after_compute(self, i: int) -> None:
        st = self.io[i]
        if st.slot is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.ctx.device))
            st.slot_event = ev

    def _cancel(self, i: int) -> None:
        super()._cancel(i)
        self.broken.pop(i, None)
        if i not in self.host_valid:
            self.plans.pop(i, None)
        st = self.io[i]
        if st.staging is not None and self.ring is not None:
            self.ring.release(st.staging, None)
        st.staging = None

    def close(self) -> None:
        try:
            self.copy_stream.synchronize()  # no copy may still write a buffer being freed
            if self.decode_stream is not None:
                self.decode_stream.synchronize()
        finally:
            super().close()

    def reset(self) -> None:
        super().reset()
        if self.ring is not None:  # an exception may have left a buffer marked busy
            self.ring.busy = [False] * len(self.ring.busy)

    def describe(self) -> str:
        if self.coded:
            return (
                f"cuda ({self.engine.backend_name} -> pinned, coded -> H2D copy stream -> GPU decode stream; "
                f"{len(self.coded)}/{len(self.ctx.units)} units coded)"
            )
        return f"cuda ({self.engine.backend_name} -> pinned -> H2D copy stream)"

    def extra_stats(self) -> dict:
        """The link's bytes and the GPU decoder's work: ``pcie_bytes`` (copied host to
        device), ``raw_bytes_delivered`` (the bytes those copies made in the slots, decoded),
        ``gpu_coded_units``, ``gpu_decode_seconds`` and ``gpu_decode_gbps`` (decoded bytes
        per second of the decode stream)."""
        self._collect_timings(block=True)
        secs = self.decode_seconds
        return {
            "pcie_bytes": self.pcie_bytes,
            "raw_bytes_delivered": self.delivered_bytes,
            "gpu_coded_units": len(self.coded),
            "gpu_decode_seconds": secs,
            "gpu_decode_gbps": self.decoded_bytes / secs / 1e9 if secs > 0 else 0.0,
        }
