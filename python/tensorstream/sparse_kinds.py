"""What a sparse unit is: a unit read slice by slice, only the slices its forward's input
names (see :mod:`tensorstream.sparse` for their residency).

- **Experts** (:attr:`SparseKind.EXPERTS`). transformers' mixture-of-experts families keep a
  layer's experts in one module whose parameters are fused ``[num_experts, ...]`` tensors,
  called as ``experts(hidden_states, top_k_index, top_k_weights)`` after the router ran
  (:func:`is_experts`). By default such a module is a unit of its own
  (:func:`tensorstream.units.analyse`). A slice is an expert: the ``e``-th slice of each fused
  tensor, contiguous in the store.
- **Rows** (:attr:`SparseKind.ROWS`). An embedding (:func:`is_rows`) reads one row per token.
  A slice is a block of rows (about ``ROW_BLOCK`` bytes). With
  ``Config(sparse_embeddings=True)`` an untied input embedding streams this way on the CPU
  (:func:`tensorstream.budget.streamed_subset`), so its budget goes to the layers; a head is
  dense and a tied embedding stays as it was.

Adding a kind: a member of :class:`SparseKind`, its test in :func:`kind_of`, its slicing in
:func:`slicing` and :func:`slice_ranges`, its share in :func:`share_bounds`, and how a call
names its slices in :meth:`tensorstream.sparse.SparseCache.run`.
"""

from __future__ import annotations

import enum
import inspect
import math
from typing import Optional

import torch
from torch import nn

from .consts import PAGE

ROW_BLOCK = 64 << 10
"""Bytes of an embedding's slice (whole rows, a multiple of a page where the rows allow)."""
ROWS_HELD = 64
"""Slices of an embedding the cache's share asks for where the budget has room (it works
with one)."""
INDEX_ARGUMENTS = ("top_k_index", "router_indices")
"""The names transformers' experts forwards give the routed experts (GPT-OSS: router_indices)."""
SPARSE_IMPLEMENTATIONS = frozenset((None, "eager", "grouped_mm", "batched_mm"))
"""transformers' experts implementations that read only the routed experts' slices."""


class SparseKind(enum.Enum):
    """The kinds of sparse unit; the value is the key of its entry in the statistics."""

    EXPERTS = "experts"
    ROWS = "embedding"


def is_experts(module: nn.Module) -> bool:
    """True for a module of fused experts called after routing: an int ``num_experts``,
    parameters that are all ``[num_experts, ...]`` tensors, no children holding parameters,
    and a forward taking the routed experts (``top_k_index``, GPT-OSS's ``router_indices``)."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or n < 2:
        return False
    params = [p for p in module._parameters.values() if p is not None]
    if not params or any(p.dim() < 2 or p.shape[0] != n for p in params):
        return False
    if any(True for c in module.children() for _ in c.parameters()):
        return False
    try:
        sig = inspect.signature(type(module).forward)
    except (TypeError, ValueError):
        return False
    return any(name in sig.parameters for name in INDEX_ARGUMENTS)


def is_rows(spec) -> bool:
    """True for a unit that is one embedding, read a row per token: an ``nn.Embedding``
    streaming only its own 2-D weight, without ``max_norm`` (which writes the rows)."""
    if len(spec.modules) != 1 or len(spec.params) != 1:
        return False
    m = spec.modules[0]
    p = spec.params[0]
    return isinstance(m, nn.Embedding) and m.max_norm is None and p.attr == "weight" and len(p.shape) == 2


def router_of(parent: nn.Module, experts: nn.Module) -> Optional[nn.Module]:
    """The router beside `experts` in `parent`: a child with a ``[num_experts, hidden]``
    weight (the gate of Mixtral, Qwen-MoE, DeepSeek and the others)."""
    for child in parent.children():
        w = getattr(child, "weight", None)
        if child is not experts and isinstance(w, torch.Tensor) and w.dim() == 2:
            if w.shape[0] == experts.num_experts:
                return child
    return None


def experts_and_routers(block: nn.Module) -> list:
    """(experts module, its router or None) of every experts module inside `block`."""
    out = []
    for parent in block.modules():
        for child in parent.children():
            if is_experts(child):
                out.append((child, router_of(parent, child)))
    return out


def streams_sparse(device: torch.device) -> bool:
    """Whether sparse units stream slice by slice on `device` (the CPU paths)."""
    return device.type == "cpu"


def kind_of(spec, rows: bool) -> Optional[SparseKind]:
    """The unit's kind (embeddings stream sparse only if `rows`), or None (a dense unit)."""
    if len(spec.modules) == 1 and is_experts(spec.modules[0]):
        return SparseKind.EXPERTS
    return SparseKind.ROWS if rows and is_rows(spec) else None


def _row_block(row_bytes: int) -> int:
    """Rows per slice: about ROW_BLOCK bytes, whole pages where the rows allow."""
    per_page = PAGE // math.gcd(row_bytes, PAGE)  # rows that fill whole pages
    rows = max(ROW_BLOCK // row_bytes, 1)
    return max(rows // per_page, 1) * per_page if rows >= per_page else rows


def slicing(spec) -> tuple:
    """(slices, rows per slice or None) of a sparse unit."""
    if kind_of(spec, rows=False) is SparseKind.EXPERTS:
        return spec.modules[0].num_experts, None
    rows, width = spec.params[0].shape
    row_bytes = width * spec.params[0].get().element_size()
    per = _row_block(row_bytes)
    return -(-rows // per), per


def slice_ranges(kind: SparseKind, spec, slots: list, slices: int, per: Optional[int]) -> list:
    """Per slice, [(offset, nbytes)] of its bytes in each of the unit's stored tensors
    (`slots`: the unit's :class:`tensorstream.placement.ParamSlot` s)."""
    ranges = [[] for _ in range(slices)]
    for slot in slots:
        if kind is SparseKind.EXPERTS:
            step = slot.part.nbytes // slices
            for e in range(slices):
                ranges[e].append((slot.part.offset + e * step, step))
        else:
            row = slot.part.nbytes // spec.params[0].shape[0]
            for s in range(slices):
                lo = s * per * row
                ranges[s].append((slot.part.offset + lo, min(per * row, slot.part.nbytes - lo)))
    return ranges


def page_span(offset: int, nbytes: int) -> tuple:
    """The pages a byte range touches: (first page's offset, bytes to its last page's end)."""
    lo = offset // PAGE * PAGE
    hi = (offset + nbytes + PAGE - 1) // PAGE * PAGE
    return lo, hi - lo


def share_bounds(units: list, sizes: list, rows: bool) -> tuple:
    """(the least share of the budget the sparse cache works with, the share it asks for
    where the budget has room) for these units: the largest experts unit (a prefill may
    route to every expert) and an embedding's slice; the share asked for holds `ROWS_HELD`
    of an embedding's slices."""
    least = wanted = 0
    for u, size in zip(units, sizes):
        kind = kind_of(u, rows)
        if kind is SparseKind.EXPERTS:
            least, wanted = max(least, size), max(wanted, size)
        elif kind is SparseKind.ROWS:
            n, _per = slicing(u)
            block = min(size, size // n + 2 * PAGE)  # a slice, with the pages it may straddle
            least, wanted = max(least, block), max(wanted, min(size, ROWS_HELD * block))
    return least, wanted


def sparse_units(units: list, rows: bool) -> list:
    """Positions of the sparse units in `units`."""
    return [i for i, u in enumerate(units) if kind_of(u, rows)]
