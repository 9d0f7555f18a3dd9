"""Sparse streaming of a mixture of experts (issue 16): read only the experts the router picks.

A Qwen3-MoE-architecture model built here with seeded random weights (no download): 8
layers, 16 experts a layer, top-2 routing, hidden 2048, moe_intermediate 624, 16 heads (4 KV
heads), vocab 6144; 287 MB a layer (245 MB of experts, 15 MB an expert), 2.40 GB in all in
fp32 on CPU (bf16 with --gpu). --quick: 4 layers, hidden 512, moe_intermediate 192, vocab
4096, 105 MB, at a 50% budget (30% of it cannot hold a layer's experts and the prefetch
window at once). The checkpoint is written once with save_pretrained under --workdir (one
directory per shape and dtype) and reused, as are the TensorStream stores.

Each row runs in a process of its own (peak RSS, VmHWM, is its own, reset once the model is
set up), loads the checkpoint with from_pretrained, and decodes greedily --tokens new tokens
after an 8-token prompt:

- in memory (the reference tokens);
- TensorStream at --share (30%) of the model's bytes (Config(vram_budget_gb=...)), backend="pread"
  (O_DIRECT: every token reads from disk), default units (expert-granular: each MoE experts
  module is a unit of its own), then units=["Qwen3MoeDecoderLayer"] (blocks streamed whole);
- the same two with backend="mmap" (the CPU default here), page cache warm;
- Accelerate disk offload at the same budget (device_map="auto", max_memory={"cpu": budget},
  offload_folder=...), as bench/cpu_offload.py does.

Warm-up before the timed generate: 2 new tokens (learns the access order), or the full
--tokens for the mmap rows (the page cache then holds what the timed run touches).

Decode tok/s: --reps timed generate(max_new_tokens=N, min_new_tokens=N), the one of median
decode time shown; in each, a logits processor marks the
time and the statistics' bytes_read each time logits come out. The first mark follows the
prefill pass, the last one the last forward: decode tok/s = (N - 1) / (last mark - first
mark), bytes per decoded token = bytes_read between the marks / (N - 1). Prefetch across pass
boundaries shifts a few reads from one pass to the next, so that figure is within about one
unit's bytes / (N - 1) of the true one.

Physical limit: the disk's O_DIRECT read bandwidth is measured in this run (4 threads of 8
MiB preads into page-aligned buffers over the checkpoint's files, up to 1 GiB) right before
each pread row; the bound of a pread row is that bandwidth / its bytes per decoded token.

Usage: python bench/moe_stream.py [--quick] [--tokens 16] [--share 0.3] [--reps 3]
[--workdir bench/out/moe_stream] [--gpu] [--skip-accelerate]

--gpu (untested here: this machine has no GPU): bf16 on cuda, vram_budget_gb at --share of
the model, host_cache_gb=0 for the TensorStream rows (no pinned host tier: pread rows read
the disk every token, mmap rows the page cache), Accelerate with max_memory={0: budget,
"cpu": 0} and the rest on disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

GiB = 1 << 30
PROMPT_TOKENS = 8

# (hidden, moe_intermediate, layers, heads, kv_heads, vocab); head_dim = hidden / heads = 128.
SHAPES = {
    "default": (2048, 624, 8, 16, 4, 6144),
    "quick": (512, 192, 4, 4, 2, 4096),
}
EXPERTS, TOP_K = 16, 2

# Rows: (name, role, backend, units). "units" is "experts" (default analysis) or "blocks".
ROWS = [
    ("in memory", "memory", None, None),
    ("TensorStream, expert-granular, pread (disk-bound)", "tensorstream", "pread", "experts"),
    ("TensorStream, whole MoE blocks, pread (disk-bound)", "tensorstream", "pread", "blocks"),
    ("TensorStream, expert-granular, mmap (page cache warm)", "tensorstream", "mmap", "experts"),
    ("TensorStream, whole MoE blocks, mmap (page cache warm)", "tensorstream", "mmap", "blocks"),
    ("Accelerate disk offload", "accelerate", None, None),
]


def moe_config(shape: str):
    from transformers import Qwen3MoeConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    return Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,  # dense MLPs only (mlp_only_layers): none here
        moe_intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def write_checkpoint(path: str, shape: str, dtype) -> None:
    """Build the model with seeded random weights and save it, unless already there."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    if os.path.exists(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") for f in os.listdir(path)
    ):
        return
    t0 = time.perf_counter()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen3MoeForCausalLM(moe_config(shape)).eval()
    finally:
        torch.set_default_dtype(old)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    del model
    gc.collect()
    os.replace(tmp, path)
    print(f"wrote checkpoint {path} in {time.perf_counter() - t0:.0f}s", flush=True)


def layer_sizes(shape: str, dtype) -> tuple:
    """(bytes of a decoder layer, bytes of one expert), from a skeleton on the meta device."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        layer = Qwen3MoeForCausalLM(moe_config(shape)).model.layers[0]
    elt = torch.empty((), dtype=dtype).element_size()
    total = sum(p.numel() for p in layer.parameters()) * elt
    return total, sum(p.numel() for p in layer.mlp.experts.parameters()) * elt // EXPERTS


def checkpoint_files(path: str) -> list:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def direct_read_bandwidth(files, limit: int = GiB, chunk: int = 8 << 20, threads: int = 4):
    """Bytes/s of O_DIRECT preads of `chunk` bytes, `threads` at a time, over `files` in order
    (up to `limit` bytes), into page-aligned buffers. None where O_DIRECT is refused."""
    jobs = []
    for f in files:
        size = os.path.getsize(f) // chunk * chunk
        jobs += [(f, off) for off in range(0, size, chunk)]
    jobs = jobs[: max(1, limit // chunk)]
    if not jobs:
        return None
    fds = {}
    try:
        for f in {f for f, _ in jobs}:
            fds[f] = os.open(f, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        for fd in fds.values():
            os.close(fd)
        return None
    lock = threading.Lock()
    nxt = [0]
    done = [0]
    failed = []

    def work():
        buf = mmap.mmap(-1, chunk)  # anonymous mappings are page-aligned
        try:
            while True:
                with lock:
                    if nxt[0] >= len(jobs) or failed:
                        return
                    f, off = jobs[nxt[0]]
                    nxt[0] += 1
                n = os.preadv(fds[f], [buf], off)
                with lock:
                    done[0] += n
        except OSError as e:
            failed.append(e)
        finally:
            buf.close()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    dt = time.perf_counter() - t0
    for fd in fds.values():
        os.close(fd)
    if failed or not done[0]:
        return None
    return done[0] / dt


# ------------------------------------------------------------------------------ one row


def child(args) -> None:
    import torch
    from _common import page_cache_share, report_result
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    from tensorstream.memory import peak_rss, reset_peak_rss

    dtype = torch.bfloat16 if args.gpu else torch.float32
    device = "cuda" if args.gpu else "cpu"
    vocab = SHAPES[args.shape][5]
    ids = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)
    res = {}
    ts = None
    budget_bytes = int(args.budget_gb * GiB)
    if args.role == "accelerate":
        max_memory = {0: budget_bytes, "cpu": 0} if args.gpu else {"cpu": budget_bytes}
        model = AutoModelForCausalLM.from_pretrained(
            args.ckpt,
            dtype=dtype,
            device_map="auto",
            max_memory=max_memory,
            offload_folder=args.offload_folder,
        ).eval()
        placed = list(getattr(model, "hf_device_map", {}).values())
        res["device_map"] = {str(d): placed.count(d) for d in dict.fromkeys(placed)}
    else:
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype).eval()
        if args.role == "tensorstream":
            import tensorstream as ts

            extra = {"host_cache_gb": 0} if args.gpu else {}
            if args.units == "blocks":
                extra["units"] = ["Qwen3MoeDecoderLayer"]
            cfg = ts.Config(
                args.store,
                vram_budget_gb=args.budget_gb,
                backend=args.backend,
                overwrite_store=True,  # a store written with the other unit analysis is replaced
                **extra,
            )
            t0 = time.perf_counter()
            model = ts.offload(model, cfg)
            res["offload_s"] = time.perf_counter() - t0
        model.to(device)

    gc.collect()
    reset_peak_rss()
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()

    def bytes_read() -> int:
        return ts.get_model_statistics(model)["bytes_read"] if ts else 0

    class Marks(LogitsProcessor):
        """(seconds, bytes read) each time logits come out: after the prefill, then after
        each decode forward."""

        def __init__(self):
            self.at = []

        def __call__(self, input_ids, scores):
            if args.gpu:
                torch.cuda.synchronize()
            self.at.append((time.perf_counter(), bytes_read()))
            return scores

    def generate(n: int, marks=None):
        with torch.no_grad():
            return model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([marks]) if marks else None,
            )

    generate(args.tokens if args.backend == "mmap" else 2)  # warm-up
    store = ts.get_model_statistics(model)["store_path"] if ts else None
    if args.backend == "mmap":
        res["page_cache"] = page_cache_share([store])
    runs = []
    for _ in range(args.reps):
        marks = Marks()
        b0 = bytes_read()
        t0 = time.perf_counter()
        out = generate(args.tokens, marks)
        total = time.perf_counter() - t0
        (t_first, b_first), (t_last, b_last) = marks.at[0], marks.at[-1]
        n = len(marks.at) - 1
        runs.append(
            {
                "decode_s": t_last - t_first,
                "decode_tokens": n,
                "prefill_s": t_first - t0,
                "total_s": total,
                "decode_bytes": b_last - b_first,
                "prefill_bytes": b_first - b0,
                "tokens": out[0].tolist(),
            }
        )
    med = sorted(runs, key=lambda r: r["decode_s"])[len(runs) // 2]
    res.update(med)
    res["reps_agree"] = all(r["tokens"] == med["tokens"] for r in runs)
    res["peak_rss"] = peak_rss()
    if args.gpu:
        res["peak_gpu"] = torch.cuda.max_memory_allocated()
    if ts:
        s = ts.get_model_statistics(model)
        res["stats"] = {
            k: s.get(k)
            for k in (
                "backend",
                "budget_bytes",
                "peak_usage_bytes",
                "resident_module_bytes",
                "units",
                "kept_layers",
                "cache_hit_rate",
                "prefetch_hit_rate",
                "stall_seconds",
                "fallbacks",
            )
        }
        res["unit_bytes"] = s.get("unit_bytes")
        res["experts"] = s.get("experts")
        res["embedding"] = s.get("embedding")
    report_result(res)


# ------------------------------------------------------------------------------ parent


def run_row(name, role, backend, units, args) -> dict:
    from _common import run_child

    cmd = [sys.executable, os.path.abspath(__file__), "--child", role, "--ckpt", args.ckpt]
    cmd += ["--shape", args.shape, "--budget-gb", repr(args.budget_gb), "--tokens", str(args.tokens)]
    cmd += ["--reps", str(args.reps)]
    if args.gpu:
        cmd.append("--gpu")
    if role == "tensorstream":
        cmd += [
            "--backend",
            backend,
            "--units",
            units,
            "--store",
            os.path.join(args.workdir, f"store-{units}"),
        ]
    if role == "accelerate":
        cmd += ["--offload-folder", args.offload_folder]
    t0 = time.perf_counter()
    res = run_child(cmd, name)
    print(
        f"{name}: {res['decode_tokens'] / res['decode_s']:.2f} decode tok/s, prefill {res['prefill_s']:.2f}s, "
        f"{res['decode_bytes'] / max(res['decode_tokens'], 1) / 1e6:.1f} MB read/token, "
        f"peak RSS {res['peak_rss'] / 1e9:.2f} GB ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return res


def compact(d) -> str:
    def r(v):
        if isinstance(v, float):
            return round(v, 3)
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [r(x) for x in v]
        return v

    return json.dumps(r(d), separators=(", ", ": "))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 105 MB model of 4 layers (smoke test)")
    ap.add_argument("--tokens", type=int, default=16, help="new greedy tokens after the prompt")
    ap.add_argument(
        "--share",
        type=float,
        default=None,
        help="the budget, as a share of the model's bytes (0.3; 0.5 with --quick, whose layers are a larger "
        "share of a smaller model)",
    )
    ap.add_argument("--reps", type=int, default=3, help="timed generates a row (the median one is shown)")
    ap.add_argument("--workdir", default=os.path.join(HERE, "out", "moe_stream"))
    ap.add_argument("--gpu", action="store_true", help="bf16 on cuda (vram_budget_gb at --share)")
    ap.add_argument("--skip-accelerate", action="store_true")
    # child-only arguments
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--offload-folder", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--units", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget-gb", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokens < 2:
        ap.error("--tokens must be at least 2 (one prefill token, then decode tokens)")
    if args.child:
        args.role = args.child
        child(args)
        return 0

    import shutil

    import torch
    from _common import machine, print_table

    if args.gpu and not torch.cuda.is_available():
        print("bench/moe_stream.py --gpu needs a CUDA device", file=sys.stderr)
        return 2
    args.shape = "quick" if args.quick else "default"
    if args.share is None:
        args.share = 0.5 if args.quick else 0.3
    dtype = torch.bfloat16 if args.gpu else torch.float32
    hidden, inter, layers, heads, kv, vocab = SHAPES[args.shape]
    tag = f"qwen3moe-L{layers}-H{hidden}-I{inter}-E{EXPERTS}-V{vocab}-{str(dtype).split('.')[-1]}"
    args.workdir = os.path.join(args.workdir, tag)
    os.makedirs(args.workdir, exist_ok=True)
    args.ckpt = os.path.join(args.workdir, "ckpt")
    args.offload_folder = os.path.join(args.workdir, "accelerate-offload")
    load0 = os.getloadavg()[0]
    print(f"machine: {machine()}; load average {load0:.2f}", flush=True)
    write_checkpoint(args.ckpt, args.shape, dtype)
    files = checkpoint_files(args.ckpt)
    model_bytes = sum(os.path.getsize(f) for f in files)  # safetensors headers: a few KB
    args.budget_gb = args.share * model_bytes / GiB
    layer_bytes, expert_bytes = layer_sizes(args.shape, dtype)
    print(
        f"model: {model_bytes / 1e9:.2f} GB, {layers} layers of {layer_bytes / 1e6:.0f} MB "
        f"({EXPERTS} experts of {expert_bytes / 1e6:.1f} MB, top-{TOP_K}); budget {args.budget_gb:.3f} GiB "
        f"({args.share:.0%})",
        flush=True,
    )

    results = {}
    bandwidth = {}
    for name, role, backend, units in ROWS:
        if role == "accelerate" and args.skip_accelerate:
            continue
        if backend == "pread":
            bw = direct_read_bandwidth(files)
            bandwidth[name] = bw
            print(
                f"O_DIRECT read bandwidth before this row: {bw / 1e9:.2f} GB/s" if bw else "O_DIRECT refused",
                flush=True,
            )
        if role == "accelerate":
            shutil.rmtree(args.offload_folder, ignore_errors=True)
        results[name] = run_row(name, role, backend, units, args)
        if role == "accelerate":
            shutil.rmtree(args.offload_folder, ignore_errors=True)

    ref = results["in memory"]["tokens"]
    budget = int(args.budget_gb * GiB)
    header = [
        "run",
        "decode tok/s",
        "prefill s",
        "MB read / decoded token",
        "disk bound tok/s (share reached)",
        "peak RSS",
        "held peak / budget",
        "units (kept)",
        "tokens",
    ]
    if args.gpu:
        header.insert(6, "peak GPU alloc")
    rows = []
    ts_same = True
    for name, res in results.items():
        tps = res["decode_tokens"] / res["decode_s"]
        per_tok = res["decode_bytes"] / max(res["decode_tokens"], 1)
        st = res.get("stats")
        bound = ""
        bw = bandwidth.get(name)
        if bw and per_tok > 0:
            lim = bw / per_tok
            bound = f"{lim:.2f} ({tps / lim:.0%}) at {bw / 1e9:.2f} GB/s"
        same = res["tokens"] == ref and res["reps_agree"]
        if st:
            ts_same &= same
        note = st["backend"] if st else ""
        if res.get("device_map"):
            note = "device map: " + ", ".join(f"{n} on {d}" for d, n in res["device_map"].items())
        if res.get("page_cache") is not None:
            note += f", page cache held {res['page_cache']:.0%} of the store"
        row = [
            name,
            f"{tps:.2f}",
            f"{res['prefill_s']:.2f}",
            f"{per_tok / 1e6:.1f}" if st else "",
            bound,
            f"{res['peak_rss'] / 1e9:.2f} GB",
            f"{st['peak_usage_bytes'] / 1e9:.3f} / {st['budget_bytes'] / 1e9:.3f} GB"
            + ("" if st["peak_usage_bytes"] <= st["budget_bytes"] else " OVER")
            if st
            else "",
            f"{st['units']} ({st['kept_layers']}); {note}" if st else note,
            "reference" if name == "in memory" else ("identical" if same else "DIFFER"),
        ]
        if args.gpu:
            row.insert(6, f"{res['peak_gpu'] / 1e9:.2f} GB")
        rows.append(row)
    print()
    print_table(
        f"MoE sparse streaming, Qwen3-MoE {str(dtype).split('.')[-1]} {model_bytes / 1e9:.2f} GB ({layers} layers, "
        f"{EXPERTS} experts, top-{TOP_K}), {'cuda' if args.gpu else 'cpu'}, budget {args.share:.0%} "
        f"({budget / 1e9:.2f} GB), {PROMPT_TOKENS}-token prompt, {args.tokens} new greedy tokens "
        f"(decode = the {args.tokens - 1} after the prefill's), median of {args.reps}, {machine()}",
        header,
        rows,
    )
    print()
    for name, res in results.items():
        if res.get("experts") is not None:
            print(f"experts statistics, {name} (cumulative, warm-up included): {compact(res['experts'])}")
        elif res.get("stats") and "expert-granular" in name:
            print(f"experts statistics, {name}: none (get_model_statistics has no 'experts' entry)")
        if res.get("embedding") is not None:
            print(f"embedding rows statistics, {name} (cumulative): {compact(res['embedding'])}")
    for name, res in results.items():
        if res.get("stats"):
            print(f"stats, {name}: {compact(res['stats'])}")

    e = results.get("TensorStream, expert-granular, pread (disk-bound)")
    b = results.get("TensorStream, whole MoE blocks, pread (disk-bound)")
    ok = ts_same
    if e and b:
        e_bytes = e["decode_bytes"] / e["decode_tokens"]
        b_bytes = b["decode_bytes"] / b["decode_tokens"]
        bytes_ratio = b_bytes / e_bytes if e_bytes else float("inf")
        tps_ratio = (e["decode_tokens"] / e["decode_s"]) / (b["decode_tokens"] / b["decode_s"])
        holds = bytes_ratio >= 3 and tps_ratio >= 2
        print(
            f"\nexpert-granular vs whole blocks (pread): {bytes_ratio:.2f}x fewer bytes per decoded token, "
            f"{tps_ratio:.2f}x decode tok/s; done-when (>= 3x fewer bytes, >= 2x tok/s): "
            f"{'holds' if holds else 'does not hold'}"
        )
    load1 = os.getloadavg()[0]
    if max(load0, load1) > 0.5 * (os.cpu_count() or 1):
        print(
            f"note: load average {load0:.2f} at the start, {load1:.2f} at the end: the machine was not idle"
        )
    if not ts_same:
        print("TensorStream tokens DIFFER from the in-memory run's", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
