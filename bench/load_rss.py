"""Constant memory: peak RSS and time to first token, loading an 8 GB checkpoint with a
1 GiB budget, TensorStream `from_pretrained` against transformers' `from_pretrained(
device_map="auto", max_memory={"cpu": "1GiB"}, offload_folder=...)`. Each run in its own
process, page cache dropped for the checkpoint first.

Default model: Llama architecture, fp32, hidden 2048, intermediate 5632, 36 layers,
vocab 32000 (8.0 GB).

Usage: python bench/load_rss.py [--workdir DIR] [--layers 36] [--budget-gb 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(args) -> None:
    import torch
    from _common import drop_caches, report_result

    from tensorstream.memory import peak_rss

    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    drop_caches([args.ckpt])
    t0 = time.perf_counter()
    if args.role == "tensorstream":
        import tensorstream as ts

        model = ts.from_pretrained(
            args.ckpt,
            ts.Config(os.path.join(args.workdir, "ts"), vram_budget_gb=args.budget_gb),
            dtype=torch.float32,
        )
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt,
            dtype=torch.float32,
            device_map="auto",
            max_memory={"cpu": f"{args.budget_gb:g}GiB"},
            offload_folder=os.path.join(args.workdir, f"acc-{os.getpid()}"),
        ).eval()
    load = time.perf_counter() - t0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    ttft = time.perf_counter() - t0
    res = {"load_s": load, "ttft_s": ttft, "peak_rss": peak_rss(), "token": out[0, -1].item()}
    if args.role == "tensorstream":
        s = ts.get_model_statistics(model)
        res["stats"] = {k: s[k] for k in ("backend", "peak_usage_bytes", "budget_bytes", "bytes_read")}
    report_result(res)


def run(role: str, args) -> dict:
    from _common import run_child

    cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--workdir", args.workdir]
    cmd += ["--layers", str(args.layers), "--budget-gb", str(args.budget_gb)]
    res = run_child(cmd, role)
    print(f"{role}: {res}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--workdir", default=os.path.join(HERE, "out", "load_rss"))
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--budget-gb", type=float, default=1.0)
    args = ap.parse_args()
    args.ckpt = os.path.join(args.workdir, f"ckpt-{args.layers}")
    if args.child:
        args.role = args.child
        child(args)
        return 0
    import shutil

    import torch
    from _checkpoint import write_sharded_llama
    from _common import llama_config, machine, print_table

    size = write_sharded_llama(args.ckpt, llama_config(2048, 5632, args.layers, 32), torch.float32)
    ts_res = run("tensorstream", args)
    hf = run("transformers", args)
    for d in os.listdir(args.workdir):
        if d.startswith("acc-"):
            shutil.rmtree(os.path.join(args.workdir, d), ignore_errors=True)
    rows = [
        [
            "TensorStream from_pretrained",
            f"{ts_res['peak_rss'] / 1e9:.2f} GB",
            f"{ts_res['ttft_s']:.1f} s",
            f"{ts_res['load_s']:.1f} s",
            ts_res["stats"]["backend"],
        ],
        [
            "transformers device_map=auto + offload_folder",
            f"{hf['peak_rss'] / 1e9:.2f} GB",
            f"{hf['ttft_s']:.1f} s",
            f"{hf['load_s']:.1f} s",
            f"same token: {hf['token'] == ts_res['token']}",
        ],
    ]
    print()
    print_table(
        f"Loading a {size / 1e9:.1f} GB checkpoint with a {args.budget_gb:g} GiB budget, {machine()}",
        ["run", "peak RSS", "time to first token", "of which loading", "note"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
