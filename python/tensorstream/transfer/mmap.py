"""CPU, ``mmap``: the parameters are zero-copy views of a private read-only mapping of the
store. Loading a unit asks the I/O workers to fault it in (and verify its checksum the first
time); evicting it drops its pages from this process (MADV_DONTNEED), which returns them to
the page cache. Every view is valid at all times: residency only decides what is faulted in
ahead and what RSS holds."""

from __future__ import annotations

import mmap
import os
import warnings

import torch

from ..consts import MADV_DONTNEED
from ..sparse_kinds import page_span
from .base import Context, Transfer


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class MmapTransfer(Transfer):
    kind = "cpu-mmap"
    zero_copy = True
    reads_slices = True  # a sparse unit's slices are faulted into the store's mapping

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.map = mmap.mmap(ctx.source.fd, 0, access=mmap.ACCESS_COPY)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.base = torch.frombuffer(self.map, dtype=torch.uint8)
        self.offsets = [ctx.source.unit_offsets[u.name] for u in ctx.units]
        self.verified = [False] * len(ctx.units)
        # Faulting pages in is CPU work: when compute already uses every core, doing it
        # beside compute only stalls torch's threads. Do it at once, in parallel, then compute.
        self.fault_in_now = torch.get_num_threads() >= _usable_cores()
        for i in range(len(ctx.units)):
            ctx.placement.bind(i, self.base, self.offsets[i])
            ctx.placement.set_bound(i, False)

    def load(self, i: int, demand: bool) -> None:
        lay = self.ctx.layouts[i]
        layout = lay if not self.verified[i] else lay.without_checksum()
        ptr = self.base.data_ptr() + self.offsets[i]
        self.io[i].ticket = self.engine.submit_populate(layout, ptr, demand, self.base)

    def _finish(self, i: int) -> None:
        if self.io[i].ticket is not None:
            self._wait(i)
            self.verified[i] = True

    def prefetched(self, units: list) -> None:
        if self.fault_in_now:
            for v in units:
                self._finish(v)

    def ready(self, i: int) -> None:
        self._finish(i)
        return None

    def evict(self, i: int) -> None:
        self._cancel(i)
        self.map.madvise(MADV_DONTNEED, self.offsets[i], self.ctx.sizes[i])

    def held_bytes(self) -> int:
        return self.ctx.planner_used()

    @property
    def reads_verified(self) -> bool:
        return False  # a mapping is verified once, when it is first faulted in

    def private_bytes(self, held: int) -> int:
        return 0  # page cache, which the free memory counts

    def _unbind_all(self) -> None:
        for i in range(len(self.ctx.units)):
            self.ctx.placement.set_bound(i, False)  # the views stay valid

    def load_slices(self, i: int, layout, demand: bool):
        return self.engine.submit_populate(layout, self.base.data_ptr() + self.offsets[i], demand, self.base)

    def drop_slices(self, i: int, ranges: list, held) -> None:
        """A mapping of the store refaults a dropped page with its content: every page goes."""
        for o, b in ranges:
            lo, n = page_span(self.offsets[i] + o, b)
            self.map.madvise(MADV_DONTNEED, lo, n)

    def bind_slices(self, i: int) -> None:
        self.computes()
        self.ctx.placement.set_bound(i, True)

    def describe(self) -> str:
        return "mmap (zero-copy views)"

    def close(self) -> None:
        super().close()
        self.base = None
        try:
            self.map.close()
        except BufferError:
            pass  # views still exported; the mapping goes when they do
