"""Speculative decoding of a disk-bound streamed model, on this machine.

A Llama-architecture fp32 target (hidden 1024, 16 layers, about 1 GB) streamed with
`backend="pread"` (O_DIRECT: every pass reads from disk) at a budget of 30% of the target
plus the draft (`offload(..., draft=)` counts the draft in the budget), 24 new greedy
tokens after an 8-token prompt, all in one run:

- the target in memory, and offloaded with plain greedy decoding (the anchor);
- the perfect draft (an in-memory copy of the target: every drafted token is accepted) at
  k = 2, 4, 8, 16 drafted tokens a pass, and at the k TensorStream chooses;
- a small separate draft (2 layers of the same shape, other random weights) at the k
  TensorStream chooses;
- the draft built from the target itself (``draft="int8"``: its linear layers in int8,
  weight-only) at the k TensorStream chooses.

Greedy calls draft the next pass while the target verifies this one (``Lookahead``).

For each: tok/s (median of --reps), tokens per verification pass, acceptance, the passes
whose tokens were drafted ahead, time per pass, draft time per token, bytes read per pass,
the time per pass the engine read nothing (disk idle: the engine's own wall-clock activity
counter), and two limits: disk-bound, the tokens a pass yields over the time the disk needs
for its bytes at the O_DIRECT bandwidth measured in the run; compute-bound, the tokens a pass
yields over the time the machine needs for its forwards, each timed alone in memory in the
run (the target's forward of the tokens it verifies, plus the draft's forwards: those it
drafted and those drafted ahead and not used). Tokens are checked against the model in
memory.

Usage: python bench/speculative.py [--workdir DIR] [--reps 3] [--tokens 24]
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
from _common import build_llama, llama_config, machine, print_table, time_generate  # noqa: E402

import tensorstream as ts  # noqa: E402
from tensorstream import speculative  # noqa: E402
from tensorstream.selfdraft import build_int8_draft  # noqa: E402

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
    new = torch.full((1, n), 5)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(new, cache=cache, use_cache=True)
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
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--share", type=float, default=0.3, help="the target's budget, as a share of its size")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ts-spec-")
    cfg = llama_config(hidden=1024, intermediate=2816, layers=16, heads=16)
    small_cfg = llama_config(hidden=1024, intermediate=2816, layers=2, heads=16)
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(1))
    print(f"machine: {machine()}", flush=True)

    ref = build_llama(cfg, torch.float32)
    size = ts.estimate_model_memory(ref)
    mem_s, want, _, _ = measure(ref, ids, args.tokens, args.reps)
    rows = [["in memory", f"{args.tokens / mem_s:.2f}"] + [""] * 10 + ["yes"]]

    def offloaded(draft, draft_bytes):
        model = build_llama(cfg, torch.float32)
        c = ts.Config(
            os.path.join(workdir, "store"),
            vram_budget_gb=(args.share * size + draft_bytes) / GiB,
            backend="pread",
        )
        return ts.offload(model, c, draft=draft)

    plain_tps = bandwidth = None
    perfect = build_llama(cfg, torch.float32)
    small = build_llama(small_cfg, torch.float32, seed=7)
    cases = [("offloaded, plain greedy (anchor)", None, 0, None)]
    cases += [("perfect draft", perfect, size, k) for k in (2, 4, 8, 16, None)]
    cases.append(("perfect draft, drafted in turn (not ahead)", perfect, size, 8))
    cases.append(("small draft (2 layers)", small, ts.estimate_model_memory(small), None))
    # The budget gives the int8 draft room as if it shared nothing with the target, as for the
    # other drafts (sharing what the target keeps resident, it takes less).
    int8_bytes = ts.estimate_model_memory(build_int8_draft(build_llama(cfg, torch.float32)))
    cases.append(('self-built draft (draft="int8")', "int8", int8_bytes, None))
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
        speculative.DRAFT_AHEAD = "in turn" not in name
        time_generate(model, ids, 2, pad_token_id=0, **kw)  # warm: learns the order and measures a pass
        dt, out, s0, s1 = measure(model, ids, args.tokens, args.reps, **kw)
        if bandwidth is None:
            bandwidth = statistics.median(read_bandwidth(model) for _ in range(3))
        passes = s1["forward_passes"] - s0["forward_passes"]
        nbytes = s1["bytes_read"] - s0["bytes_read"]
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
            f"{args.tokens / passes / (nbytes / passes / bandwidth):.2f}",
            f"{cpu_limit:.2f}",
            "yes" if torch.equal(out, want) else "NO",
        ]
        rows.append(row)
        del model
    print_table(
        f"Speculative decoding, disk-bound (pread, O_DIRECT) fp32 Llama of {size / 1e9:.2f} GB, budget "
        f"{args.share:.0%} of it plus the draft, {args.tokens} new tokens, median of {args.reps}; "
        f"disk bandwidth in the run {bandwidth / 1e9:.2f} GB/s",
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
            "MB read/pass",
            "disk-bound limit tok/s",
            "compute-bound limit tok/s",
            "tokens identical",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
