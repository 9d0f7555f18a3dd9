"""Speculative decoding of a streamed model, on this machine or on a GPU.

On the CPU (the default): a Llama-architecture fp32 target (hidden 1024, 16 layers, about
1 GB) streamed with `backend="pread"` (O_DIRECT: every pass reads from disk) at a budget of
30% of the target plus the draft (`offload(..., draft=)` counts the draft in the budget).
With `--device cuda`: the 7 GB bf16 target of ``bench/gpu_stream.py`` (hidden 4096, 16
layers) at a budget of 3 GiB plus the draft, streamed over PCIe from the host tier (the
default backend). Greedy tokens after an 8-token prompt, all in one run:

- the target in memory, and offloaded with plain greedy decoding (the anchor);
- the perfect draft (the target's in-memory copy: every drafted token is accepted) at
  k = 2, 4, 8, 16 drafted tokens a pass (`--ks`; 8 alone on a GPU), at the k TensorStream
  chooses, and at k = 8 drafted in turn instead of ahead;
- a small separate draft (2 layers of the same shape, other random weights) at the k
  TensorStream chooses;
- the draft built from the target itself (``draft="int8"``: its linear layers in int8,
  weight-only) at the k TensorStream chooses (and at `--int8-ks`).

Greedy calls draft the next pass while the target verifies this one (``Lookahead``).

For each: tok/s (median of --reps), tokens per verification pass, acceptance, the passes
whose tokens were drafted ahead, time per pass, draft time per token, the time per pass the
engine read nothing from disk (disk idle: the engine's own wall-clock activity counter), the
bytes streamed per pass (read from disk on the CPU, copied over PCIe on a GPU), and two
limits: stream-bound, the tokens a pass yields over the time the link needs for its bytes at
the bandwidth measured in the run (O_DIRECT reads on the CPU, pinned host-to-device copies on
a GPU); compute-bound, the tokens a pass yields over the time the device needs for its
forwards, each timed alone in memory in the run (the target's forward of the tokens it
verifies, plus the draft's forwards: those it drafted and those drafted ahead and not used).
Tokens are checked against the model in memory.

Usage: python bench/speculative.py [--device cpu|cuda] [--workdir DIR] [--reps 3]
[--tokens 24] [--ks 2,4,8,16] [--int8-ks 4,8,16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import (  # noqa: E402
    build_llama,
    llama_config,
    machine,
    pinned_bandwidth,
    print_table,
    sync,
    time_generate,
)

import tensorstream as ts  # noqa: E402
from tensorstream.speculative import lookahead  # noqa: E402
from tensorstream.speculative.selfdraft import build_int8_draft  # noqa: E402

GiB = 1 << 30


def read_bandwidth(model) -> float:
    """Bytes/s of the model's own engine reading all its units once with O_DIRECT, all
    submitted at once (as many reads in flight as its workers take)."""
    from tensorstream.memory import aligned_empty

    rt = model._tensorstream
    bufs = [aligned_empty(lay.buffer_len) for lay in rt.layouts]
    t0 = time.perf_counter()
    tickets = [
        rt.engine.submit(lay, b.data_ptr(), lay.buffer_len, True, b) for lay, b in zip(rt.layouts, bufs)
    ]
    for t in tickets:
        rt.engine.wait(t)
    return sum(lay.bytes_to_read for lay in rt.layouts) / (time.perf_counter() - t0)


def forward_seconds(model, ids, n: int, reps: int = 5) -> float:
    """Median seconds of one forward of `n` new tokens after `ids` (held in the KV cache), of
    a model in memory, alone on the machine."""
    new = torch.full((1, n), 5, device=ids.device)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        times = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            model(new, cache=cache, use_cache=True)
            sync()
            times.append(time.perf_counter() - t0)
            cache.crop(-n)
    return statistics.median(times)


def measure(model, ids, tokens: int, reps: int, **kw):
    """The median of `reps` greedy generate() calls: (seconds, output, stats before, after)."""
    stats = ts.get_model_statistics if hasattr(model, "_tensorstream") else lambda _: None
    runs = []
    for _ in range(reps):
        s0 = stats(model)
        tps, out = time_generate(model, ids, tokens, pad_token_id=0, **kw)
        runs.append((tokens / tps, out, s0, stats(model)))
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument(
        "--ks", default=None, help="the perfect draft's k, comma-separated (2,4,8,16; 8 on a GPU)"
    )
    ap.add_argument(
        "--int8-ks", default="", help="the self-built draft's k besides the chosen one, comma-separated"
    )
    ap.add_argument(
        "--share", type=float, default=0.3, help="CPU: the target's budget, as a share of its size"
    )
    ap.add_argument("--budget-gb", type=float, default=3.0, help="GPU: the target's budget in GiB")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA device")
    workdir = args.workdir or tempfile.mkdtemp(prefix="ts-spec-")
    if gpu:
        dtype, shape, heads = torch.bfloat16, (4096, 11008), 32
    else:
        dtype, shape, heads = torch.float32, (1024, 2816), 16
    cfg = llama_config(*shape, layers=16, heads=heads)
    small_cfg = llama_config(*shape, layers=2, heads=heads)
    ks = [int(k) for k in (args.ks or ("8" if gpu else "2,4,8,16")).split(",")]
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(1)).to(args.device)
    print(f"machine: {machine()}", flush=True)

    # The target in memory: the reference tokens, and the perfect draft.
    ref = build_llama(cfg, dtype, device=args.device)
    size = ts.estimate_model_memory(ref)
    mem_s, want, _, _ = measure(ref, ids, args.tokens, args.reps)
    rows = [["in memory", f"{args.tokens / mem_s:.2f}"] + [""] * 10 + ["yes"]]
    target_budget = args.budget_gb * GiB if gpu else args.share * size
    backend = {} if gpu else {"backend": "pread"}  # a GPU streams from the host tier

    def offloaded(draft, draft_bytes):
        # Built where building is fast, then offloaded from the CPU and moved, as a user would.
        model = build_llama(cfg, dtype, device=args.device).cpu()
        c = ts.Config(
            os.path.join(workdir, "store"), vram_budget_gb=(target_budget + draft_bytes) / GiB, **backend
        )
        model = ts.offload(model, c, draft=draft)
        return model.to(args.device) if gpu else model

    plain_tps = bandwidth = None
    small = build_llama(small_cfg, dtype, device=args.device, seed=7)
    cases = [("offloaded, plain greedy (anchor)", None, 0, None)]
    cases += [("perfect draft", ref, size, k) for k in ks + [None]]
    cases.append(("perfect draft, drafted in turn (not ahead)", ref, size, 8))
    cases.append(("small draft (2 layers)", small, ts.estimate_model_memory(small), None))
    # The budget gives the int8 draft room as if it shared nothing with the target, as for the
    # other drafts (sharing what the target keeps resident, it takes less).
    int8_bytes = ts.estimate_model_memory(build_int8_draft(ref))
    int8_ks = [int(k) for k in args.int8_ks.split(",") if k]
    cases += [('self-built draft (draft="int8")', "int8", int8_bytes, k) for k in int8_ks + [None]]
    streamed = "bytes_h2d" if gpu else "bytes_read"
    alone = {}  # (model, tokens) -> seconds of that forward in memory, measured once

    def alone_s(model, n: int) -> float:
        if (model, n) not in alone:
            alone[model, n] = forward_seconds(model, ids, n)
        return alone[model, n]

    def compute_limit(tokens_per_pass: float, verified: int, draft_forwards: float, draft_model) -> float:
        draft_s = draft_forwards * alone_s(draft_model, 1) if draft_forwards else 0.0
        return tokens_per_pass / (alone_s(ref, verified) + draft_s)

    for name, draft, draft_bytes, k in cases:
        model = offloaded(draft, draft_bytes)
        kw = {"num_assistant_tokens": k} if k else {}
        lookahead.DRAFT_AHEAD = "in turn" not in name
        time_generate(model, ids, 2, pad_token_id=0, **kw)  # warm: learns the order and measures a pass
        dt, out, s0, s1 = measure(model, ids, args.tokens, args.reps, **kw)
        if bandwidth is None:
            bandwidth = (
                pinned_bandwidth() if gpu else statistics.median(read_bandwidth(model) for _ in range(3))
            )
        passes = s1["forward_passes"] - s0["forward_passes"]
        nbytes = s1[streamed] - s0[streamed]
        idle = dt - (s1["engine"]["active_seconds"] - s0["engine"]["active_seconds"])
        tps = args.tokens / dt
        plain_tps = plain_tps or tps
        row = [
            name
            if draft is None
            else f"{name}, k={k or 'chosen: ' + str(s1['speculative']['drafted_per_pass'])}",
            f"{tps:.2f}",
            f"{tps / plain_tps:.2f}x",
            f"{args.tokens / passes:.1f}",
        ]
        if draft is None:
            row += ["", "", f"{dt / passes:.3f}", ""]
            cpu_limit = compute_limit(1, 1, 0, None)
        else:
            a, b = s0["speculative"], s1["speculative"]
            drafted = b["drafted"] - a["drafted"]
            draft_s = b["draft_seconds_per_token"] or 0
            draft_forwards = (b["draft_tokens"] - a["draft_tokens"]) / passes
            cpu_limit = compute_limit(
                args.tokens / passes, round(drafted / passes) + 1, draft_forwards, model._tensorstream.draft
            )
            row += [
                f"{(b['accepted'] - a['accepted']) / drafted:.0%}" if drafted else "",
                f"{b['drafted_ahead_passes'] - a['drafted_ahead_passes']}/{passes}",
                f"{dt / passes:.3f}",
                f"{draft_s * 1e3:.1f} ms",
            ]
        row += [
            f"{idle / passes:.3f}",
            f"{nbytes / passes / 1e6:.0f}",
            f"{args.tokens / passes / (nbytes / passes / bandwidth):.2f}" if nbytes else "",
            f"{cpu_limit:.2f}",
            "yes" if torch.equal(out.cpu(), want.cpu()) else "NO",
        ]
        rows.append(row)
        del model
    if gpu:
        where = (
            f"{args.budget_gb:g} GiB of {torch.cuda.get_device_name(0)} plus the draft, host tier over PCIe"
        )
        link = f"pinned host-to-device bandwidth in the run {bandwidth / 1e9:.1f} GB/s"
    else:
        where = f"{args.share:.0%} of it plus the draft, pread (O_DIRECT)"
        link = f"disk bandwidth in the run {bandwidth / 1e9:.2f} GB/s"
    print_table(
        f"Speculative decoding of a streamed {str(dtype).removeprefix('torch.')} Llama of {size / 1e9:.2f} GB, "
        f"budget {where}, {args.tokens} new tokens, median of {args.reps}; {link}",
        [
            "",
            "tok/s",
            "vs plain",
            "tokens/pass",
            "accepted",
            "drafted ahead",
            "s/pass",
            "draft/token",
            "disk idle/pass (s)",
            "MB streamed/pass",
            "stream-bound limit tok/s",
            "compute-bound limit tok/s",
            "tokens identical",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
