"""Performance tuning: how the budget, the prefetch strategy, the I/O threads, the backend,
compression and (on CUDA) the pinned host cache change the speed and the bytes streamed.

Each setting offloads the same small Llama (built locally, seeded random weights, no
download), generates greedily after a warm-up, and prints one row of a table made from
`tensorstream.get_model_statistics`. Every row's tokens must equal the model's in memory.

Tokens/s are of this run on this machine: with a model this small, on a shared machine, they
are noisy; the bytes read per token and the layers kept are exact. Run it with a larger model
on your hardware to choose settings.

    python examples/performance_tuning.py
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorstream

NEW_TOKENS = 8
REPEATS = 3  # the fastest of three runs: less noise from other work on the machine


def build_model() -> LlamaForCausalLM:
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


def settings(cuda: bool) -> list:
    """(what the row shows, the Config fields it sets); the budget is a fraction of the model."""
    rows = [
        ("budget 30% of the model", dict(budget=0.3)),
        ("budget 50%", dict(budget=0.5)),
        ("budget 100%", dict(budget=1.0)),
        ("50%, prefetch_strategy=none", dict(budget=0.5, prefetch_strategy="none")),
        ("50%, prefetch_strategy=next_layer", dict(budget=0.5, prefetch_strategy="next_layer")),
        ("50%, num_io_threads=1", dict(budget=0.5, num_io_threads=1)),
        ("50%, backend=pread (O_DIRECT)", dict(budget=0.5, backend="pread")),
        ("50%, compression_enabled=True", dict(budget=0.5, compression_enabled=True, store_name="z.tstore")),
    ]
    if cuda:  # the pinned host tier exists only on CUDA
        rows.append(("50%, host_cache_gb=0 (no host tier)", dict(budget=0.5, host_cache_gb=0)))
    return rows


def generate(model, prompt):
    with torch.no_grad():
        return model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
        )


def timed(model, prompt):
    """The tokens of each run and the seconds of the fastest."""
    outputs, seconds = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        outputs.append(generate(model, prompt))
        seconds.append(time.perf_counter() - start)
    return outputs, min(seconds)


def main() -> int:
    torch.set_num_threads(1)  # a model this small gains nothing from more threads (leave out for real models)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    reference = build_model().to(device)
    expected = generate(reference, prompt)  # also the warm-up
    _, seconds = timed(reference, prompt)
    in_memory = NEW_TOKENS / seconds
    size = tensorstream.estimate_model_memory(reference)
    del reference
    print(f"model {size / 1e6:.1f} MB on {device}, {NEW_TOKENS} new tokens, the fastest of {REPEATS} runs")
    print(f"in memory: {in_memory:.1f} tok/s\n")

    header = ("setting", "tok/s", "MB read/token", "kept", "hit rate", "prefetched", "stall s", "same")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    all_same = True
    with tempfile.TemporaryDirectory() as storage:
        for name, fields in settings(device == "cuda"):
            fields = dict(fields)
            budget_gb = fields.pop("budget") * size / 2**30
            config = tensorstream.Config(storage, vram_budget_gb=budget_gb, **fields)
            model = tensorstream.offload(build_model(), config).to(device)
            generate(model, prompt)  # warm-up: the planner learns the order of the layers
            before = tensorstream.get_model_statistics(model)
            outputs, seconds = timed(model, prompt)
            s = tensorstream.get_model_statistics(model)
            same = all(torch.equal(tokens, expected) for tokens in outputs)
            all_same &= same
            read = (s["bytes_read"] - before["bytes_read"]) / (REPEATS * NEW_TOKENS)
            row = (
                name,
                f"{NEW_TOKENS / seconds:.1f}",
                f"{read / 1e6:.1f}",
                f"{s['kept_layers']} of {s['units']}",
                f"{s['cache_hit_rate']:.0%}",
                f"{s['prefetch_hit_rate']:.0%}",
                f"{(s['stall_seconds'] - before['stall_seconds']) / REPEATS:.2f}",
                "yes" if same else "NO",
            )
            print("| " + " | ".join(row) + " |", flush=True)
            del model
            gc.collect()

    print()
    print("MB read/token: bytes read from the store per generated token (a larger budget keeps more")
    print("layers resident; compression reads fewer bytes). prefetched: share of layer accesses that")
    print("found the layer already loaded ahead. stall s: time a run waited for a layer.")
    print(f"\nevery setting generated the tokens of the model in memory: {all_same}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
