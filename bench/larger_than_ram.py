"""Larger than RAM: a 27 GB fp32 Llama-7B-shaped checkpoint (hidden 4096, intermediate
11008, 32 layers, vocab 32000) on a machine with less RAM, built shard by shard.

Times forwards of a 16-token prompt, each configuration in its own process:
TensorStream `from_pretrained` (streaming from the safetensors files in place, default CPU
budget or --budget-gb) and Accelerate disk offload (device_map="auto", max_memory={"cpu":
"8GiB"}, offload_folder=...). Prints bytes read from disk per forward and the limit: that
figure over the O_DIRECT read bandwidth measured in the same run.

Usage: python bench/larger_than_ram.py [--workdir DIR] [--forwards 3] [--budget-gb N] [--layers 32]
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
    from _common import drop_caches, page_cache_share, report_result

    from tensorstream.memory import peak_rss

    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    res = {"forward_s": []}
    drop_caches([args.ckpt])
    t0 = time.perf_counter()
    if args.role == "tensorstream":
        import tensorstream as ts

        cfg = ts.Config(
            os.path.join(args.workdir, "ts-store"), vram_budget_gb=args.budget_gb or None, num_io_threads=4
        )
        model = ts.from_pretrained(args.ckpt, cfg, dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt,
            dtype=torch.float32,
            device_map="auto",
            max_memory={"cpu": "8GiB"},
            offload_folder=os.path.join(args.workdir, "acc-offload"),
        ).eval()
    res["load_s"] = time.perf_counter() - t0
    # The files this side reads: how much of them the page cache holds before each forward
    # (disk offload is fast when its folder is in memory; larger than RAM, it cannot all be).
    files = [args.ckpt] + ([os.path.join(args.workdir, "acc-offload")] if args.role != "tensorstream" else [])
    logits = None
    for _ in range(args.forwards):
        res.setdefault("page_cache", []).append(page_cache_share(files))
        before = None
        if args.role == "tensorstream":
            before = ts.get_model_statistics(model)["bytes_read"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model(ids).logits
        res["forward_s"].append(time.perf_counter() - t0)
        if before is not None:
            res.setdefault("bytes_per_forward", []).append(
                ts.get_model_statistics(model)["bytes_read"] - before
            )
        logits = out if logits is None else logits
    res["argmax"] = logits[0, -1].argmax().item()
    res["logits_sum"] = float(logits.double().sum())
    res["peak_rss"] = peak_rss()
    if args.role == "tensorstream":
        s = ts.get_model_statistics(model)
        res["stats"] = {
            k: s[k]
            for k in ("backend", "budget_bytes", "kept_layers", "units", "peak_usage_bytes", "fallbacks")
        }
    report_result(res)


def odirect_bandwidth(ckpt: str) -> float:
    """GB/s of the core engine reading the checkpoint's layer shards cold with O_DIRECT."""
    import torch  # noqa: F401
    from _common import drop_caches

    from tensorstream import _core
    from tensorstream.memory import aligned_empty

    view = _core.SafetensorsView(ckpt)
    tensors = view.tensors()
    layers = sorted({int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")})[:4]
    drop_caches([ckpt])
    engine = _core.Engine("pread", 4)
    total, t0 = 0, time.perf_counter()
    for k in layers:
        lay = view.layout(f"l{k}", [n for n in tensors if n.startswith(f"model.layers.{k}.")])
        buf = aligned_empty(lay.buffer_len)
        engine.wait(engine.submit(lay, buf.data_ptr(), lay.buffer_len, True, buf))
        total += lay.bytes_to_read
    return total / (time.perf_counter() - t0)


def run(role: str, args) -> dict:
    from _common import run_child

    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        role,
        "--workdir",
        args.workdir,
        "--forwards",
        str(args.forwards),
    ]
    cmd += ["--budget-gb", str(args.budget_gb or 0), "--layers", str(args.layers)]
    t0 = time.perf_counter()
    res = run_child(cmd, role)
    print(
        f"{role}: load {res['load_s']:.1f}s, forwards {[f'{x:.2f}' for x in res['forward_s']]}, peak RSS {res['peak_rss'] / 1e9:.1f} GB, "
        f"page cache held {[f'{100 * x:.0f}%' for x in res['page_cache']]} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--workdir", default=os.path.join(HERE, "out", "larger_than_ram"))
    ap.add_argument("--forwards", type=int, default=3)
    ap.add_argument("--budget-gb", type=float, default=0)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--skip-accelerate", action="store_true")
    args = ap.parse_args()
    args.ckpt = os.path.join(args.workdir, f"ckpt-{args.layers}")
    if args.child:
        args.role = args.child
        child(args)
        return 0
    import torch
    from _checkpoint import write_sharded_llama
    from _common import llama_config, machine, print_table

    from tensorstream.memory import total_ram

    t0 = time.perf_counter()
    size = write_sharded_llama(args.ckpt, llama_config(4096, 11008, args.layers, 32), torch.float32)
    print(
        f"checkpoint: {size / 1e9:.1f} GB ({time.perf_counter() - t0:.0f}s); RAM {total_ram() / 1e9:.1f} GB",
        flush=True,
    )
    os.sync()  # the bandwidth of the disk, not of the disk still writing the checkpoint back
    bw = odirect_bandwidth(args.ckpt)
    print(f"O_DIRECT read bandwidth: {bw / 1e9:.2f} GB/s", flush=True)
    ts_res = run("tensorstream", args)
    acc = None if args.skip_accelerate else run("accelerate", args)
    steady = lambda r: min(r["forward_s"][1:]) if len(r["forward_s"]) > 1 else r["forward_s"][0]  # noqa: E731
    per_fwd = ts_res["bytes_per_forward"][-1]
    limit = per_fwd / bw
    same = acc is None or (acc["argmax"] == ts_res["argmax"])
    rows = [
        ["checkpoint", f"{size / 1e9:.1f} GB fp32", f"machine RAM {total_ram() / 1e9:.1f} GB"],
        ["O_DIRECT read bandwidth (measured)", f"{bw / 1e9:.2f} GB/s", ""],
        ["TensorStream first forward", f"{ts_res['forward_s'][0]:.1f} s", f"load {ts_res['load_s']:.1f} s"],
        [
            "TensorStream steady forward",
            f"{steady(ts_res):.1f} s",
            f"budget {ts_res['stats']['budget_bytes'] / 2**30:.1f} GiB, {ts_res['stats']['kept_layers']}/{ts_res['stats']['units']} layers kept",
        ],
        ["bytes read from disk per forward", f"{per_fwd / 1e9:.2f} GB", ""],
        [
            "limit = bytes per forward / bandwidth",
            f"{limit:.1f} s",
            f"TensorStream at {steady(ts_res) / limit:.2f}x its limit"
            if limit
            else "nothing streamed: all layers fit the budget",
        ],
        [
            "Accelerate first forward",
            f"{acc['forward_s'][0]:.1f} s" if acc else "skipped",
            f"load {acc['load_s']:.1f} s" if acc else "",
        ],
        ["Accelerate steady forward", f"{steady(acc):.1f} s" if acc else "skipped", ""],
        [
            "page cache held of the files read, before each forward: TensorStream / Accelerate",
            " / ".join(
                " ".join(f"{100 * x:.0f}%" for x in r["page_cache"]) if r else "skipped"
                for r in (ts_res, acc)
            ),
            "Accelerate's speed swings with this share: its offload folder is read through the page cache",
        ],
        [
            "TensorStream speed-up, steady",
            f"{steady(acc) / steady(ts_res):.2f}x" if acc else "",
            f"same next token: {same}",
        ],
        [
            "peak RSS TensorStream / Accelerate",
            f"{ts_res['peak_rss'] / 1e9:.1f} / {acc['peak_rss'] / 1e9:.1f} GB"
            if acc
            else f"{ts_res['peak_rss'] / 1e9:.1f} GB",
            "",
        ],
    ]
    print()
    print_table(f"Larger than RAM, {machine()}", ["what", "figure", "note"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
