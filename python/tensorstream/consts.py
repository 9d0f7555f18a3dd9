"""Byte constants and dtype tables: the one place each is defined."""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import torch

PAGE = 4096
"""Bytes of a page: buffers and slices are aligned to it."""

GiB = 1 << 30

MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)
"""madvise advice that drops pages from this process (a file mapping refaults them)."""

TORCH_TO_ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""torch dtypes and their safetensors names (the store's dtype names)."""
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        TORCH_TO_ST[getattr(torch, _name)] = _st
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def tensor_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of `shape` and `dtype`."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to
