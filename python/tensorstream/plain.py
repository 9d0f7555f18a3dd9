"""The one gate between torch tensors and the Rust core: a pointer and a length handed to
``_core`` (a checksum, a store writer) come only from a tensor proven plain and dense by
:func:`plain_bytes`, and a parameter streams only if :func:`why_not_streamable` finds
nothing against it. Anything else is refused with a :class:`TensorStreamError` that names
the tensor, what it is and what to do: it never reaches the core, where a wrong pointer or
length would crash the interpreter or store the wrong bytes."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .consts import TORCH_TO_ST
from .errors import TensorStreamError

_PLAIN_TYPES = (torch.Tensor, nn.Parameter)


def _type_name(t) -> str:
    cls = type(t)
    return f"{cls.__module__}.{cls.__qualname__}"


def check_initialised(model: nn.Module) -> None:
    """Refuse a model with parameters a lazy module has not created yet (their size is not
    known, so neither units nor a budget can be planned)."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise TensorStreamError(
                f"{name}: cannot be streamed: it is not initialised yet (a lazy module): run one forward before offload()"
            )


def why_not_streamable(p: torch.Tensor, allow_meta: bool = False) -> Optional[str]:
    """Why parameter `p` cannot be streamed (its bytes stored and bound again as a plain
    ``nn.Parameter`` view of a buffer), or None. `allow_meta`: a meta skeleton whose values
    come from a checkpoint (``from_pretrained``)."""
    if type(p) not in _PLAIN_TYPES:
        if isinstance(p, nn.parameter.UninitializedParameter):
            return "it is not initialised yet (a lazy module): run one forward before offload()"
        return (
            f"it is of type {_type_name(p)}, a tensor subclass: TensorStream streams plain tensors only (quantized "
            "tensor subclasses such as torchao's, optimum-quanto's and bitsandbytes' parameters do not stream yet); "
            "offload the model unquantized, or run the quantized model without TensorStream"
        )
    if p.is_meta and not allow_meta:
        return "it is on the meta device: its values are nowhere (load the model with tensorstream.from_pretrained)"
    if p.layout != torch.strided:
        return f"its layout is {p.layout}: convert it to a dense tensor (.to_dense()) before offload()"
    if p.is_nested:
        return "it is a nested tensor"
    if not p.is_contiguous():
        return (
            f"its memory is not contiguous (strides {tuple(p.stride())}): the model in memory computes with these "
            "strides and a streamed copy is contiguous, which can change the last bits of its results; make it "
            "contiguous before offload() (`module.weight.data = module.weight.data.contiguous()`)"
        )
    return None


def plain_cpu(t: torch.Tensor, name: str) -> torch.Tensor:
    """`t`'s values as a plain, dense, contiguous CPU tensor of its own dtype (a pending
    negation or conjugation resolved), refused with a TensorStreamError naming `name` where
    that cannot be had."""
    why = why_not_streamable(t)
    if why is not None:
        raise TensorStreamError(f"{name}: cannot be streamed: {why}")
    with torch.no_grad():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        return t.resolve_conj().resolve_neg().contiguous()


def plain_bytes(t: torch.Tensor, name: str) -> tuple:
    """(address, length) of the bytes of `t`, a tensor that :func:`plain_cpu` gave: checked
    again here, since these two numbers are all the core sees. The caller holds `t` until
    the core has read them (a temporary would be freed first)."""
    bad = None
    if type(t) not in _PLAIN_TYPES or t.layout != torch.strided or t.is_meta or t.is_nested:
        bad = f"a {_type_name(t)} with layout {t.layout} on {t.device}"
    elif t.device.type != "cpu" or not t.is_contiguous() or t.is_neg() or t.is_conj():
        bad = "not a contiguous CPU tensor without pending negation or conjugation"
    elif t.dtype not in TORCH_TO_ST:
        bad = f"dtype {t.dtype}, which a store cannot hold"
    nbytes = t.numel() * t.element_size()
    if bad is None and nbytes:
        end = (t.storage_offset() + t.numel()) * t.element_size()
        if t.data_ptr() == 0 or t.untyped_storage().nbytes() < end:
            bad = "its storage does not hold its bytes"
    if bad is not None:
        raise TensorStreamError(f"{name}: its bytes cannot be read: {bad}")
    return t.data_ptr(), nbytes
