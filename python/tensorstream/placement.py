"""Placement: where each streamed parameter lives inside its unit's buffer, and binding the
parameters to a buffer or unbinding them.

A unit's buffer holds its stored tensors as the source lays them out (the read layout). A
parameter whose stored dtype differs from the model's, or that is assembled from several
stored tensors (fused experts), is built in the tail of the same buffer, so it costs no
memory outside the budget. :func:`slot_sizes` is the one formula for a unit's buffer size.

Streamed parameters are :class:`StreamedParameter` objects (an ``nn.Parameter`` subclass,
set on the model's own parameter objects, so optimizers and adapters keep their
references). While a unit is not bound, its parameters hold a zero-memory placeholder and any
torch operation on them reads the real values from the source instead
(:meth:`Runtime.param_value`); writes are refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import StoreMismatchError, TensorStreamError
from .units import ST_TO_TORCH, _itemsize, _numel

PAGE = 4096


@dataclass(frozen=True)
class Part:
    """One stored tensor inside a unit's buffer."""

    name: str
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ParamSlot:
    """Where one streamed parameter's bytes are in its unit's buffer."""

    parts: tuple
    shape: tuple
    dtype: torch.dtype
    converted_at: Optional[int]
    """Offset of the parameter built in the buffer's tail, or None: a view of its one part."""


def _param_slots(unit, layout, path: str) -> tuple:
    """(the unit's ParamSlots, its buffer size)."""
    by_name = {t.name: t for t in layout.tensors}
    slots, tail = [], layout.buffer_len
    for p in unit.params:
        parts, numel, shape = [], 0, ()
        for name in p.source_names:
            t = by_name[name]
            parts.append(Part(name, ST_TO_TORCH[t.dtype], t.offset, t.nbytes))
            numel += _numel(t.shape)
            shape = t.shape
        if (len(parts) == 1 and tuple(shape) != tuple(p.shape)) or numel != _numel(p.shape):
            raise StoreMismatchError(
                f"{path}: tensor {p.store_name!r} of unit {unit.name!r} has shape {tuple(shape)}, "
                f"the model expects {tuple(p.shape)}"
            )
        conv = None
        if len(parts) > 1 or parts[0].dtype != p.dtype:
            tail = (tail + 255) // 256 * 256
            conv = tail
            tail += numel * _itemsize(p.dtype)
        slots.append(ParamSlot(tuple(parts), tuple(p.shape), p.dtype, conv))
    return slots, (tail + PAGE - 1) // PAGE * PAGE


def slot_sizes(units: list, layouts: list, path: str) -> list:
    """Bytes of each unit's buffer: its read layout plus the tails of converted parameters."""
    return [_param_slots(u, lay, path)[1] for u, lay in zip(units, layouts)]


class StreamedParameter(nn.Parameter):
    """The class of a streamed parameter while its unit is not bound: torch operations on it
    see the real values, read from the source, and in-place writes raise TensorStreamError.
    Bound (inside its unit's forward) the same object is a plain ``nn.Parameter`` viewing
    the unit's buffer, so compute pays nothing for this class."""

    _ts_ref: Optional[tuple] = None  # (weakref to the Runtime, unit index, parameter index)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func not in _METADATA:
            unbound = [a for a in args if type(a) is cls]
            if unbound:
                args = _substitute(func, args, unbound)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        import copy

        ref = self._ts_ref
        rt = ref[0]() if ref else None
        with torch._C.DisableTorchFunctionSubclass():
            data = placeholder(self.dtype, self.device, tuple(self.shape))
        new = StreamedParameter(data, self.requires_grad)
        memo[id(self)] = new
        if rt is not None:
            new._ts_ref = (weakref.ref(copy.deepcopy(rt, memo)), ref[1], ref[2])
        return new

    def __reduce_ex__(self, proto):
        return (torch._utils._rebuild_parameter, (self._real(), self.requires_grad, {}))

    def _real(self) -> torch.Tensor:
        ref = self._ts_ref
        rt = ref[0]() if ref else None
        if rt is None:
            raise TensorStreamError(
                "this streamed parameter's model is gone (or is a copy not yet used); its weights cannot be read"
            )
        return rt.reads.param_value(ref[1], ref[2])


def _substitute(func, args: tuple, unbound: list) -> tuple:
    name = getattr(func, "__name__", "")
    if name in _WRITES or (name.endswith("_") and not name.startswith("__") and name != "requires_grad_"):
        raise TensorStreamError(
            f"{name}: streamed weights are read-only; change the weights before tensorstream.offload(), "
            "or load the changed model again"
        )
    # The real value lives on the CPU; an operation gets it on the parameter's device, except
    # detach(), which state_dict() uses: saving a model larger than the GPU must not fill it.
    real = {id(a): a._real() if func is _DETACH else a._real().to(a.device) for a in unbound}
    return tuple(real.get(id(a), a) if type(a) is StreamedParameter else a for a in args)


_T = torch.Tensor
_DETACH = _T.detach
_METADATA: set = set()
for _prop in (
    "shape", "dtype", "device", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim", "layout",
    "is_cuda", "is_meta", "is_sparse", "is_quantized", "names", "_version", "name", "itemsize",
):  # fmt: skip
    _attr = getattr(_T, _prop, None)
    if _attr is not None and hasattr(_attr, "__get__"):
        _METADATA.add(_attr.__get__)
for _prop in ("requires_grad", "grad", "data"):
    _attr = getattr(_T, _prop, None)
    if _attr is not None and hasattr(_attr, "__set__"):
        _METADATA.add(_attr.__set__)
for _meth in (
    "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex", "stride",
    "requires_grad_", "is_contiguous", "get_device", "__hash__", "__format__", "type", "_is_view",
    "storage_offset", "is_pinned", "untyped_storage", "data_ptr", "__reduce_ex__", "__deepcopy__",
    "register_hook", "retain_grad", "is_shared", "share_memory_",
):  # fmt: skip
    _attr = getattr(_T, _meth, None)
    if _attr is not None:
        _METADATA.add(_attr)
_WRITES = {"__setitem__", "copy_", "set_", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def placeholder(dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
    """A one-element tensor expanded to `shape`: right dtype, device and shape, no memory."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class Placement:
    """The streamed parameters of every unit and where they live in its buffer."""

    def __init__(self, units: list, layouts: list, path: str):
        self.units = units
        self.slots, self.sizes = [], []
        for u, lay in zip(units, layouts):
            slots, size = _param_slots(u, lay, path)
            self.slots.append(slots)
            self.sizes.append(size)
        self.converts = [any(s.converted_at is not None for s in slots) for slots in self.slots]
        self._placeholders: dict = {}
        self._versions = [[0] * len(u.params) for u in units]

    def adopt(self, runtime) -> None:
        """Make the streamed parameters StreamedParameters that read through `runtime`."""
        ref = weakref.ref(runtime)
        for i, u in enumerate(self.units):
            for k, p in enumerate(u.params):
                t = p.get()
                t.__class__ = StreamedParameter
                t._ts_ref = (ref, i, k)

    def _placeholder(self, dtype: torch.dtype, device: torch.device, shape: tuple) -> torch.Tensor:
        key = (dtype, str(device))
        base = self._placeholders.get(key)
        if base is None:
            base = self._placeholders[key] = torch.zeros((), dtype=dtype, device=device)
        return base.expand(shape)

    def values(self, i: int, buf: torch.Tensor, base_offset: int = 0, convert: bool = False) -> list:
        """The unit's parameter tensors as views of `buf` (converted in place if `convert`)."""
        out = []
        for s in self.slots[i]:
            if s.converted_at is None:
                part = s.parts[0]
                start = base_offset + part.offset
                out.append(buf[start : start + part.nbytes].view(part.dtype).view(s.shape))
                continue
            flat = buf[s.converted_at : s.converted_at + _numel(s.shape) * _itemsize(s.dtype)].view(s.dtype)
            if convert:
                k = 0
                for part in s.parts:
                    start = base_offset + part.offset
                    src = buf[start : start + part.nbytes].view(part.dtype)
                    flat[k : k + src.numel()].copy_(src)
                    k += src.numel()
            out.append(flat.view(s.shape))
        return out

    def bind(self, i: int, buf: torch.Tensor, base_offset: int = 0, convert: bool = False) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            for p, v in zip(self.units[i].params, self.values(i, buf, base_offset, convert)):
                t = p.get()
                t.data = v
                t.__class__ = nn.Parameter

    def set_bound(self, i: int, bound: bool) -> None:
        """Mark unit `i`'s parameters bound (their data is real) or not, without moving them."""
        cls = nn.Parameter if bound else StreamedParameter
        for p in self.units[i].params:
            p.get().__class__ = cls

    def unbind(self, i: int, device: torch.device) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            for p in self.units[i].params:
                t = p.get()
                t.__class__ = StreamedParameter
                t.data = self._placeholder(p.dtype, device, p.shape)

    def snapshot_versions(self, i: int) -> None:
        """Remember the parameters' version counters (bumped by in-place writes)."""
        self._versions[i] = [p.get()._version for p in self.units[i].params]

    def check_unwritten(self, i: int) -> None:
        """Raise if a bound parameter of unit `i` was written in place since it was bound."""
        for p, v in zip(self.units[i].params, self._versions[i]):
            if p.get()._version != v:
                self.snapshot_versions(i)
                raise TensorStreamError(
                    f"{self.units[i].name}.{p.store_name} was changed in place (an optimizer step or an "
                    "in-place op): streamed weights are read-only and the change would be lost when the unit "
                    "is evicted. Freeze them (requires_grad_(False)) or change the weights before offload()."
                )
