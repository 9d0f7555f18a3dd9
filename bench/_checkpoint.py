"""Write a Llama-architecture safetensors checkpoint shard by shard, with seeded random
weights, never holding more than one layer in memory (for checkpoints larger than RAM)."""

from __future__ import annotations

import json
import os

import torch


def write_sharded_llama(path: str, cfg, dtype: torch.dtype, seed: int = 0, layers_per_shard: int = 2) -> int:
    """Returns the checkpoint's size in bytes. Skips the work if it is already complete."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            return json.load(f)["metadata"]["total_size"]
    os.makedirs(path, exist_ok=True)
    cfg.dtype = dtype
    cfg.save_pretrained(path)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(cfg)
    shapes = {n: tuple(p.shape) for n, p in skeleton.named_parameters()}
    groups = [[n for n in shapes if not n.startswith("model.layers.")]]
    for start in range(0, cfg.num_hidden_layers, layers_per_shard):
        keep = {
            f"model.layers.{i}." for i in range(start, min(start + layers_per_shard, cfg.num_hidden_layers))
        }
        groups.append([n for n in shapes if any(n.startswith(k) for k in keep)])
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = shapes[n]
            if n.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
            tensors[n] = t
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    with open(index_path + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    os.replace(index_path + ".tmp", index_path)
    return total
