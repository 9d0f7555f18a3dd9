"""CUDA: disk reads land in pinned host memory, the host tier (`host_cache_gb`, units
assigned in model order) or, for units outside it, a ring of three pinned staging buffers
allocated once; copies to GPU slots run on a dedicated stream. The compute stream waits on a
per-unit event; a slot is overwritten only after the event recorded after the compute that
used it; a staging buffer is reused only after its copy's event."""

from __future__ import annotations

import torch

from ..errors import TensorStreamError
from ..memory import available_ram, pinned_empty, total_ram
from .base import Context, PooledTransfer

GiB = 1 << 30


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
        self.read_len = [lay.buffer_len for lay in ctx.layouts]
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
        cfg = self.ctx.config
        cap = total_ram() // 2
        want = int(cfg.host_cache_gb * GiB) if cfg.host_cache_gb is not None else int(0.4 * available_ram())
        if want > cap:
            self.ctx.fallback(
                f"host_cache_gb={want / GiB:.1f} exceeds the pinned-memory cap of half the RAM; using {cap / GiB:.1f} GiB"
            )
            want = cap
        room = want
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
        st.ticket = self.engine.submit(self.ctx.layouts[i], host.data_ptr(), self.read_len[i], demand, host)

    def _h2d(self, i: int, host: torch.Tensor) -> None:
        st = self.io[i]
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
        self.ctx.counters.bytes_h2d += n
        if st.staging is not None:
            self.ring.release(st.staging, ev)
            st.staging = None

    def _finish_read(self, i: int) -> None:
        """Collect unit `i`'s disk read (waiting if needed) and start its copy to the GPU."""
        self._wait(i)
        if i in self.host_plan:
            self.host_valid.add(i)
            self._h2d(i, self.host_cache[i])
        else:
            self._h2d(i, self.ring.buffers[self.io[i].staging])

    def ready(self, i: int) -> tuple:
        # Start the copies of reads that finished meanwhile, so the link stays busy. A failed
        # one keeps its ticket and raises when its own unit needs it.
        for v, st in enumerate(self.io):
            if v != i and st.ticket is not None and st.ticket.is_finished():
                try:
                    self._finish_read(v)
                except TensorStreamError:
                    pass  # the ticket stays: its own unit's access raises the error
        st = self.io[i]
        if st.ticket is not None:
            self._finish_read(i)
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
        st = self.io[i]
        if st.staging is not None and self.ring is not None:
            self.ring.release(st.staging, None)
        st.staging = None

    def close(self) -> None:
        try:
            self.copy_stream.synchronize()  # no copy may still write a buffer being freed
        finally:
            super().close()

    def reset(self) -> None:
        super().reset()
        if self.ring is not None:  # an exception may have left a buffer marked busy
            self.ring.busy = [False] * len(self.ring.busy)

    def describe(self) -> str:
        return f"cuda ({self.engine.backend_name} -> pinned -> H2D copy stream)"
