"""Shared builders for the pytest suite.

Every model is built locally from a config with seeded random weights (no network, no
downloads). Two calls with the same seed give two independent instances with identical
weights: one stays the un-offloaded reference, the other is offloaded.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tensorstream as ts

GiB = 1 << 30
PAGE = 4096
VOCAB = 256

ALL_STRATEGIES = [s.value for s in ts.PrefetchStrategy]
CPU_BACKENDS = [ts.BackendType.MMAP.value, ts.BackendType.PREAD.value]
ALL_MODES = [m.value for m in ts.MemoryPressureMode]


def tiny_llama(
    tied: bool = True,
    seed: int = 0,
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
) -> nn.Module:
    """A tiny Llama (by default hidden 64, vocab 256) with seeded random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return _build(LlamaForCausalLM, cfg, seed, dtype)


def small_llama_bf16(seed: int = 0) -> nn.Module:
    """A medium-small bf16 Llama for the GPU tests: hidden 512, 8 layers of about 5.9 MB."""
    return tiny_llama(
        tied=False,
        seed=seed,
        layers=8,
        dtype=torch.bfloat16,
        hidden=512,
        intermediate=1408,
        vocab=1024,
        heads=8,
        kv_heads=4,
    )


def tiny_gpt2(seed: int = 0, layers: int = 4, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny GPT-2 (hidden 64, vocab 256) with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return _build(GPT2LMHeadModel, cfg, seed, dtype)


def tiny_qwen2(
    tied: bool = False, seed: int = 0, layers: int = 3, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A tiny Qwen2 (Mistral-like attention with biases; hidden 64, vocab 256), in eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return _build(Qwen2ForCausalLM, cfg, seed, dtype)


def tiny_mixtral(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny Mixtral (4 experts, 2 per token; hidden 64, vocab 256), in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    return _build(MixtralForCausalLM, cfg, seed, dtype)


def _build(cls, cfg, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def blocks_of(model: nn.Module) -> list:
    """The repeated blocks TensorStream streams by default for the models built here."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return list(inner.layers)
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h"):
        return list(tr.h)
    if isinstance(model, nn.Sequential):
        return [m for m in model if any(True for _ in m.parameters())]
    if hasattr(model, "blocks"):
        return list(model.blocks)
    raise AssertionError(f"no blocks known for {type(model).__name__}; pass blocks=")


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def padded_unit_bytes(nbytes: int) -> int:
    """An upper bound on a unit's size in the store: its bytes plus a page of alignment,
    rounded up to whole 4 KiB pages."""
    return -(-(nbytes + PAGE) // PAGE) * PAGE


def resident_bytes(model: nn.Module, blocks: list | None = None) -> int:
    """Bytes of the modules that stay resident: the model minus its streamed blocks."""
    blocks = blocks_of(model) if blocks is None else blocks
    return ts.estimate_model_memory(model) - sum(param_bytes(b) for b in blocks)


def budget_gb(model: nn.Module, k: float, blocks: list | None = None) -> float:
    """A budget in GiB with room for the resident modules plus `k` streamed units (each
    counted at its padded store size) and a page of slack. Call it before offload()."""
    blocks = blocks_of(model) if blocks is None else blocks
    unit = padded_unit_bytes(max(param_bytes(b) for b in blocks))
    return (resident_bytes(model, blocks) + k * unit + PAGE) / GiB


def input_ids(batch: int = 1, length: int = 8, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_and_tokens(model: nn.Module, ids: torch.Tensor, new_tokens: int = 6) -> tuple:
    """The logits of one forward and the tokens of a greedy generate()."""
    logits = model(ids).logits
    tokens = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return logits, tokens


def offload(model: nn.Module, path, **kwargs) -> nn.Module:
    """tensorstream.offload with a Config made from `path` and `kwargs`."""
    return ts.offload(model, ts.Config(path, **kwargs))


@pytest.fixture(autouse=True)
def _no_pressure_callback():
    """Leave no memory pressure callback or probe behind for the next test (both are global)."""
    yield
    ts.set_memory_pressure_callback(None)
    ts.set_memory_probe(None)


@pytest.fixture
def ids() -> torch.Tensor:
    return input_ids()


@pytest.fixture
def fault_injection(monkeypatch):
    """Models offloaded in the test get engines whose reads can be made to fail on purpose
    (``model._tensorstream.engine.set_fault_plan(...)``); production engines cannot."""
    from tensorstream import configure

    monkeypatch.setattr(configure, "make_engine", ts._core.Engine.with_faults)


def isolate_from_other_models() -> None:
    """Models of earlier tests that are still alive (garbage not yet collected, or kept by a
    cache such as torch.compile's) stream to the CPU too, and every model on a device yields
    to one memory signal: tests that assume their models are the device's only ones collect
    the garbage and drop what the others hold."""
    import gc

    import torch

    from tensorstream import registry

    gc.collect()
    for rt in registry.peers(torch.device("cpu")):
        rt.teardown()
