"""Offload a locally built Llama model with a budget below its size and check that greedy
generation is unchanged. Runs on CPU, or on CUDA when a GPU is present.

    python examples/basic_offload.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorstream


def build(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    reference = build().to(device)
    with torch.no_grad():
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )
    size = tensorstream.estimate_model_memory(reference)
    del reference

    config = tensorstream.Config(storage_path=tempfile.mkdtemp(), vram_budget_gb=0.5 * size / 2**30)
    model = tensorstream.offload(build(), config)
    model.to(device)
    tensorstream.set_memory_pressure_callback(lambda event: print(f"memory pressure: {event}"))
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)

    stats = tensorstream.get_model_statistics(model)
    print(
        f"model {size / 1e6:.0f} MB, budget {stats['budget_gb'] * 1024:.0f} MiB, backend {stats['backend']}"
    )
    print(
        f"peak weights held {stats['peak_usage_bytes'] / 1e6:.0f} MB; layers kept {stats['kept_layers']} of {stats['units']}"
    )
    print(f"tokens identical to the model not offloaded: {torch.equal(tokens, expected)}")


if __name__ == "__main__":
    main()
