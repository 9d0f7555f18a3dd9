"""CPU offload benchmark: a 2.2 GB fp32 Llama-architecture model (hidden 2048, intermediate
5632, 8 layers, vocab 32000), 32-token prompt, greedy decoding.

In one run, each configuration in its own process (so peak RSS is its own), it prints:
tokens/s in memory, with TensorStream at a 1 GiB budget and with Accelerate disk offload at
the same budget (device_map="auto", max_memory={"cpu": "1GiB"}, offload_folder=...), with a
warm page cache; the first token after the files were evicted from the page cache
(posix_fadvise DONTNEED); peak RSS while generating; and the share of the files each side
reads that the page cache held as its timed run started (mincore), on which disk-offload
speed depends. It also measures, in paired runs,
what the check against store files changed under a running model costs (docs/reliability.md):
TensorStream with and without it.

Usage: python bench/cpu_offload.py [--budget-gb 1] [--tokens 32] [--pairs 4] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(args) -> None:
    import torch
    from _common import drop_caches, page_cache_share, report_result, time_generate
    from transformers import AutoModelForCausalLM

    from tensorstream.memory import peak_rss, reset_peak_rss

    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, 32), generator=torch.Generator().manual_seed(1))
    res = {}
    evict = []
    if args.role == "memory":
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
    elif args.role in ("tensorstream", "tensorstream-unchecked"):
        import tensorstream as ts

        if args.role == "tensorstream-unchecked":
            # The cost of the protection against files changed under a running model: the
            # same run without its check (benchmark only; no public switch turns it off).
            from tensorstream.sources import _OpenFiles

            _OpenFiles.check_unchanged = lambda self: None

        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
        t0 = time.perf_counter()
        model = ts.offload(model, ts.Config(args.store, vram_budget_gb=args.budget_gb))
        res["offload_s"] = time.perf_counter() - t0
        evict = [ts.get_model_statistics(model)["store_path"]]
    else:
        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt,
            dtype=torch.float32,
            device_map="auto",
            max_memory={"cpu": f"{args.budget_gb:g}GiB"},
            offload_folder=args.offload_folder,
        ).eval()
        evict = [args.offload_folder, args.ckpt]
    import gc

    gc.collect()
    reset_peak_rss()
    if evict:
        drop_caches(evict)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        res["cold_first_token_s"] = time.perf_counter() - t0
    time_generate(model, ids, 2)  # warm-up
    # How much of the files this side reads the page cache holds as the timed run starts:
    # disk-offload speed depends on it (reads from memory or from the disk).
    res["page_cache"] = page_cache_share(evict) if evict else None
    res["tok_s"], out = time_generate(model, ids, args.tokens)
    res["tokens"] = out[0].tolist()
    res["peak_rss"] = peak_rss()
    if args.role.startswith("tensorstream"):
        import tensorstream as ts

        s = ts.get_model_statistics(model)
        res["stats"] = {
            k: s[k]
            for k in (
                "backend",
                "peak_usage_bytes",
                "budget_bytes",
                "kept_layers",
                "units",
                "bytes_read",
                "cache_hit_rate",
                "prefetch_hit_rate",
                "stall_seconds",
            )
        }
    report_result(res)


def run(role: str, args, **extra) -> dict:
    from _common import run_child

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        role,
        "--ckpt",
        args.ckpt,
        "--store",
        args.store,
    ]
    cmd += [
        "--offload-folder",
        args.offload_folder,
        "--budget-gb",
        str(args.budget_gb),
        "--tokens",
        str(args.tokens),
    ]
    t0 = time.perf_counter()
    res = run_child(cmd, f"{role} run")
    cache = (
        ""
        if res.get("page_cache") is None
        else f", page cache held {100 * res['page_cache']:.0f}% of its files"
    )
    print(
        f"{role}: {res.get('tok_s', 0):.2f} tok/s, cold first token {res.get('cold_first_token_s', float('nan')):.2f}s, "
        f"peak RSS {res['peak_rss'] / 1e9:.2f} GB{cache} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--store", default=None)
    ap.add_argument("--offload-folder", default=None)
    ap.add_argument("--budget-gb", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--pairs", type=int, default=4, help="paired runs measuring the file check's cost")
    args = ap.parse_args()
    if args.child:
        args.role = args.child
        child(args)
        return 0
    import torch
    from _common import build_llama, llama_config, machine, print_table

    work = args.workdir or tempfile.mkdtemp(prefix="ts-cpu-bench-")
    args.ckpt = os.path.join(work, "ckpt")
    args.store = os.path.join(work, "store")
    args.offload_folder = os.path.join(work, "accelerate-offload")
    if not os.path.exists(os.path.join(args.ckpt, "config.json")):
        model = build_llama(llama_config(2048, 5632, 8, 32), torch.float32)
        model.save_pretrained(args.ckpt)
        del model
    ref = run("memory", args)
    ts_first = run("tensorstream", args)  # writes the store
    ts_res = run("tensorstream", args)  # reuses it: the measured run
    # The file check's cost (see docs/reliability.md), from pairs of adjacent runs in
    # alternating order: (checked, unchecked), (unchecked, checked), ...
    pairs = []
    for k in range(args.pairs):
        if k % 2 == 0:
            c = ts_res if k == 0 else run("tensorstream", args)
            u = run("tensorstream-unchecked", args)
        else:
            u = run("tensorstream-unchecked", args)
            c = run("tensorstream", args)
        pairs.append((c, u))
    # positive: the runs without the check were faster by that share
    check_cost = statistics.median(u["tok_s"] / c["tok_s"] - 1 for c, u in pairs)
    acc = run("accelerate", args)
    same_ts = all(r["tokens"] == ref["tokens"] for r in [ts_first, *(r for pair in pairs for r in pair)])
    same_acc = acc["tokens"] == ref["tokens"]
    budget = args.budget_gb * 2**30
    rows = [
        ["in memory", f"{ref['tok_s']:.2f}", "", f"{ref['peak_rss'] / 1e9:.2f} GB", "", "reference"],
        [
            f"TensorStream, {args.budget_gb:g} GiB budget",
            f"{ts_res['tok_s']:.2f}",
            f"{ts_res['cold_first_token_s']:.2f} s",
            f"{ts_res['peak_rss'] / 1e9:.2f} GB",
            f"{100 * ts_res['page_cache']:.0f}%",
            f"tokens identical: {same_ts}; {ts_res['stats']['backend']}",
        ],
        [
            f"Accelerate disk offload, {args.budget_gb:g} GiB",
            f"{acc['tok_s']:.2f}",
            f"{acc['cold_first_token_s']:.2f} s",
            f"{acc['peak_rss'] / 1e9:.2f} GB",
            f"{100 * acc['page_cache']:.0f}%",
            f"tokens identical: {same_acc}",
        ],
        [
            "TensorStream vs Accelerate",
            f"{ts_res['tok_s'] / acc['tok_s']:.2f}x",
            f"{acc['cold_first_token_s'] / ts_res['cold_first_token_s']:.2f}x faster",
            "",
            "",
            "",
        ],
        [
            "TensorStream without the file check",
            " / ".join(f"{u['tok_s']:.2f}" for _, u in pairs),
            "",
            "",
            "",
            "with it: "
            + " / ".join(f"{c['tok_s']:.2f}" for c, _ in pairs)
            + f"; without the check {100 * check_cost:+.1f}% tok/s (median of {len(pairs)} adjacent pairs)",
        ],
        [
            "TensorStream peak RSS - budget",
            "",
            "",
            f"{(ts_res['peak_rss'] - budget) / 1e6:.0f} MB",
            "",
            "target <= 600 MB",
        ],
    ]
    print()
    print_table(
        f"CPU offload, 2.2 GB fp32 Llama, {machine()}",
        ["run", "tok/s (warm)", "first token (cold)", "peak RSS", "page cache held", "note"],
        rows,
    )
    print(f"\nTensorStream stats: {json.dumps(ts_res['stats'])}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same_ts else 1


if __name__ == "__main__":
    sys.exit(main())
