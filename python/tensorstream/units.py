"""Model analysis: which modules are streamable units, which parameters they stream, and
the model's fingerprint."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from . import _core
from .consts import TORCH_TO_ST, tensor_bytes
from .errors import ConfigError, TensorStreamError
from .plain import check_initialised, plain_bytes, plain_cpu, why_not_streamable
from .progress import bytes_bar
from .sparse_kinds import experts_and_routers


@dataclass
class ParamRef:
    """One streamed parameter: where it lives in the model and in the store."""

    module: nn.Module
    attr: str
    store_name: str
    dtype: torch.dtype
    shape: tuple
    recipe: Optional[object] = None
    """Where the parameter streams from a checkpoint: how its value is made from checkpoint
    tensors (a `conversion.Recipe`, by transformers' loading rules); None: it is the one
    stored tensor `store_name`."""

    @property
    def source_names(self) -> list:
        return list(self.recipe.sources) if self.recipe else [self.store_name]

    def get(self) -> nn.Parameter:
        return self.module._parameters[self.attr]


@dataclass
class UnitSpec:
    """A streamable unit: modules whose parameters are streamed together."""

    index: int
    name: str
    modules: list
    params: list = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(p.shape, p.dtype) for p in self.params)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


TOWER_SHARE = 0.01
"""A container of blocks other than the largest one is streamed by default when it holds at
least this share of the largest one's parameter bytes."""


def _holders(container: nn.Module) -> list:
    """The children of `container` that hold parameters."""
    return [c for c in container.children() if _param_bytes(c) > 0]


def _is_block(module: nn.Module) -> bool:
    """A block holds its parameters in submodules (a transformer layer), unlike a bare layer
    (a Linear, a norm, an embedding) that holds them itself."""
    return any(_param_bytes(c) > 0 for c in module.children())


def _default_unit_modules(model: nn.Module) -> list:
    """The repeated blocks of every large container (ModuleList or Sequential) of `model`, in
    model order: both towers of CLIP, the encoder and decoder of T5, the vision tower and the
    language model of a vision-language model.

    A container is a candidate if two or more of its children hold parameters. The largest
    candidate (by parameter bytes) is always chosen. Another one is chosen too when it is
    not nested in (and does not contain) a chosen container, holds at least `TOWER_SHARE` of
    the largest one's bytes, and its children are blocks, not bare layers: a list of norms or
    of linear heads is never chosen beside the blocks."""
    candidates = []
    for _, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(_holders(m)) >= 2:
            candidates.append((_param_bytes(m), m))
    if not candidates:
        return []
    # Largest first; a stable sort keeps an outer container ahead of an inner one of equal bytes.
    candidates.sort(key=lambda c: c[0], reverse=True)
    largest = candidates[0][0]
    chosen: list = []
    inside: set = set()  # every module within a chosen container
    for b, m in candidates:
        if id(m) in inside or any(id(x) in inside for x in m.modules()):
            continue
        if chosen and (b < TOWER_SHARE * largest or not all(_is_block(c) for c in _holders(m))):
            continue
        chosen.append(m)
        inside.update(id(x) for x in m.modules())
    order = {id(m): i for i, m in enumerate(model.modules())}
    chosen.sort(key=lambda m: order[id(m)])  # model order: the order units are numbered in
    return [c for m in chosen for c in _holders(m)]


def _select_by_names(model: nn.Module, names: Iterable[str]) -> list:
    by_name = dict(model.named_modules())
    chosen, seen = [], set()
    for spec in names:
        if spec in by_name:
            mods = [by_name[spec]]
        else:
            mods = [m for n, m in by_name.items() if type(m).__name__ == spec]
            # Outermost only: skip modules nested in another match.
            mods = [m for m in mods if not any(m is not o and any(m is x for x in o.modules()) for o in mods)]
        if not mods:
            raise ConfigError(
                f"Config.units entry {spec!r} matches no module name or class name of {type(model).__name__}"
            )
        for m in mods:
            if id(m) not in seen:
                seen.add(id(m))
                chosen.append(m)
    return chosen


def _owners(model: nn.Module) -> dict:
    """id(parameter) -> ids of every module that registers it."""
    owners: dict = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(mod))
    return owners


def _unit_of(modules: list, name: str, owners: dict, names: dict) -> UnitSpec:
    """The parameters `modules` stream: those nothing outside them uses."""
    inside = {id(x) for m in modules for x in m.modules()}
    spec = UnitSpec(index=0, name=name, modules=list(modules))
    taken = set()
    for m in modules:
        for sub_name, sub in m.named_modules(remove_duplicate=False):
            for attr, p in sub._parameters.items():
                if p is None or id(p) in taken or not owners.get(id(p), set()) <= inside:
                    continue
                if p.is_sparse or p.is_quantized or p.dtype not in TORCH_TO_ST:
                    continue
                why = why_not_streamable(p, allow_meta=True)
                if why is not None:
                    raise TensorStreamError(
                        f"{names.get(id(sub), sub_name)}.{attr}: cannot be streamed: {why}"
                    )
                taken.add(id(p))
                if len(modules) == 1:
                    store_name = f"{sub_name}.{attr}" if sub_name else attr
                else:  # a group of modules: names from the model root keep them apart
                    store_name = f"{names.get(id(sub), sub_name)}.{attr}"
                spec.params.append(ParamRef(sub, attr, store_name, p.dtype, tuple(p.shape)))
    return spec


def analyse(model: nn.Module, unit_names: Optional[Sequence[str]]) -> list:
    """Find the units of `model` and the parameters each streams.

    A parameter is streamed by a unit only if nothing outside that unit uses it (tied or
    shared parameters stay resident), so streaming never changes what other modules see.

    By default (no `unit_names`) a block's mixture-of-experts modules (see
    :func:`tensorstream.sparse_kinds.is_experts`) are units of their own, streamed expert by
    expert, right after their block's unit, and their routers stay resident (a router is
    tiny and predicts the next layer's experts, :mod:`tensorstream.sparse`). Naming the
    blocks in `unit_names` streams them whole.
    """
    check_initialised(model)
    modules = _select_by_names(model, unit_names) if unit_names else _default_unit_modules(model)
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owners = _owners(model)
    units, seen_modules = [], set()
    for m in modules:
        if id(m) in seen_modules:
            continue  # the same block listed twice (called twice per forward) is one unit
        seen_modules.add(id(m))
        split = [] if unit_names else experts_and_routers(m)
        apart = {
            id(p) for e, router in split for mod in (e, router) if mod is not None for p in mod.parameters()
        }
        spec = _unit_of([m], names.get(id(m), type(m).__name__), owners, names)
        spec.params = [p for p in spec.params if id(p.get()) not in apart]
        if spec.params:
            units.append(spec)
        for e, _router in split:
            expert_spec = _unit_of([e], names[id(e)], owners, names)
            if expert_spec.params:
                units.append(expert_spec)
    for i, u in enumerate(units):
        u.index = i
    return units


def resident_bytes(model: nn.Module, units: list) -> int:
    """Bytes of the parameters and buffers that no unit streams."""
    streamed = {id(p.get()) for u in units for p in u.params}
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in streamed or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def extra_unit_candidates(model: nn.Module, units: list) -> list:
    """Modules outside the units that can be streamed when the budget cannot hold them
    (embeddings, the head, norms), largest first. Modules that share a parameter (tied
    embeddings) form one candidate, accessed by each of them. Stores always hold these too,
    so that the same store serves every budget.

    Only bare layers are candidates: the parameters a module holds itself beside children
    that hold parameters (CLIP's ``logit_scale`` on the model, a class embedding) stay
    resident. Streaming such a module would stream its whole subtree, units included, as
    one unit held for as long as its forward runs."""
    if not units:
        return []
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    owners = _owners(model)
    in_units = {id(x) for u in units for m in u.modules for x in m.modules()}
    streamed = {id(p.get()) for u in units for p in u.params}
    groups: list = []
    for mod in model.modules():
        mine = {id(p) for p in mod._parameters.values() if p is not None and id(p) not in streamed}
        if id(mod) in in_units or not mine or _is_block(mod):
            continue
        for g in groups:
            if mine & g["params"]:
                g["modules"].append(mod)
                g["params"] |= mine
                break
        else:
            groups.append({"modules": [mod], "params": mine})
    candidates = []
    for g in groups:
        label = "+".join(names.get(id(m), type(m).__name__) for m in g["modules"])
        spec = _unit_of(g["modules"], label, owners, names)
        if spec.params:
            candidates.append(spec)
    candidates.sort(key=lambda u: u.nbytes, reverse=True)
    return candidates


def with_candidates(model: nn.Module, units: list) -> list:
    """The units followed by every extra candidate, indexed: what a store holds."""
    allu = list(units) + extra_unit_candidates(model, units)
    for i, u in enumerate(allu):
        u.index = i
    return allu


def own_value(p: ParamRef) -> torch.Tensor:
    """The parameter's value as the model holds it."""
    return p.get().detach()


def fingerprint(model: nn.Module, units: list, value: Callable[[ParamRef], torch.Tensor] = own_value) -> str:
    """Identify the model: its class and, per unit, each tensor's name, dtype, shape and
    content checksum. Two models that differ in any streamed byte differ here. `value` gives
    a parameter's value (one at a time: a model whose weights lie elsewhere, such as one
    accelerate offloaded to disk, is never materialised whole)."""
    h = hashlib.sha256()
    h.update(f"tensorstream-v1|{type(model).__module__}.{type(model).__qualname__}".encode())
    for u in units:
        h.update(f"|unit:{u.name}".encode())
        for p in u.params:
            name = f"{u.name}.{p.store_name}"
            t = plain_cpu(value(p), name)  # held while the core reads its bytes
            digest = _core.checksum(*plain_bytes(t, name))
            h.update(f"|{p.store_name}:{TORCH_TO_ST[p.dtype]}:{list(p.shape)}:{digest:016x}".encode())
    return h.hexdigest()[:32]


def write_store(
    path: str,
    fp: str,
    model: nn.Module,
    units: list,
    progress: Optional[bool] = None,
    compression_level: Optional[int] = None,
    code: str = "bytegroup",
    value: Callable[[ParamRef], torch.Tensor] = own_value,
) -> str:
    """Write the units' parameters to a new store at `path`, atomically: coded losslessly
    in chunks with `code`'s code ("bytegroup": decoded on the CPU, zstd
    `compression_level` for the planes zstd codes; "table": decoded on the GPU), or raw
    when `compression_level` is None. `progress`: a progress bar on stderr (None: when
    stderr is a terminal, :mod:`.progress`). `value` gives each parameter's value, one at a
    time (see :func:`fingerprint`)."""
    writer = _core.StoreWriter(path, fp)
    bar = bytes_bar(sum(u.nbytes for u in units), f"writing {os.path.basename(path)}", progress)
    try:
        writer.set_compression(compression_level, code=code)
        writer.set_metadata("model_class", f"{type(model).__module__}.{type(model).__qualname__}")
        writer.set_metadata("writer", "tensorstream " + _core.__version__)
        for u in units:
            writer.begin_unit(u.name)
            for p in u.params:
                name = f"{u.name}.{p.store_name}"
                t = plain_cpu(value(p), name)
                where = plain_bytes(t, name)
                writer.add_tensor(p.store_name, TORCH_TO_ST[p.dtype], list(p.shape), *where)
                if bar is not None:
                    bar.update(where[1])
                del t
            writer.end_unit()
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
