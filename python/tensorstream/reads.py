"""Reads outside the planner: a streamed weight's real value when something reads it
outside its unit's forward (``state_dict()``, ``torch.save``, ``save_pretrained``, printing a
weight), and tensors autograd saved from a slot, read again when backward needs them.

None of these count against the budget's window: a value read here lives in a private,
copy-on-write map of the file where the source stores the bytes as they are (no memory is
taken until it is read, and the page cache can drop it), else in a copy of its own; at most
one unit's buffer is cached for the copies.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
from collections import namedtuple
from functools import partial
from typing import Optional

import torch

from .memory import aligned_empty


class _Saved(namedtuple("_Saved", "unit offset shape stride dtype device")):
    """A tensor autograd saved from a slot: where it was, to be read again for backward."""


class Reads:
    """The reads outside the planner of one runtime."""

    def __init__(self, runtime):
        self.rt = runtime
        self._cached: Optional[tuple] = None  # (unit, buffer)

    def clear(self) -> None:
        self._cached = None

    def unit_buffer(self, i: int) -> torch.Tensor:
        """Unit `i`'s bytes in a fresh CPU buffer laid out like its slot (converted
        parameters built in the tail)."""
        rt = self.rt
        with rt.lock:
            if self._cached is not None and self._cached[0] == i:
                return self._cached[1]
            rt.ensure_configured()
            self._cached = None
            buf = aligned_empty(rt.sizes[i])
            rt.engine.wait(rt.engine.submit(rt.layouts[i], buf.data_ptr(), buf.numel(), True, buf))
            with torch._C.DisableTorchFunctionSubclass():
                rt.placement.values(i, buf, 0, convert=True)
            self._cached = (i, buf)
            return buf

    def param_value(self, i: int, k: int) -> torch.Tensor:
        """The real value of unit `i`'s parameter `k`, on the CPU, in memory of its own."""
        rt = self.rt
        with torch._C.DisableTorchFunctionSubclass():
            slot = rt.placement.slots[i][k]
            if slot.converted_at is None:
                mapped = _map_tensor(rt.source, rt.units[i].name, slot)
                if mapped is not None:
                    return mapped
            return rt.placement.values(i, self.unit_buffer(i))[k].clone()

    def saved_tensor_guard(self):
        """In grad mode, autograd may save a parameter (or a view of it) for backward. A slot
        is reused once its unit is evicted, and an evicted expert's pages come back as zeros,
        so a saved tensor that lives in a slot or a sparse unit's buffer is packed as (unit,
        offset, shape) and read again from the source when backward needs it."""
        rt = self.rt
        tr = rt.transfer
        if not torch.is_grad_enabled() or tr is None:
            return contextlib.nullcontext()
        # No unit is loaded or evicted while a unit computes: the slots in use are these.
        slots = tr.slot_storages()
        if not slots:
            return contextlib.nullcontext()
        return torch.autograd.graph.saved_tensors_hooks(partial(self._pack, slots), self._unpack)

    def _pack(self, slots: dict, t: torch.Tensor):
        hit = slots.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        i, slot = hit
        return _Saved(i, t.data_ptr() - slot.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)

    def _unpack(self, s):
        if not isinstance(s, _Saved):
            return s
        base = self.unit_buffer(s.unit).view(s.dtype)
        itemsize = base.element_size()
        t = torch.as_strided(base, s.shape, s.stride, base.storage_offset() + s.offset // itemsize)
        return t.to(s.device) if s.device != t.device else t


def _map_tensor(source, unit: str, slot) -> Optional[torch.Tensor]:
    """A tensor over a private copy-on-write mapping of the file bytes of `slot`'s part, or
    None where the source cannot give them as they are."""
    part = slot.part
    span = source.span(unit, part)
    if span is None or part.nbytes == 0:
        return None
    fd, offset = span
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    inner = offset - start
    if inner % torch.empty((), dtype=part.dtype).element_size():
        return None
    m = mmap.mmap(fd, inner + part.nbytes, access=mmap.ACCESS_COPY, offset=start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = torch.frombuffer(m, dtype=torch.uint8)
    return raw[inner : inner + part.nbytes].view(part.dtype).view(slot.shape)
