"""Basic usage: offload a model with a memory budget below its size, generate, and check that
the tokens are those of the model in memory.

The model is a small Llama built locally from a config with seeded random weights (no
download). It runs on CPU, or on CUDA when a GPU is present.

    python examples/basic_usage.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorstream


def build_model() -> LlamaForCausalLM:
    """The same weights on every call (seeded), so one copy can stay in memory as the reference."""
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> int:
    torch.set_num_threads(1)  # a model this small gains nothing from more threads (leave out for real models)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)

    reference = build_model().to(device)
    with torch.no_grad():
        expected = reference.generate(prompt, **generate)
    size = tensorstream.estimate_model_memory(reference)  # bytes of parameters and buffers
    del reference

    with tempfile.TemporaryDirectory() as storage:
        config = tensorstream.Config(
            storage_path=storage,  # the store of the layers is written here
            vram_budget_gb=0.5 * size / 2**30,  # weights kept on the device: half the model
        )
        model = tensorstream.offload(build_model(), config)  # in place; returns the same model
        model.to(device)  # resident modules move; layers stream to the device
        with torch.no_grad():
            tokens = model.generate(prompt, **generate)

        stats = tensorstream.get_model_statistics(model)
        print(f"model: {size / 1e6:.1f} MB, budget {stats['budget_bytes'] / 1e6:.1f} MB on {stats['device']}")
        print(f"backend: {stats['backend']}")
        print(f"weights held at most: {stats['peak_usage_bytes'] / 1e6:.1f} MB")
        print(f"layers kept resident: {stats['kept_layers']} of {stats['units']}, the rest streamed")
        print(
            f"read from the store: {stats['bytes_read'] / 1e6:.1f} MB in {stats['forward_passes']} forward passes"
        )

    same = torch.equal(tokens, expected)
    print(f"generated tokens identical to the model in memory: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
