"""Models that accelerate dispatched (``from_pretrained(..., device_map="auto")`` with CPU or
disk offload, ``accelerate.dispatch_model``, ``disk_offload``), and models whose weights are
nowhere (the meta device).

accelerate leaves an offloaded module's tensors on the meta device and keeps their values in
its hook's ``weights_map`` (an ``OffloadedWeightsLoader``: a state dict in RAM, or safetensors
files in the offload folder), loading them around each forward. :class:`Dispatch` takes the
weights from there, one tensor at a time, and removes accelerate's hooks with accelerate's
own ``remove_hook_from_module``: the streamed weights go from the weights map to the store
without the model ever being whole in memory, and only the tensors that stay resident are
loaded (with ``accelerate.utils.set_module_tensor_to_device``, as accelerate's hook loads
them). accelerate is imported only for a model that has its hooks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import TensorStreamError
from .units import ParamRef, own_value

FROM_PRETRAINED = (
    "Load it with tensorstream.from_pretrained(CHECKPOINT, config), which streams the layers from the "
    "checkpoint without loading them, or load its weights before tensorstream.offload()"
)


def _on_meta(model: nn.Module) -> list:
    """(module name, module, tensor name in it) of every tensor of `model` on the meta device."""
    out = []
    for mod_name, mod in model.named_modules():
        for table in (mod._parameters, mod._buffers):
            for attr, t in table.items():
                if t is not None and t.device.type == "meta":
                    out.append((mod_name, mod, attr))
    return out


def _align_hook(module: nn.Module):
    """The accelerate hook of `module` that holds offloaded weights (``weights_map``), if any:
    the hook itself or one of a ``SequentialHook``'s."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "weights_map", None) is not None:
            return h
    return None


def _holds(weights_map, key: str) -> bool:
    """Whether accelerate's `weights_map` has `key`, without reading it: ``in`` on its
    mappings reads the tensor from disk. A ``PrefixedDataset`` is unwrapped and an
    ``OffloadedWeightsLoader`` asked through its public ``state_dict`` and ``index``; any
    other mapping is asked with ``in``."""
    while hasattr(weights_map, "dataset") and isinstance(getattr(weights_map, "prefix", None), str):
        key = weights_map.prefix + key
        weights_map = weights_map.dataset
    tables = [getattr(weights_map, name, None) for name in ("state_dict", "index")]
    if all(isinstance(t, dict) for t in tables):
        return any(key in t for t in tables)
    return key in weights_map


class Dispatch:
    """What accelerate dispatched on a model (its hooks, and where its offloaded tensors
    lie), undone for :func:`tensorstream.offload` and put back if the offload is refused.

    Offloaded tensors are known by where they are registered (module, name), not by object:
    removing a hook whose weights were on the CPU before it was attached (a GPU run with CPU
    offload) loads them back as new objects."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.hooked = [(m, m._hf_hook) for m in model.modules() if hasattr(m, "_hf_hook")]
        self.added = {}  # what dispatch_model set on the model itself (the `to` that warns)
        self.lazy: dict = {}  # (id(module), name) -> (hook, key in its weights map)
        self.originals: list = []  # (table, name, tensor) as accelerate left them
        self.changed = False
        missing = []
        for mod_name, mod, attr in _on_meta(model):
            found = self._find(mod_name, attr)
            table = mod._parameters if attr in mod._parameters else mod._buffers
            self.originals.append((mod, table, attr, table[attr]))
            if found is None:
                missing.append(f"{mod_name}.{attr}" if mod_name else attr)
            else:
                self.lazy[(id(mod), attr)] = found
        if missing:
            where = "accelerate's hooks hold no value for" if self.hooked else "no data:"
            raise TensorStreamError(
                f"{type(model).__name__} has {len(missing)} tensor(s) on the meta device, {where} "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''}: its weights are nowhere to stream from. "
                + FROM_PRETRAINED
            )

    def _find(self, mod_name: str, attr: str) -> Optional[tuple]:
        """The hook holding the value of `attr` of module `mod_name`, the nearest enclosing
        module's first (accelerate hooks a block and keys its weights relative to it), and
        the key, as transformers' ``load_offloaded_parameter`` looks it up."""
        parts = mod_name.split(".") if mod_name else []
        for k in range(len(parts), -1, -1):
            owner = self.model.get_submodule(".".join(parts[:k]))
            hook = _align_hook(owner)
            if hook is None:
                continue
            key = ".".join(parts[k:] + [attr])
            if _holds(hook.weights_map, key):
                return hook, key
        return None

    @property
    def active(self) -> bool:
        return bool(self.hooked or self.lazy)

    def value(self, p: ParamRef) -> torch.Tensor:
        """The value of streamed parameter `p`: read from accelerate's weights map (one tensor
        in memory at a time) where accelerate offloaded it, else the model's own."""
        found = self.lazy.get((id(p.module), p.attr))
        if found is None or p.get().device.type != "meta":
            return own_value(p)
        hook, key = found
        t = hook.weights_map[key]
        t = t.detach() if t.requires_grad else t
        return t if t.dtype == p.dtype else t.to(p.dtype)

    def execution_device(self, module: nn.Module, attr: str) -> torch.device:
        """The device accelerate runs offloaded tensor `attr` of `module` on (the CPU when it
        does not say)."""
        hook, _ = self.lazy[(id(module), attr)]
        return torch.device(hook.execution_device if hook.execution_device is not None else "cpu")

    def remove_hooks(self) -> None:
        """Remove accelerate's hooks (and the ``to`` it wraps on the model) with its own
        ``remove_hook_from_module``: the model's forwards are its own again."""
        if not self.hooked:
            return
        from accelerate.hooks import remove_hook_from_module

        self.added = {k: v for k, v in vars(self.model).items() if k in ("to", "cuda", "hf_device_map")}
        self.changed = True
        remove_hook_from_module(self.model, recurse=True)
        self.model.__dict__.pop("hf_device_map", None)  # it no longer describes the model

    def settle(self, streamed: set) -> None:
        """Give every tensor accelerate offloaded a value where the model will hold it: the
        streamed parameters (ids in `streamed`) placeholders of their shape (their values are
        in the store), the others their value from accelerate's weights map, on the device
        accelerate ran them on. Tied tensors stay tied."""
        if not self.lazy:
            return
        from accelerate.utils import set_module_tensor_to_device

        self.changed = True
        done: dict = {}
        for mod, table, attr, _ in self.originals:
            t = table[attr]
            device = self.execution_device(mod, attr)
            if id(t) in done:
                table[attr] = done[id(t)]
            elif id(t) in streamed:
                zero = torch.zeros((), dtype=t.dtype, device=device)
                table[attr] = nn.Parameter(zero.expand(t.shape), t.requires_grad)
            elif t.device.type == "meta":
                hook, key = self.lazy[(id(mod), attr)]
                # A copy: the value may view a file of the offload folder (accelerate's .dat memmaps).
                value = hook.weights_map[key].to(t.dtype, copy=True)
                set_module_tensor_to_device(mod, attr, device, value=value)
            elif t.device != device:  # loaded back by the hook's removal, where it was before
                set_module_tensor_to_device(mod, attr, device)
            done[id(t)] = table[attr]

    def restore(self) -> None:
        """Put the model back as accelerate dispatched it (after a refused offload)."""
        if not self.changed:
            return
        for _, table, attr, t in self.originals:
            table[attr] = t
        from accelerate.hooks import add_hook_to_module

        for module, hook in self.hooked:
            if not hasattr(module, "_hf_hook"):
                add_hook_to_module(module, hook)
        self.model.__dict__.update(self.added)


def check_devices(model: nn.Module) -> None:
    """Refuse a model whose tensors lie on several devices (accelerate split it across
    GPUs): the units stream to one device."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise TensorStreamError(
            f"{type(model).__name__} has tensors on {len(devices)} devices ({', '.join(sorted(map(str, devices)))}): "
            "tensorstream.offload() streams to one device. Load it for one device (one GPU, with CPU or disk "
            'offload: device_map="auto" and max_memory naming that GPU alone), or use '
            "tensorstream.from_pretrained(CHECKPOINT, config, device=...)"
        )
