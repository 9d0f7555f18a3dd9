"""The module layer: what :func:`install` changes on the user's model so that it keeps
behaving as an ``nn.Module`` while its units stream.

- The model's and each unit's ``forward`` are wrapped (instance attributes that keep the
  original's signature): the model's runs as one pass under the model's lock; a unit's loads
  its weights first and releases them after. A ``try`` around both, not hooks, so that any
  exception, ``KeyboardInterrupt`` included, reaches the runtime's recovery.
- Streamed parameters become :class:`~tensorstream.placement.StreamedParameter` objects: read
  outside a forward (``state_dict()``, ``torch.save``, ``save_pretrained``, printing a
  weight) they give the real values, read from the source; written, they raise.
- ``_apply`` of the model and of each unit is replaced, so ``model.to(device)`` moves what is
  resident and switches the device units stream to, without materialising them; a dtype
  change of streamed units is refused.
- ``copy.deepcopy`` gives a working copy sharing the source; pickling raises
  ``TensorStreamError`` (see :meth:`Runtime.__reduce_ex__`).
- ``torch.compile`` (of the model, of ``model.forward``, ``model.compile()``): Dynamo skips the
  forward wrappers (:func:`tensorstream.dynamo.skip_in_dynamo`), so the streamed model runs eagerly inside a
  compiled caller: a unit's parameters are rebound to its buffer as it runs, under the model's
  lock, which a traced graph cannot follow.
"""

from __future__ import annotations

import torch
from torch import nn

from . import configure
from .dynamo import skip_in_dynamo
from .errors import InvalidArgumentError, TensorStreamError
from .memory import file_mappings, trim_heap
from .runtime import Runtime
from .speculative import draft_of


class _Forward:
    """Base of the forward wrappers: keeps the wrapped forward's signature (transformers
    reads it) and is deep-copied with the model."""

    def __init__(self, runtime: Runtime, orig):
        self.runtime = runtime
        self.orig = orig
        self.__wrapped__ = orig
        self.__doc__ = getattr(orig, "__doc__", None)
        self.__name__ = getattr(orig, "__name__", "forward")


class _PassForward(_Forward):
    def __call__(self, *args, **kwargs):
        return self.runtime.run_pass(self.orig, args, kwargs)


class _UnitForward(_Forward):
    def __init__(self, runtime: Runtime, orig, index: int):
        super().__init__(runtime, orig)
        self.index = index

    def __call__(self, *args, **kwargs):
        return self.runtime.run_unit(self.index, self.orig, args, kwargs)


class _RootApply:
    """``model._apply``: refuse a dtype change of streamed units before anything moves."""

    def __init__(self, runtime: Runtime, module: nn.Module):
        self.runtime = runtime
        self.module = module

    def __call__(self, fn, recurse: bool = True):
        _check_dtype_unchanged(self.runtime, fn)
        draft = draft_of(self.module)
        if draft is not None:
            draft._apply(fn, recurse)  # the draft runs where the model runs
        return type(self.module)._apply(self.module, fn, recurse)


class _UnitApply(_RootApply):
    """A unit's ``_apply``: move what is resident, and stream to the new device."""

    def __call__(self, fn, recurse: bool = True):
        rt = self.runtime
        rt.resolve()
        unit = next(u for u in rt.units if u.modules[0] is self.module)
        _check_dtype_unchanged(rt, fn)
        with rt.lock:
            rt.teardown()
            try:
                # Streamed parameters move as empty tensors: nothing is read or copied.
                with torch._C.DisableTorchFunctionSubclass():
                    for p, t in zip(unit.params, rt.placement.objects[unit.index]):
                        t.data = torch.empty(0, dtype=p.dtype, device=rt.device)
                    type(self.module)._apply(self.module, fn, recurse)
                    if unit.params:
                        rt.device = unit.params[0].get().device
            finally:
                rt.placement.unbind_all(rt.device)
        return self.module


class _Generate(_Forward):
    """``model.generate``: assisted by the draft given to offload(), if any, with the
    drafting knobs chosen for a streamed model (see :mod:`tensorstream.speculative`)."""

    def __call__(self, *args, **kwargs):
        from .speculative.assisted import assisted_generate  # transformers: only once a model generates

        return assisted_generate(self.runtime, self.orig, args, kwargs)


class _CandidateGenerator(_Forward):
    """``model._get_candidate_generator``, which transformers' assisted generation calls:
    one that drafts the next pass while the target verifies this one, where it can."""

    def __call__(self, *args, **kwargs):
        from .speculative.assisted import candidate_generator  # transformers, as above

        return candidate_generator(self.orig, *args, **kwargs)


class _Locked(_Forward):
    """``model.state_dict``: under the model's lock, so no pass binds a weight meanwhile."""

    def __call__(self, *args, **kwargs):
        with self.runtime.lock:
            return self.orig(*args, **kwargs)


class _CheckedLoad(_Forward):
    """``model.load_state_dict``: refuse streamed keys before anything is loaded."""

    def __call__(self, state_dict, *args, **kwargs):
        rt = self.runtime
        rt.resolve()
        names = {id(m): n for n, m in rt.model.named_modules(remove_duplicate=False)}
        streamed = [
            f"{names[id(p.module)]}.{p.attr}" if names.get(id(p.module)) else p.attr
            for u in rt.units
            for p in u.params
        ]
        _RefuseLoad(streamed)(None, state_dict, "")
        return self.orig(state_dict, *args, **kwargs)


class _RefuseLoad:
    """A load_state_dict pre-hook of a module owning streamed parameters: loading would
    write them, and streamed weights are read-only."""

    def __init__(self, attrs: list):
        self.attrs = attrs

    def __call__(self, module, state_dict, prefix, *_rest):
        hit = [prefix + a for a in self.attrs if prefix + a in state_dict]
        if hit:
            raise TensorStreamError(
                f"load_state_dict() would overwrite streamed weights ({hit[0]!r} and {len(hit) - 1} more): streamed "
                "weights are read-only and live in the store. Load the weights into the model before "
                "tensorstream.offload(), or save it with save_pretrained() and load that with from_pretrained()."
            )


def _check_dtype_unchanged(rt: Runtime, fn) -> None:
    rt.resolve()
    for unit in rt.units:
        for p in unit.params:
            probe = fn(torch.empty(0, dtype=p.dtype, device=rt.device))
            if probe.dtype != p.dtype:
                raise InvalidArgumentError(
                    f"changing the dtype of a streamed unit after offload() is not supported ({unit.name}: "
                    f"{p.dtype} -> {probe.dtype}); cast the model before offloading it"
                )


def install(model: nn.Module, runtime: Runtime) -> None:
    """Set up streaming on `model`. The budget is checked first: a model refused for its
    budget is left untouched."""
    configure.check_budget(runtime)
    skip_in_dynamo((_PassForward, _UnitForward))
    _detach_resident_from_unit_storage(model, runtime.units)
    runtime.placement.adopt(runtime)
    runtime.placement.unbind_all(runtime.device)
    for u in runtime.units:
        for m in u.modules:
            m.forward = _UnitForward(runtime, m.forward, u.index)
        top = u.modules[0]
        top._apply = _UnitApply(runtime, top)  # instance attribute shadows nn.Module._apply
    # The root checks a dtype change before anything moves, so a refused model.half()
    # leaves no module converted.
    owners: dict = {}
    for u in runtime.units:
        for p in u.params:
            owners.setdefault(id(p.module), (p.module, []))[1].append(p.attr)
    for module, attrs in owners.values():
        module._register_load_state_dict_pre_hook(_RefuseLoad(attrs), with_module=True)
    model._apply = _RootApply(runtime, model)
    model.forward = _PassForward(runtime, model.forward)
    model.state_dict = _Locked(runtime, model.state_dict)
    if hasattr(model, "generate"):
        model.generate = _Generate(runtime, model.generate)
    if hasattr(model, "_get_candidate_generator"):
        model._get_candidate_generator = _CandidateGenerator(runtime, model._get_candidate_generator)
    model.load_state_dict = _CheckedLoad(runtime, model.load_state_dict)
    model._tensorstream = runtime
    trim_heap()
    runtime.configure()


def _detach_resident_from_unit_storage(model: nn.Module, units: list) -> None:
    """Give resident tensors their own memory where they live in the same file mapping as
    streamed ones. transformers loads a checkpoint with mmap: a resident embedding viewing
    that mapping keeps the whole file mapped, and every page the store writer touched in
    RSS, after the units are gone."""
    maps = file_mappings()
    if not maps:
        return

    def mapping_of(ptr: int):
        for lo, hi in maps:
            if lo <= ptr < hi:
                return (lo, hi)
        return None

    shared = {mapping_of(p.get().data_ptr()) for u in units for p in u.params} - {None}
    if not shared:
        return
    streamed_ids = {id(p.get()) for u in units for p in u.params}
    for mod in model.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is None or id(t) in streamed_ids or t.device.type != "cpu" or t.numel() == 0:
                continue
            if mapping_of(t.data_ptr()) in shared:
                t.data = t.data.clone()
