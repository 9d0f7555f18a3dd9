"""Placement: where each streamed parameter lives inside its unit's buffer, and binding the
parameters to a buffer or unbinding them.

A unit's buffer holds its stored tensors as the source lays them out (the read layout), one
per streamed parameter (a checkpoint that needs tensors assembled into a parameter, such as
experts stored one by one, is converted into a store first). A parameter whose stored dtype
differs from the model's is built in the tail of the same buffer, so it costs no memory
outside the budget. :func:`slot_sizes` is the one formula for a unit's buffer size.

While a unit is not bound, its parameters are :class:`StreamedParameter` objects (the class
of the model's own parameter objects is switched, so optimizers and adapters keep their
references) holding a zero-memory placeholder: any torch operation on them reads the real
values from the source instead (:meth:`tensorstream.reads.Reads.param_value`), and writes
are refused. Bound, they are plain ``nn.Parameter`` views of the unit's buffer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .consts import ST_TO_TORCH, round_up, tensor_bytes
from .errors import StoreMismatchError, TensorStreamError


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

    part: Part
    shape: tuple
    dtype: torch.dtype
    converted_at: Optional[int]
    """Offset of the parameter converted in the buffer's tail, or None: a view of its part."""


def _param_slots(unit, layout, path: str) -> tuple:
    """(the unit's ParamSlots, its buffer size)."""
    by_name = {t.name: t for t in layout.tensors}
    slots, tail = [], layout.buffer_len
    for p in unit.params:
        (name,) = p.source_names  # one stored tensor per streamed parameter
        t = by_name[name]
        if tuple(t.shape) != tuple(p.shape):
            raise StoreMismatchError(
                f"{path}: tensor {p.store_name!r} of unit {unit.name!r} has shape {tuple(t.shape)}, "
                f"the model expects {tuple(p.shape)}"
            )
        part = Part(name, ST_TO_TORCH[t.dtype], t.offset, t.nbytes)
        conv = None
        if part.dtype != p.dtype:
            tail = (tail + 255) // 256 * 256
            conv = tail
            tail += tensor_bytes(p.shape, p.dtype)
        slots.append(ParamSlot(part, tuple(p.shape), p.dtype, conv))
    return slots, round_up(tail)


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
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        unbound = [a for a in _flat(args, kwargs) if type(a) is cls]
        if unbound:
            real = _substitute(func, unbound)
            args = tuple(_replace(a, real) for a in args)
            kwargs = {k: _replace(v, real) for k, v in kwargs.items()}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
            if unbound and func == _DATA:
                # A write through `.data` would change a copy of the weights: refuse it too.
                out = torch.Tensor._make_subclass(ReadOnlyWeight, out)
                out._ts_name = unbound[0]._ts_name()
        return out

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

    def _runtime(self):
        ref = self._ts_ref
        rt = ref[0]() if ref else None
        if rt is None:
            raise TensorStreamError("this streamed parameter's model is gone; its weights cannot be read")
        rt.resolve()
        return rt

    def _ts_name(self) -> str:
        rt, (_r, i, k) = self._runtime(), self._ts_ref
        return f"{rt.units[i].name}.{rt.units[i].params[k].store_name}"

    def _real(self) -> torch.Tensor:
        return self._runtime().reads.param_value(self._ts_ref[1], self._ts_ref[2])


class ReadOnlyWeight(torch.Tensor):
    """What ``weight.data`` of an unbound streamed weight gives: its real values, which an
    in-place write would change in a copy only, so writes raise TensorStreamError."""

    _ts_name = ""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if _is_write(func) and any(type(a) is cls for a in _flat(args, kwargs)):
            raise TensorStreamError(
                f"{getattr(func, '__name__', func)}: streamed weights are read-only "
                f"({next(a for a in _flat(args, kwargs) if type(a) is cls)._ts_name}); change the weights before "
                "tensorstream.offload() (peft: merge_and_unload() before offloading), or load the changed model again"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _is_write(func) -> bool:
    name = getattr(func, "__name__", "")
    return func in _WRITES or (name.endswith("_") and not name.startswith("__") and name != "requires_grad_")


def _flat(args: tuple, kwargs: dict):
    """The arguments, one level of lists and tuples opened (torch.cat([w1, w2]))."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _replace(a, real: dict):
    if isinstance(a, (list, tuple)):
        return type(a)(real.get(id(x), x) for x in a)
    return real.get(id(a), a)


def _substitute(func, unbound: list) -> dict:
    """id(parameter) -> its real value, for an operation that only reads them."""
    if _is_write(func):
        raise TensorStreamError(
            f"{getattr(func, '__name__', func)}: streamed weights are read-only ({unbound[0]._ts_name()}); change the weights before "
            "tensorstream.offload(), or load the changed model again"
        )
    # The real value lives on the CPU; an operation gets it on the parameter's device, except
    # detach(), which state_dict() uses: saving a model larger than the GPU must not fill it.
    return {id(a): a._real() if func is _DETACH else a._real().to(a.device) for a in unbound}


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
for _prop in ("requires_grad", "grad"):
    _attr = getattr(_T, _prop, None)
    if _attr is not None and hasattr(_attr, "__set__"):
        _METADATA.add(_attr.__set__)
for _meth in (
    "size", "dim", "numel", "nelement", "element_size", "is_floating_point", "is_complex",
    "requires_grad_", "get_device", "__hash__", "__format__", "type", "is_pinned", "__reduce_ex__",
    "__deepcopy__", "register_hook", "retain_grad",
):  # fmt: skip
    _attr = getattr(_T, _meth, None)
    if _attr is not None:
        _METADATA.add(_attr)
_WRITES = {getattr(_T, n) for n in ("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__")}
_WRITES.add(_T.data.__set__)  # replacing a streamed weight's data: read-only too
_DATA = _T.data.__get__


class _RefuseGradient:
    """The hook of a streamed parameter that requires grad: raises when backward reaches it."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, grad):
        raise TensorStreamError(
            f"{self.name}: streamed weights are read-only, and this backward() would compute their gradient "
            "(requires_grad=True): a training step would change weights that live in the store. Freeze the "
            "streamed weights, for example `for p in model.parameters(): p.requires_grad_(False)`, and train "
            "adapters on top (peft LoRA works); a forward alone needs nothing (torch.no_grad() saves memory)."
        )


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
        # The parameter objects themselves: a parameter replaced on its module after offload()
        # is refused, never bound or overwritten.
        self.objects = [[p.get() for p in u.params] for u in units]
        self._versions = [[(0, 0)] * len(u.params) for u in units]

    def adopt(self, runtime) -> None:
        """Make the streamed parameters StreamedParameters that read through `runtime`."""
        ref = weakref.ref(runtime)
        for i, objs in enumerate(self.objects):
            for k, t in enumerate(objs):
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
            start = base_offset + s.part.offset
            stored = buf[start : start + s.part.nbytes].view(s.part.dtype).view(s.shape)
            if s.converted_at is None:
                out.append(stored)
                continue
            value = buf[s.converted_at : s.converted_at + tensor_bytes(s.shape, s.dtype)]
            value = value.view(s.dtype).view(s.shape)
            if convert:
                value.copy_(stored)
            out.append(value)
        return out

    def bind(self, i: int, buf: torch.Tensor, base_offset: int = 0, convert: bool = False) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            for t, v in zip(self.objects[i], self.values(i, buf, base_offset, convert)):
                t.data = v
                t.__class__ = nn.Parameter

    def set_bound(self, i: int, bound: bool) -> None:
        """Mark unit `i`'s parameters bound (their data is real) or not, without moving them."""
        cls = nn.Parameter if bound else StreamedParameter
        for t in self.objects[i]:
            t.__class__ = cls

    def unbind(self, i: int, device: torch.device) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            for p, t in zip(self.units[i].params, self.objects[i]):
                t.__class__ = StreamedParameter
                t.data = self._placeholder(p.dtype, device, p.shape)

    def unbind_all(self, device: torch.device) -> None:
        """Unbind every unit (placeholders on `device`)."""
        for i in range(len(self.units)):
            self.unbind(i, device)

    def check_same_objects(self, i: int) -> None:
        """Raise if a streamed parameter of unit `i` was replaced by another object
        (``module.weight = nn.Parameter(...)``, ``resize_token_embeddings``)."""
        for p, obj in zip(self.units[i].params, self.objects[i]):
            if p.module._parameters.get(p.attr) is not obj:
                raise TensorStreamError(
                    f"{self.units[i].name}.{p.store_name} was replaced after offload(): streamed weights are "
                    "read-only and live in the store. Change the model before tensorstream.offload(), or save the "
                    "changed model and load it again."
                )

    def refuse_gradients(self, i: int) -> None:
        """Make a gradient into a streamed parameter of unit `i` raise at ``backward()``: a
        hook on each one that requires grad (registered once, kept across binds). A forward
        in grad mode computes as the model in memory does; only training a streamed weight
        is refused, since its bytes live in the store and a step would be lost."""
        for p, t in zip(self.units[i].params, self.objects[i]):
            if t.requires_grad and getattr(t, "_ts_grad_hook", None) is None:
                t._ts_grad_hook = t.register_hook(_RefuseGradient(f"{self.units[i].name}.{p.store_name}"))

    def check_usable(self, i: int) -> None:
        """Refuse unit `i` if its parameters were replaced; in grad mode, make a gradient
        into them raise at backward (:meth:`refuse_gradients`)."""
        self.check_same_objects(i)
        if torch.is_grad_enabled():
            self.refuse_gradients(i)

    def snapshot_versions(self, i: int) -> None:
        """Remember the parameters' version counters (bumped by in-place writes) and where
        their data is (a module that replaces its weight's data moves it)."""
        self._versions[i] = [(t._version, t.data_ptr()) for t in self.objects[i]]

    def check_unwritten(self, i: int) -> None:
        """Raise if a bound parameter of unit `i` was written in place, or its data replaced,
        since it was bound."""
        for p, t, (v, ptr) in zip(self.units[i].params, self.objects[i], self._versions[i]):
            if t.data_ptr() != ptr:
                self.snapshot_versions(i)
                raise TensorStreamError(
                    f"{self.units[i].name}.{p.store_name}: the module replaced this weight's data during its forward "
                    "(bitsandbytes repacks its weights on first use, for example). A streamed weight is read again "
                    "from the store at every load, so the module would see its original bytes next time: streaming "
                    "cannot give the in-memory model's answers for this module. Keep it out of the streamed units "
                    "(Config(units=[...])), or offload the model without this quantization."
                )
            if t._version != v:
                self.snapshot_versions(i)
                raise TensorStreamError(
                    f"{self.units[i].name}.{p.store_name} was changed in place (an optimizer step or an "
                    "in-place op): streamed weights are read-only and the change would be lost when the unit "
                    "is evicted. Freeze them (requires_grad_(False)) or change the weights before offload()."
                )
