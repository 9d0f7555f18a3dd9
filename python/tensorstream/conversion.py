"""How a checkpoint's tensors become a model's parameters, by transformers' own loading rules
(`transformers.conversion_mapping`): renames and prefix changes, and converters that merge,
split, concatenate or transpose stored tensors into a parameter. A family is supported here
when transformers supports it, with no rule of ours."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import StoreMismatchError


@dataclass(frozen=True, eq=False)
class Recipe:
    """How one parameter's value is made from checkpoint tensors."""

    target: str
    """The parameter's name in the model."""
    sources: tuple
    """Checkpoint tensor names, in the order they are read."""
    shape: tuple
    converter: Optional[object] = None
    """A transformers ``WeightConverter`` (with `patterns` and `first_target`) computing the
    value from the sources; None: the sources' elements concatenated in order (one source:
    the tensor as stored), which needs no memory beyond the parameter's own."""
    patterns: tuple = ()
    first_target: str = ""
    config: Optional[object] = None
    """The model's transformers config, which some converters read."""

    def value(self, tensors: list) -> torch.Tensor:
        """The parameter's value from its sources' tensors (views of a read buffer, or
        loaded), in the sources' dtype."""
        if self.converter is None:
            flat = (
                tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])
            )
            return flat.view(self.shape)
        out = _run(self.converter, self.first_target, self.sources, self.patterns, tensors, self.config)[
            self.target
        ]
        return out[0] if isinstance(out, list) else out


def _run(converter, first_target: str, names, patterns, tensors, config) -> dict:
    conv = copy.deepcopy(converter)  # a converter collects the tensors it is given
    for name, pattern, t in zip(names, patterns, tensors):
        conv.add_tensor(first_target, name, pattern, lambda t=t: t)
    return conv.convert(first_target, config=config)


def _in_memory_order(converter, keys: list) -> Optional[list]:
    """The source names in the order their bytes lie in the converted parameter, where the
    converter only stacks or concatenates them along the leading dimension (a mixture of
    experts stored per expert); None for any other converter."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    by_pattern: dict = {}
    for name, pattern in keys:
        by_pattern.setdefault(pattern, []).append(name)
    lists = [by_pattern[p] for p in converter.source_patterns if p in by_pattern]
    if len(lists) != len(by_pattern):
        return None
    merge = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    if merge and len(ops) == 1 and len(lists) == 1:
        return lists[0]
    if merge and len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1:
        if len({len(x) for x in lists}) != 1:
            return None
        return [x[e] for e in range(len(lists[0])) for x in lists]  # expert-major
    if len(ops) == 1 and isinstance(ops[0], Concatenate) and ops[0].dim == 0:
        return [n for x in lists for n in x]
    return None


def recipes(model: nn.Module, tensors: dict) -> dict:
    """The recipe of every parameter and buffer of `model` that the checkpoint holds,
    keyed by name, found the way ``transformers`` ``from_pretrained`` finds them.

    `tensors` maps each checkpoint name to an entry with ``dtype`` (safetensors name) and
    ``shape``. The model's parameters may be on the meta device. Raises StoreMismatchError
    where a checkpoint tensor converts to another shape than the model's parameter."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    from .consts import ST_TO_TORCH

    mapping = get_model_conversion_mapping(model) if hasattr(model, "base_model_prefix") else []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = getattr(model, "base_model_prefix", None)
    wanted = model.state_dict(keep_vars=True)
    out: dict = {}
    groups: dict = {}  # first target -> (converter, [(name, pattern)])
    for name in sorted(tensors, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters, prefix, wanted)
        if target not in wanted and name in wanted:
            target, pattern = rename_source_key(name, [], [], prefix, wanted)
        if target not in wanted:
            continue  # a tensor the model does not use
        if pattern is None:
            if target not in out:
                out[target] = Recipe(target, (name,), tuple(tensors[name].shape))
        else:
            groups.setdefault(target, (by_pattern[pattern], []))[1].append((name, pattern))
    for first, (converter, keys) in groups.items():
        names = tuple(n for n, _ in keys)
        patterns = tuple(p for _, p in keys)
        probes = [
            torch.empty(tensors[n].shape, dtype=ST_TO_TORCH[tensors[n].dtype], device="meta") for n in names
        ]
        shapes = {}
        config = getattr(model, "config", None)
        for target, v in _run(converter, first, names, patterns, probes, config).items():
            v = v[0] if isinstance(v, list) else v
            shapes[target] = tuple(v.shape)
        ordered = _in_memory_order(converter, keys) if len(shapes) == 1 else None
        for target, shape in shapes.items():
            if ordered is not None:
                out[target] = Recipe(target, tuple(ordered), shape)
            else:
                out[target] = Recipe(target, names, shape, converter, patterns, first, config)
    for target, r in out.items():
        want = tuple(wanted[target].shape)
        if r.shape != want:
            raise StoreMismatchError(
                f"checkpoint tensor(s) {list(r.sources)[:3]} give {target!r} the shape {r.shape}, but the model's "
                f"configuration makes it {want}; the checkpoint and its config.json do not match"
            )
    return out


__all__ = ["Recipe", "recipes"]
