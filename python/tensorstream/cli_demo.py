"""``tensorstream demo``: offload a model built locally (a seeded Llama) and check that its
tokens are the model's in memory, each side in a child process of its own so that each
side's memory is measured alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


class CommandError(Exception):
    """A failure reported as one line on stderr with exit status `status` (2: the user's error)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _demo_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


class _TqdmStreamer:
    """A transformers streamer that advances a progress bar per generated token."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr)
        self.first = True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def _demo_run(args) -> int:
    """One side of the demo, in its own process so that its peak RSS is its own."""
    import torch

    import tensorstream as ts
    from tensorstream.memory import peak_rss, reset_peak_rss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _demo_model()
    total = ts.estimate_model_memory(model)
    ids = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    info = {"model_bytes": total}
    if args.role == "offload":
        budget_gb = args.budget_fraction * total / 2**30
        info["budget_gb"] = budget_gb
        cfg = ts.Config(args.store, vram_budget_gb=budget_gb, overwrite_store=True)  # the demo's own store
        t0 = time.perf_counter()
        model = ts.offload(model, cfg)
        info["offload_seconds"] = time.perf_counter() - t0
    import gc

    gc.collect()
    reset_peak_rss()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            streamer=_TqdmStreamer(args.tokens, "offloaded" if args.role == "offload" else "in memory"),
        )
        dt = time.perf_counter() - t0
    info.update(tokens=out[0, args.prompt :].tolist(), tok_per_s=args.tokens / dt, peak_rss=peak_rss())
    if args.role == "offload":
        s = ts.get_model_statistics(model)
        info.update(
            bytes_read=s["bytes_read"],
            hit_rate=s["cache_hit_rate"],
            prefetch_hit_rate=s["prefetch_hit_rate"],
            backend=s["backend"],
            peak_usage=s["peak_usage_bytes"],
            budget_bytes=s["budget_bytes"],
            kept=s["kept_layers"],
            units=s["units"],
        )
    print("RESULT " + json.dumps(info), flush=True)
    return 0


def _run_child(role: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tensorstream.cli",
        "_demo-run",
        role,
        "--store",
        args.store,
        "--tokens",
        str(args.tokens),
    ]
    cmd += ["--prompt", str(args.prompt), "--budget-fraction", str(args.budget_fraction)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise CommandError(f"the {role} run failed (exit status {proc.returncode}; its error is above)", 1)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def demo(args) -> int:
    if os.path.exists(args.store) and not os.path.isdir(args.store):
        raise CommandError(f"--store {args.store} is a file; it names the directory of the demo's store")
    print(
        "TensorStream demo: a Llama-architecture model (16 layers, hidden 1024, vocab 32000, fp32, seeded random "
        f"weights) generates {args.tokens} tokens greedily, in memory and offloaded with a budget of "
        f"{args.budget_fraction:.0%} of its size.",
        flush=True,
    )
    ref = _run_child("reference", args)
    off = _run_child("offload", args)
    same = ref["tokens"] == off["tokens"]
    gb = 1e9
    rows = [
        ("model size", f"{ref['model_bytes'] / gb:.2f} GB", ""),
        (
            "budget (vram_budget_gb, on CPU: RAM)",
            f"{off['budget_gb']:.3f} GiB",
            f"{args.budget_fraction:.0%} of the model",
        ),
        ("tokens/s", f"{ref['tok_per_s']:.2f}", f"{off['tok_per_s']:.2f}"),
        ("peak RSS while generating", f"{ref['peak_rss'] / gb:.2f} GB", f"{off['peak_rss'] / gb:.2f} GB"),
        (
            "weights held (engine accounting, peak)",
            "",
            f"{off['peak_usage'] / gb:.2f} GB of {off['budget_bytes'] / gb:.2f} GB budget",
        ),
        ("bytes streamed", "", f"{off['bytes_read'] / gb:.2f} GB"),
        ("layers kept resident", "", f"{off['kept']} of {off['units']}"),
        ("cache hit rate / prefetch hit rate", "", f"{off['hit_rate']:.0%} / {off['prefetch_hit_rate']:.0%}"),
        ("backend", "", off["backend"]),
    ]
    print()
    print(f"| {'':40} | {'in memory':>14} | {'TensorStream':>40} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 42}|")
    for name, a, b in rows:
        print(f"| {name:40} | {a:>14} | {b:>40} |")
    print()
    print(f"generated tokens identical to the model not offloaded: {same}")
    if not same:
        print(f"  in memory: {ref['tokens']}\n  offloaded: {off['tokens']}")
        return 1
    return 0
