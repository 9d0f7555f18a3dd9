"""CPU, ``pread``: units are read with O_DIRECT into 4 KiB-aligned buffers from a budgeted
slot pool, bypassing the page cache (for models larger than RAM). Filesystems that refuse
O_DIRECT are read buffered; it shows in the statistics and warns."""

from __future__ import annotations

from .base import PooledTransfer


class PreadTransfer(PooledTransfer):
    kind = "cpu-pread"

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
