"""CPU, ``pread``: units are read with O_DIRECT into 4 KiB-aligned buffers from a budgeted
slot pool, bypassing the page cache (for models larger than RAM). Filesystems that refuse
O_DIRECT are read buffered; it shows in the statistics and warns.

A sparse unit's slices are read into a private anonymous mapping of the unit's size, whose
pages are committed only where a slice was read (a shared one is shmem: MADV_DONTNEED would
free nothing)."""

from __future__ import annotations

import mmap
import warnings

import torch

from ..consts import MADV_DONTNEED, PAGE
from ..sparse_kinds import page_span
from .base import Context, PooledTransfer


class PreadTransfer(PooledTransfer):
    kind = "cpu-pread"
    reads_slices = True

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.slice_buffers: dict = {}  # sparse unit -> (its private anonymous mapping, a tensor over it)

    def load(self, i: int, demand: bool) -> None:
        buf = self._take_slot(i)
        self.io[i].ticket = self.engine.submit(self.ctx.layouts[i], buf.data_ptr(), buf.numel(), demand, buf)

    def ready(self, i: int) -> tuple:
        if self.io[i].ticket is not None:
            self._wait(i)
        return self._bind_args(i)

    def describe(self) -> str:
        name = self.engine.backend_name
        return "pread (O_DIRECT)" if name == "pread" else name

    def slot_storages(self) -> dict:
        out = super().slot_storages()
        out.update(
            {buf.untyped_storage().data_ptr(): (i, buf) for i, (_m, buf) in self.slice_buffers.items()}
        )
        return out

    def _slice_buffer(self, i: int) -> tuple:
        got = self.slice_buffers.get(i)
        if got is None:
            m = mmap.mmap(-1, self.ctx.sizes[i], flags=mmap.MAP_PRIVATE)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = self.slice_buffers[i] = (m, torch.frombuffer(m, dtype=torch.uint8))
        return got

    def load_slices(self, i: int, layout, demand: bool):
        buf = self._slice_buffer(i)[1]
        return self.engine.submit(layout, buf.data_ptr(), buf.numel(), demand, buf)

    def drop_slices(self, i: int, ranges: list, held) -> None:
        """An anonymous buffer refaults zeros, so a page a range shares with a slice still
        held stays (that slice's cost counts it)."""
        m = self._slice_buffer(i)[0]
        for o, b in ranges:
            lo, n = page_span(o, b)
            hi = lo + n
            if lo < o and held(lo):
                lo += PAGE
            if hi > o + b and hi - PAGE >= lo and held(hi - PAGE):
                hi -= PAGE
            if hi > lo:
                m.madvise(MADV_DONTNEED, lo, hi - lo)

    def bind_slices(self, i: int) -> None:
        self.computes()
        pl = self.ctx.placement
        pl.bind(i, self._slice_buffer(i)[1], 0, pl.converts[i])

    def release_slices(self, i: int) -> None:
        self.ctx.placement.unbind(i, self.ctx.device)

    def close(self) -> None:
        super().close()
        for m, _t in self.slice_buffers.values():
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with it
        self.slice_buffers = {}
