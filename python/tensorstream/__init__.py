"""TensorStream: run PyTorch models larger than GPU memory or RAM by streaming their blocks'
weights from disk just in time, with bit-identical outputs, within a memory budget.

    import tensorstream
    model = tensorstream.offload(model, tensorstream.Config("/tmp/ts", vram_budget_gb=4))
"""

from __future__ import annotations

from torch import nn

from . import _core
from .config import BackendType, Config, MemoryPressureMode, PrefetchStrategy, create_default_config
from .errors import (
    BudgetError,
    ConfigError,
    InvalidArgumentError,
    OutOfMemoryError,
    StoreCorruptedError,
    StoreMismatchError,
    StreamIOError,
    TensorStreamError,
)
from .hf import convert, from_pretrained
from .offload import offload, runtime_of
from .pressure import MemoryReading, set_memory_probe
from .stats import MemoryPressureEvent, set_memory_pressure_callback
from .units import resident_bytes

__version__ = _core.__version__


def get_model_statistics(model: nn.Module) -> dict:
    """Statistics of an offloaded model: budget and usage, residency, hit rates, bytes read
    and copied, the backend actually in use (after AUTO and any fallback), stall time."""
    return runtime_of(model).statistics()


def estimate_model_memory(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once), whether or
    not it is offloaded."""
    return resident_bytes(model, [])


__all__ = [
    "Config",
    "BackendType",
    "PrefetchStrategy",
    "MemoryPressureMode",
    "offload",
    "from_pretrained",
    "convert",
    "get_model_statistics",
    "create_default_config",
    "estimate_model_memory",
    "set_memory_pressure_callback",
    "MemoryPressureEvent",
    "set_memory_probe",
    "MemoryReading",
    "TensorStreamError",
    "ConfigError",
    "InvalidArgumentError",
    "BudgetError",
    "OutOfMemoryError",
    "StoreCorruptedError",
    "StoreMismatchError",
    "StreamIOError",
]
