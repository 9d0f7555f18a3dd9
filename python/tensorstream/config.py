"""Configuration: :class:`Config` and the enums of the public API.

Every field is validated when the Config is made; an invalid value raises
:class:`~tensorstream.errors.ConfigError` (a ``ValueError``) naming the field and what is allowed.
Enum fields accept the enum member or its plain string (``"mmap"``, ``"next_layer"``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Union

from .errors import ConfigError
from .progress import show_progress


class BackendType(str, Enum):
    """How unit bytes get from disk to the device that runs the model."""

    AUTO = "auto"
    """CUDA pinned copies when the model runs on a GPU; on CPU, MMAP when the store fits
    comfortably in the page cache, else PREAD."""
    GPUDIRECT = "gpudirect"
    """GPUDirect Storage (cuFile). Probed at run time; falls back visibly to CUDA when
    cuFile cannot register the file."""
    CUDA = "cuda"
    """O_DIRECT reads into pinned host buffers, then asynchronous copies on a side stream."""
    MMAP = "mmap"
    """Memory-mapped store. On CPU the parameters are zero-copy views of the mapping."""
    PREAD = "pread"
    """pread with O_DIRECT into budgeted buffers: bypasses the page cache (larger than RAM)."""


class PrefetchStrategy(str, Enum):
    """How far ahead units are loaded."""

    NONE = "none"
    """Load on demand only; LRU eviction."""
    NEXT_LAYER = "next_layer"
    """Prefetch the next unit in model order while the current one runs; LRU eviction."""
    ADAPTIVE = "adaptive"
    """Learn the access order in the first forward; keep a fixed subset resident and
    prefetch the rest ahead, across forward boundaries."""


class MemoryPressureMode(str, Enum):
    """How eagerly the budget is used. See "Residency" in docs/design.md."""

    CONSERVATIVE = "conservative"
    """Streamed units are dropped as soon as they have run; only the kept set stays between
    forwards. One unit of prefetch."""
    BALANCED = "balanced"
    """Streamed units are dropped lazily, when room is needed. One unit of prefetch."""
    AGGRESSIVE = "aggressive"
    """Lazy eviction and two units of prefetch: hides more latency, keeps one unit fewer."""


EnumLike = Union[str, Enum]


def _coerce(enum_cls: type[Enum], value: EnumLike, field_name: str) -> Enum:
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        key = value.strip().lower()
        for member in enum_cls:
            if key in (member.value, member.name.lower()):
                return member
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(
        f"Config.{field_name}={value!r} is not valid; allowed: {allowed} (or {enum_cls.__name__} members)"
    )


@dataclass
class Config:
    """Settings of :func:`tensorstream.offload` and :func:`tensorstream.from_pretrained`.

    Fields (each also documented where it is declared):

    - ``storage_path``: the directory that holds the stores (required).
    - ``vram_budget_gb``: the budget, in GiB, for the model weights TensorStream keeps on the
      device that runs the model: the modules that are not streamed, the resident units and
      the buffers in flight. Activations and the KV cache belong to the model and sit
      outside it. On a CPU-only run the device is host RAM. ``None`` picks a default: on CPU
      the available RAM minus a headroom of max(2 GiB, 10%); on CUDA 80% of the free device
      memory.
    - ``backend`` (``"auto"``): how unit bytes reach the device, a :class:`BackendType`. One
      that cannot run where the model runs falls back visibly (a warning and an entry in
      ``get_model_statistics(model)["fallbacks"]``).
    - ``prefetch_strategy`` (``"adaptive"``): how far ahead units are loaded, a
      :class:`PrefetchStrategy`.
    - ``compression_enabled`` (``False``), ``compression_level`` (3, from 1 to 9): write the
      store compressed losslessly, at that zstd level.
    - ``num_io_threads`` (4, from 1 to 64): the I/O worker threads of each read engine.
    - ``memory_pressure_mode`` (``"balanced"``): how eagerly the budget is used and the
      default memory headroom, a :class:`MemoryPressureMode`.
    - ``debug_mode`` (``False``): log each unit access and the runtime's decisions at DEBUG
      level on the ``tensorstream`` logger (set up with ``logging.basicConfig``).
    - ``host_cache_gb`` (``None``): CUDA only, pinned host RAM that keeps units between
      forwards; ``None`` 40% of the available RAM, ``0`` none; at most half the RAM.
    - ``units`` (``None``): the streamable units, as module or class names; ``None``: the
      blocks of the model's largest ModuleList or Sequential.
    - ``overwrite_store`` (``False``): replace a store at the same path written for another
      model instead of raising ``StoreMismatchError``.
    - ``store_name`` (``None``): the store's file name under ``storage_path``; ``None``:
      ``<ModelClass>.tstore``.
    - ``chunk_mb`` (8, a multiple of 4 from 4 to 1024): the size of one read request, MiB.
    - ``sparse_embeddings`` (``False``): on the CPU paths, stream an untied input embedding
      by rows, reading only the rows a forward looks up.
    - ``memory_headroom_gb`` (``None``): the free memory below which the budget yields;
      ``None``: 10%, 5% or 2% of the device's memory by ``memory_pressure_mode``.
    - ``progress`` (``None``): show a progress bar (tqdm, on stderr) while a store is written
      or a checkpoint converted; ``None``: when stderr is a terminal. ``False`` turns it off.

    Example::

        config = tensorstream.Config("/fast/nvme/ts", vram_budget_gb=3, backend="pread")
    """

    storage_path: Union[str, os.PathLike]
    """The directory that holds the stores."""
    vram_budget_gb: Optional[float] = None
    """GiB of weights kept on the device that runs the model (see the class docstring)."""
    backend: EnumLike = BackendType.AUTO
    """How unit bytes reach the device (:class:`BackendType`)."""
    prefetch_strategy: EnumLike = PrefetchStrategy.ADAPTIVE
    """How far ahead units are loaded (:class:`PrefetchStrategy`)."""
    compression_enabled: bool = False
    """Write the store compressed losslessly."""
    compression_level: int = 3
    """The zstd level of a compressed store, 1 to 9."""
    num_io_threads: int = 4
    """I/O worker threads of each read engine, 1 to 64."""
    memory_pressure_mode: EnumLike = MemoryPressureMode.BALANCED
    """How eagerly the budget is used (:class:`MemoryPressureMode`)."""
    debug_mode: bool = False
    """Log each unit access and the runtime's decisions at DEBUG level (logger ``tensorstream``)."""
    host_cache_gb: Optional[float] = None
    """CUDA only: pinned host RAM that keeps units so repeated forwards skip the disk.
    ``None``: 40% of the available RAM; ``0`` disables it. Always capped at half the
    machine's RAM (pinned memory cannot be swapped; pinning all of it cripples a machine)."""
    units: Optional[Sequence[str]] = None
    """Streamable units, as module names (``"model.layers.0"``) or class names
    (``"LlamaDecoderLayer"``). ``None``: the children of the model's largest ModuleList
    (or Sequential): the blocks of a transformer."""
    overwrite_store: bool = False
    """Replace a store at the same path that was written for another model, instead of
    raising StoreMismatchError."""
    store_name: Optional[str] = None
    """File name of the store under storage_path (default: the model's class name)."""
    chunk_mb: int = 8
    """I/O request size in MiB (a multiple of 4)."""
    sparse_embeddings: bool = False
    """On the CPU paths, stream an untied input embedding a block of rows at a time, reading
    only the rows of the tokens a forward looks up, so that its budget goes to the layers
    (:mod:`tensorstream.sparse`). Off: it stays resident unless the budget cannot hold it."""
    memory_headroom_gb: Optional[float] = None
    """Free memory on the device below which the budget yields (memory pressure): the
    planner gives up kept units, then prefetch, until one and a half headrooms are free, and
    takes them back when more than two are. ``None``: a share of the device's capacity by
    ``memory_pressure_mode``: 10% conservative, 5% balanced, 2% aggressive."""
    progress: Optional[bool] = None
    """A progress bar (tqdm, on stderr) while a store is written or a checkpoint converted.
    ``None``: shown when stderr is a terminal; ``True`` always; ``False`` never."""

    def __post_init__(self) -> None:
        if not isinstance(self.storage_path, (str, os.PathLike)) or str(self.storage_path) == "":
            raise ConfigError(f"Config.storage_path={self.storage_path!r} must be a non-empty path")
        if "\x00" in os.fspath(self.storage_path):
            raise ConfigError(f"Config.storage_path={self.storage_path!r} contains a NUL byte")
        if self.vram_budget_gb is not None:
            if isinstance(self.vram_budget_gb, bool) or not isinstance(self.vram_budget_gb, (int, float)):
                raise ConfigError(
                    f"Config.vram_budget_gb={self.vram_budget_gb!r} must be a number of GB or None"
                )
            if not (self.vram_budget_gb > 0) or self.vram_budget_gb == float("inf"):
                raise ConfigError(
                    f"Config.vram_budget_gb={self.vram_budget_gb!r} must be a positive, finite number of GB"
                )
            if self.vram_budget_gb * (1 << 30) >= 1 << 63:
                raise ConfigError(
                    f"Config.vram_budget_gb={self.vram_budget_gb!r} is more memory than a machine has"
                )
        self.backend = _coerce(BackendType, self.backend, "backend")
        self.prefetch_strategy = _coerce(PrefetchStrategy, self.prefetch_strategy, "prefetch_strategy")
        self.memory_pressure_mode = _coerce(
            MemoryPressureMode, self.memory_pressure_mode, "memory_pressure_mode"
        )
        for name in ("compression_enabled", "debug_mode", "overwrite_store", "sparse_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Config.{name}={getattr(self, name)!r} must be True or False")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigError(f"Config.progress={self.progress!r} must be True, False or None")
        _check_int(self, "compression_level", 1, 9)
        _check_int(self, "num_io_threads", 1, 64)
        _check_int(self, "chunk_mb", 4, 1024)
        if self.chunk_mb % 4:
            raise ConfigError(f"Config.chunk_mb={self.chunk_mb} must be a multiple of 4")
        for name in ("host_cache_gb", "memory_headroom_gb"):
            _check_gb(self, name)
        if self.units is not None:
            if isinstance(self.units, str) or not all(isinstance(u, str) and u for u in self.units):
                raise ConfigError(f"Config.units={self.units!r} must be a list of module or class names")
            self.units = list(self.units)
        if self.store_name is not None and (
            not self.store_name or "/" in self.store_name or self.store_name in (".", "..")
        ):
            raise ConfigError(f"Config.store_name={self.store_name!r} must be a plain file name")

    @property
    def shows_progress(self) -> bool:
        """Whether writing a store shows a progress bar: ``progress``, or when it is None
        whether stderr is a terminal."""
        return show_progress(self.progress)

    @property
    def budget_bytes(self) -> Optional[int]:
        """The budget in bytes, or None for the device's default."""
        return None if self.vram_budget_gb is None else int(self.vram_budget_gb * (1 << 30))


def _check_gb(cfg: Config, name: str) -> None:
    v = getattr(cfg, name)
    if v is not None and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")
    ):
        raise ConfigError(f"Config.{name}={v!r} must be a number of GB >= 0 or None")


def _check_int(cfg: Config, name: str, lo: int, hi: int) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"Config.{name}={v!r} must be an integer from {lo} to {hi}")


def create_default_config(storage_path: Union[str, os.PathLike]) -> Config:
    """A Config with every default: automatic backend and budget, adaptive prefetch."""
    return Config(storage_path=storage_path)


__all__ = [
    "Config",
    "BackendType",
    "PrefetchStrategy",
    "MemoryPressureMode",
    "create_default_config",
    "field",
]
