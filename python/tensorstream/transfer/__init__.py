"""Transfer paths: one per way of getting a unit's bytes to the device that runs it
(`cpu-mmap`, `cpu-pread`, `cuda`), each in its own module behind the interface of
:mod:`.base`, and :func:`select_path`, the one place that picks a path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import BackendType, Config
from .base import Context, Transfer
from .cuda import CudaTransfer
from .mmap import MmapTransfer
from .pread import PreadTransfer

PATHS = {t.kind: t for t in (MmapTransfer, PreadTransfer, CudaTransfer)}


@dataclass(frozen=True)
class PathChoice:
    """The transfer path for a run, the engine backend that feeds it, and any fallback."""

    kind: str
    """``cpu-mmap``, ``cpu-pread`` or ``cuda``."""
    engine_backend: str
    """The engine's read backend, named as BackendType names it: ``mmap`` (reads through the
    page cache) or ``pread`` (O_DIRECT)."""
    fallback: Optional[str] = None
    """Why the path differs from the one asked for (warned and listed in the statistics)."""
    fallback_if_run: Optional[str] = None
    """A fallback that only counts once a forward runs on this device (CUDA asked for, but
    the model is still on CPU: offload first, then ``model.to("cuda")`` is the usual order)."""


def select_path(
    config: Config,
    device: torch.device,
    zero_copy: bool,
    store_bytes: int,
    available_ram: int,
    gds_unavailable: Optional[str] = None,
) -> PathChoice:
    """Pick the transfer path from the config, the device and the source: `zero_copy` says
    whether the source's units can be mapped as they are (an uncompressed store),
    `store_bytes` its size; `gds_unavailable` is why GPUDirect Storage cannot run here (from
    the probe), when it was asked for."""
    requested = config.backend
    engine_backend = "mmap" if requested == BackendType.MMAP else "pread"
    if device.type == "cuda":
        fallback = None
        if requested == BackendType.GPUDIRECT:
            fallback = f"{gds_unavailable}; falling back to pinned-memory CUDA copies"
        return PathChoice("cuda", engine_backend, fallback)
    if requested in (BackendType.CUDA, BackendType.GPUDIRECT):
        return PathChoice(
            "cpu-pread",
            engine_backend,
            fallback_if_run=(
                f"backend {requested.value!r} needs the model on a CUDA device; it runs on CPU, "
                "so units are read with O_DIRECT pread"
            ),
        )
    if requested == BackendType.MMAP:
        # A compressed store is decoded into budgeted buffers, read through the page cache.
        return PathChoice("cpu-mmap" if zero_copy else "cpu-pread", engine_backend)
    if requested == BackendType.PREAD:
        return PathChoice("cpu-pread", engine_backend)
    mapped = zero_copy and store_bytes < 0.5 * available_ram
    return PathChoice("cpu-mmap" if mapped else "cpu-pread", engine_backend)


def probe_gds(path: str) -> str:
    """Why GPUDirect Storage cannot read `path` here. cuFile must register the file; on
    machines without the nvidia-fs driver that fails, and even where it works, direct reads
    are not implemented in this version."""
    try:
        from torch.cuda import gds

        f = gds.GdsFile(path, 0)  # os.O_RDONLY
        del f
        return "GPUDirect Storage registered the store, but direct reads are not implemented in this version"
    except Exception as e:  # noqa: BLE001 - any failure means no GDS here
        return f"GPUDirect Storage is unavailable ({type(e).__name__}: {e})"


__all__ = ["PATHS", "PathChoice", "select_path", "probe_gds", "Context", "Transfer"]
