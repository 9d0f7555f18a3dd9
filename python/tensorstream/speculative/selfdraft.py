"""A draft built from the target itself: ``offload(model, config, draft="int8")``
(:data:`~tensorstream.speculative.draft.SELF_DRAFTS`).

The draft is a copy of the model whose linear layers hold int8 weights (weight-only,
symmetric, one scale per output channel): a quarter of the bytes of fp32 ones to read per
drafted token, in memory beside a target that streams. Everything else (embeddings,
norms, rotary tables) is the target's own tensors, shared, so it costs nothing beside the
target; what the target streams, ``offload()`` gives the draft its own copy of (the budget
counts it: :func:`tensorstream.budget.kept_beside`). The target verifies every drafted token
at full precision, so outputs stay the target's own.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .draft import detach_draft

QUANTIZE_BLOCK = 1 << 22
"""Weights quantized at once (elements): the float temporaries of quantizing are 16 MiB."""


PACKED_K = 16
"""``torch._weight_int8pack_mm`` on the CPU gives wrong results (or crashes) unless the
inner dimension is a multiple of this (measured with torch 2.15: 24, 40 and 100 fail; 16,
48, 64, 80, 1024 and 2816 are exact); other layers take the dequantizing path."""


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with ``W ~= qweight * scale[:, None]``: int8 weights, one fp32 scale
    per output channel, activations in floating point.

    On the CPU the product is ``torch._weight_int8pack_mm`` with bf16 activations. Measured
    on a 2-core AVX-512 EPYC with torch 2.15, one token, the layers of a hidden-1024 Llama
    (1024x1024, 2816x1024, 1024x2816, the 32000x1024 head): 36-86 us and 1.9 ms, against
    76-222 us and 7.9 ms for the fp32 ``F.linear`` it replaces (2.1-4.2x faster). The public
    path, dequantizing then ``F.linear``, took 10-14x longer than fp32 (it writes a float
    weight each call); the same kernel with fp32 activations 2-6x longer (no vectorised fp32
    kernel). bf16 activations move the relative error from the int8 weights' 0.8% to 0.85%.
    ``torch.ao``'s dynamic quantization was faster still, but it quantizes the activations
    too (twice the error), has no CUDA kernel and is deprecated. On other devices (CUDA) the
    weight is dequantized to the activations' dtype for ``F.linear``: public operations only,
    at the speed the dequantization allows.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Int8WeightOnlyLinear:
        """Quantize `weight` (out x in): each row by its largest magnitude over 127. Rows are
        taken a block at a time, so the float temporaries stay small beside a large head."""
        out_f, in_f = weight.shape
        q = torch.empty((out_f, in_f), dtype=torch.int8, device=weight.device)
        scale = torch.empty(out_f, dtype=torch.float32, device=weight.device)
        rows = max(1, QUANTIZE_BLOCK // max(in_f, 1))
        with torch.no_grad():
            for lo in range(0, out_f, rows):
                w = weight[lo : lo + rows].detach()
                amax = w.abs().amax(dim=1).float()
                s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
                # torch.div, not div_: the quotient is a new tensor, the model's weight stays.
                q[lo : lo + rows] = torch.div(w, s[:, None]).round_().clamp_(-127, 127)
                scale[lo : lo + rows] = s
            b = bias.detach().clone() if bias is not None else None
        return cls(q, scale, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.in_features % PACKED_K == 0:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def build_int8_draft(model: nn.Module, head: bool = True) -> nn.Module:
    """A draft for `model` (same class, so it can ``generate()``) whose linear layers are
    :class:`Int8WeightOnlyLinear`: every ``nn.Linear`` (and transformers' ``Conv1D``, GPT-2's)
    whose weight no other module uses, the output head too if `head`. A head tied to the
    input embedding stays shared: it costs nothing beside the target. The head is quantized
    by default: on the fp32 Llama of ``bench/speculative.py`` (hidden 1024, 16 layers,
    vocabulary 32000) an int8 head costs 3% of the target's bytes more than sharing it and
    takes 18% off the draft's time (27.4 against 33.6 ms a token; 74 for the fp32 target), and
    where the target streams its head the draft's own copy is a quarter of an fp32 one.

    The other parameters and buffers are the model's own objects, not copies: the module tree
    is deep-copied with them (and the quantized layers, made one at a time) given to
    ``copy.deepcopy`` as already copied, so building never holds a second float copy of the
    model. Call it while the weights are real, before ``offload()`` frees them.

    >>> draft = build_int8_draft(model)
    >>> model.generate(ids, assistant_model=draft)  # or offload(model, config, draft="int8")
    """
    users: dict = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    out_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    memo: dict = {}
    for mod in model.modules():
        weight = _linear_weight(mod)
        if weight is None or users.get(id(mod.weight)) != 1 or (mod is out_head and not head):
            continue
        memo[id(mod)] = Int8WeightOnlyLinear.from_weight(weight, mod.bias)
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    draft = copy.deepcopy(model, memo)
    detach_draft(draft)
    return draft.eval()


def _linear_weight(mod: nn.Module) -> Optional[torch.Tensor]:
    """The (out x in) weight of a linear layer that can be quantized, or None."""
    if type(mod) is nn.Linear:
        return mod.weight
    if type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers"):
        return mod.weight.t()  # transformers' Conv1D stores (in x out)
    return None
