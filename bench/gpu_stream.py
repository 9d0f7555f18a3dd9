"""GPU streaming benchmark: a 7 GB bf16 Llama-architecture model at a 3 GiB VRAM budget.

Prints one table: the pinned host-to-device bandwidth measured in this run; tokens/s at
batch 1 (32-token prompt, 32 new tokens) fully on the GPU, with TensorStream
(vram_budget_gb=3) and with Accelerate (device_map="auto", max_memory={0: "3GiB", "cpu":
"100GiB"}); the bytes TensorStream streams per token; the link limit (streamed bytes per
token / measured bandwidth) and TensorStream's share of it; tokens/s at batch 16. Then
the same at batch 1 and 16 with the host tier disabled (disk-bound, `--disk-tokens` new
tokens), and with a table-coded store decoded on the GPU (`backend="cuda"`,
`compression_enabled=True`), with and without the host tier: tok/s, bytes over PCIe per
token, GPU decode GB/s, and the ratio to the raw link limit (host tier) or to the
uncompressed disk-bound run.

Usage: python bench/gpu_stream.py [--layers 16] [--workdir DIR] [--skip-accelerate]
[--skip-compressed] [--skip-disk] [--disk-tokens 4]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    build_llama,
    llama_config,
    machine,
    pinned_bandwidth,
    print_table,
    time_generate,
)


def free_cuda():
    gc.collect()
    torch.cuda.empty_cache()


def run_tensorstream(
    label, ckpt, store_dir, args, extra, prompt1, prompt16, ref1, ref16, new1, new16
) -> dict:
    """TensorStream at the budget with Config `extra`: tok/s at batch 1 and 16, tokens
    against the full-GPU run's (a prefix of them for fewer tokens), and per forward pass of
    the batch-1 run the bytes over PCIe, the raw bytes they made and the bytes read."""
    from transformers import AutoModelForCausalLM

    import tensorstream as ts

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    model = ts.offload(model, ts.Config(store_dir, vram_budget_gb=args.budget_gb, **extra))
    model.to("cuda")
    print(f"TensorStream {label}: offload in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    time_generate(model, prompt1.cuda(), 2)  # first pass: reads the disk, fills the host tier
    print(f"  first generate (cold, 2 tokens): {time.perf_counter() - t0:.1f}s", flush=True)
    s0 = ts.get_model_statistics(model)
    b1, out1 = time_generate(model, prompt1.cuda(), new1)
    s1 = ts.get_model_statistics(model)
    passes = max(s1["forward_passes"] - s0["forward_passes"], 1)
    b16, out16 = time_generate(model, prompt16.cuda(), new16)
    stats = ts.get_model_statistics(model)
    r = {
        "b1": b1,
        "b16": b16,
        "same1": torch.equal(out1.cpu(), ref1[:, : out1.shape[1]].cpu()),
        "same16": torch.equal(out16.cpu(), ref16[:, : out16.shape[1]].cpu()),
        "pcie_per_pass": (s1["bytes_h2d"] - s0["bytes_h2d"]) / passes,
        "raw_per_pass": (s1.get("raw_bytes_delivered", 0) - s0.get("raw_bytes_delivered", 0)) / passes,
        "read_per_pass": (s1["bytes_read"] - s0["bytes_read"]) / passes,
        "stats": stats,
    }
    print(
        f"  {b1:.2f} tok/s batch 1, {b16:.1f} batch 16; identical tokens: {r['same1']} / {r['same16']}; "
        f"backend={stats['backend']} kept={stats['kept_layers']}/{stats['units']} "
        f"peak_usage={stats['peak_usage_bytes'] / 2**30:.2f} GiB of {stats['budget_gb']:.2f}; "
        f"pinned host={stats['pinned_host_bytes'] / 2**30:.1f} GiB; fallbacks={stats['fallbacks']}",
        flush=True,
    )
    del model
    free_cuda()
    return r


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--budget-gb", type=float, default=3.0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch16-tokens", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--skip-compressed", action="store_true", help="no table-coded (GPU-decoded) runs")
    ap.add_argument("--skip-disk", action="store_true", help="no runs with the host tier disabled")
    ap.add_argument("--disk-tokens", type=int, default=4, help="new tokens of the disk-bound runs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_stream.py needs a CUDA device", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM

    import tensorstream as ts

    work = args.workdir or tempfile.mkdtemp(prefix="ts-gpu-bench-")
    ckpt = os.path.join(work, "ckpt")
    store_dir = os.path.join(work, "store")
    cfg = llama_config(args.hidden, args.intermediate, args.layers, 32)
    torch.manual_seed(1234)
    prompt1 = torch.randint(0, cfg.vocab_size, (1, 32))
    prompt16 = torch.randint(0, cfg.vocab_size, (16, 32))
    results = {}
    print(f"machine: {machine()}", flush=True)

    bw = pinned_bandwidth()
    print(f"pinned H2D: {bw / 1e9:.1f} GB/s", flush=True)

    # 1. Fully on the GPU.
    t0 = time.perf_counter()
    model = build_llama(cfg, torch.bfloat16, device="cuda")
    model_bytes = ts.estimate_model_memory(model)
    print(f"built {model_bytes / 1e9:.2f} GB model in {time.perf_counter() - t0:.1f}s", flush=True)
    time_generate(model, prompt1.cuda(), 4)
    results["gpu_b1"], ref1 = time_generate(model, prompt1.cuda(), args.new_tokens)
    results["gpu_b16"], ref16 = time_generate(model, prompt16.cuda(), args.batch16_tokens)
    print(
        f"full GPU: {results['gpu_b1']:.2f} tok/s batch 1, {results['gpu_b16']:.1f} tok/s batch 16",
        flush=True,
    )
    t0 = time.perf_counter()
    model.save_pretrained(ckpt)
    print(f"saved checkpoint in {time.perf_counter() - t0:.1f}s", flush=True)
    del model
    free_cuda()

    # 2. TensorStream at the budget: raw and table-coded stores, with the host tier and
    # without it (disk-bound, O_DIRECT reads each token). Each store is written once and
    # reused by its disk-bound run.
    runs = {}
    plan = [("raw", {}), ("raw, disk-bound", {"host_cache_gb": 0})]
    if not args.skip_compressed:
        coded = {"backend": "cuda", "compression_enabled": True}
        plan += [("compressed", coded), ("compressed, disk-bound", {**coded, "host_cache_gb": 0})]
    for label, extra in plan:
        disk = "host_cache_gb" in extra
        if disk and args.skip_disk:
            continue
        new1, new16 = (args.disk_tokens, args.disk_tokens) if disk else (args.new_tokens, args.batch16_tokens)
        where = store_dir + ("-coded" if extra.get("compression_enabled") else "")
        runs[label] = run_tensorstream(
            label, ckpt, where, args, extra, prompt1, prompt16, ref1, ref16, new1, new16
        )
        if disk:
            shutil.rmtree(where, ignore_errors=True)
    results["ts_b1"], results["ts_b16"] = runs["raw"]["b1"], runs["raw"]["b16"]
    same1, same16 = runs["raw"]["same1"], runs["raw"]["same16"]
    streamed_per_pass, stats = runs["raw"]["pcie_per_pass"], runs["raw"]["stats"]

    # 3. Accelerate at the same budget.
    if not args.skip_accelerate:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            ckpt,
            dtype=torch.bfloat16,
            device_map="auto",
            max_memory={0: f"{args.budget_gb:g}GiB", "cpu": "100GiB"},
        ).eval()
        print(f"Accelerate load in {time.perf_counter() - t0:.1f}s", flush=True)
        time_generate(model, prompt1.cuda(), 2)
        results["acc_b1"], acc1 = time_generate(model, prompt1.cuda(), args.new_tokens)
        results["acc_b16"], acc16 = time_generate(model, prompt16.cuda(), args.batch16_tokens)
        print(
            f"Accelerate: {results['acc_b1']:.2f} tok/s batch 1, {results['acc_b16']:.1f} batch 16",
            flush=True,
        )
        del model
        free_cuda()
    shutil.rmtree(work, ignore_errors=True)

    limit_s = streamed_per_pass / bw
    limit_tps = 1 / limit_s if limit_s > 0 else float("inf")
    raw_disk = runs.get("raw, disk-bound")
    acc1 = results.get("acc_b1")
    acc16 = results.get("acc_b16")
    rows = [
        ["pinned host-to-device bandwidth (measured)", f"{bw / 1e9:.1f} GB/s", ""],
        ["model (bf16, all layers)", f"{model_bytes / 1e9:.2f} GB", f"{args.layers} layers"],
        ["batch 1, fully on the GPU", f"{results['gpu_b1']:.2f} tok/s", "reference"],
        [
            "batch 1, TensorStream, vram_budget_gb=3",
            f"{results['ts_b1']:.2f} tok/s",
            f"tokens identical: {same1}",
        ],
        ["batch 1, Accelerate, max_memory 3GiB", f"{acc1:.2f} tok/s" if acc1 else "skipped", ""],
        ["TensorStream / Accelerate, batch 1", f"{results['ts_b1'] / acc1:.1f}x" if acc1 else "", ""],
        [
            "bytes streamed per token (TensorStream)",
            f"{streamed_per_pass / 1e9:.2f} GB",
            f"{stats['kept_layers']} of {stats['units']} layers kept on GPU",
        ],
        [
            "link limit = streamed bytes / bandwidth",
            f"{limit_tps:.2f} tok/s",
            f"{limit_s * 1e3:.1f} ms per token",
        ],
        ["TensorStream share of the link limit", f"{100 * results['ts_b1'] / limit_tps:.0f}%", ""],
        ["batch 16, fully on the GPU", f"{results['gpu_b16']:.1f} tok/s", ""],
        ["batch 16, TensorStream", f"{results['ts_b16']:.1f} tok/s", f"tokens identical: {same16}"],
        ["batch 16, Accelerate", f"{acc16:.1f} tok/s" if acc16 else "skipped", ""],
    ]
    if raw_disk:
        rows += [
            [
                f"batch {b}, TensorStream, host tier disabled (disk-bound)",
                f"{raw_disk[f'b{b}']:.2f} tok/s",
                f"{raw_disk['read_per_pass'] / 1e9:.2f} GB read per token; tokens identical: {raw_disk[f'same{b}']}",
            ]
            for b in (1, 16)
        ]
    for label in ("compressed", "compressed, disk-bound"):
        r = runs.get(label)
        if r is None:
            continue
        st = r["stats"]
        base = raw_disk if "disk" in label else None
        for b in (1, 16):
            versus = (
                f"{r[f'b{b}'] / base[f'b{b}']:.2f}x the uncompressed disk-bound run"
                if base
                else f"{r[f'b{b}'] / limit_tps:.2f}x the raw link limit"
                if b == 1
                else ""
            )
            rows.append(
                [
                    f"batch {b}, TensorStream {label} (table code)",
                    f"{r[f'b{b}']:.2f} tok/s",
                    f"{versus}; tokens identical: {r[f'same{b}']}",
                ]
            )
        rows += [
            [
                f"{label}: bytes over PCIe per token",
                f"{r['pcie_per_pass'] / 1e9:.2f} GB",
                f"raw {r['raw_per_pass'] / 1e9:.2f} GB ({r['raw_per_pass'] / max(r['pcie_per_pass'], 1):.2f}x); "
                f"{st['gpu_coded_units']} of {st['units']} units coded; read from disk {r['read_per_pass'] / 1e9:.2f} GB",
            ],
            [
                f"{label}: GPU decode",
                f"{st['gpu_decode_gbps']:.0f} GB/s",
                f"{st['gpu_decode_seconds']:.2f} s decoding in the run; store ratio {st['compression_ratio']:.3f}",
            ],
        ]
    print()
    print_table(f"GPU streaming, {machine()}", ["what", "figure", "note"], rows)
    return 0 if (same1 and same16) else 1


if __name__ == "__main__":
    sys.exit(main())
