"""Speculative decoding of a disk-bound streamed model, on this machine.

A Llama-architecture fp32 target (hidden 1024, 16 layers, about 1 GB) streamed with
`backend="pread"` (O_DIRECT: every pass reads from disk) at a budget of 30% of the target
plus the draft (`offload(..., draft=)` counts the draft in the budget), 24 new greedy
tokens after an 8-token prompt, all in one run:

- the target in memory, and offloaded with plain greedy decoding (the anchor);
- the perfect draft (an in-memory copy of the target: every drafted token is accepted) at
  k = 2, 4, 8, 16 drafted tokens a pass, and at the k TensorStream chooses;
- a small separate draft (2 layers of the same shape, other random weights) at the k
  TensorStream chooses.

For each: tok/s (median of --reps), tokens per verification pass, acceptance, pass time,
draft time per token, bytes read per pass, and the disk's busy share of the pass (bytes
read / the O_DIRECT bandwidth measured in the run, over the pass time). Tokens are checked
against the model in memory.

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

GiB = 1 << 30


def read_bandwidth(model) -> float:
    """Bytes/s of the model's own engine reading each of its units once with O_DIRECT."""
    from tensorstream.memory import aligned_empty

    rt = model._tensorstream
    total, t0 = 0, time.perf_counter()
    for lay in rt.layouts:
        buf = aligned_empty(lay.buffer_len)
        rt.engine.wait(rt.engine.submit(lay, buf.data_ptr(), lay.buffer_len, True, buf))
        total += lay.bytes_to_read
    return total / (time.perf_counter() - t0)


def generate(model, ids, tokens: int, **kw):
    """(output ids, seconds) of one greedy generate()."""
    tps, out = time_generate(model, ids, tokens, pad_token_id=0, **kw)
    return out, tokens / tps


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
    want, _ = generate(ref, ids, args.tokens)
    mem = [args.tokens / generate(ref, ids, args.tokens)[1] for _ in range(args.reps)]
    small = build_llama(small_cfg, torch.float32, seed=7)

    def offloaded(draft):
        model = build_llama(cfg, torch.float32)
        extra = ts.estimate_model_memory(draft) if draft is not None else 0
        budget = (args.share * size + extra) / GiB
        c = ts.Config(os.path.join(workdir, "store"), vram_budget_gb=budget, backend="pread")
        return ts.offload(model, c, draft=draft)

    rows = [["in memory", "", f"{statistics.median(mem):.2f}", "", "", "", "", "", "", "yes"]]
    plain = offloaded(None)
    generate(plain, ids, 2)  # writes nothing more; learns the order
    runs = []
    for _ in range(args.reps):
        s0 = ts.get_model_statistics(plain)
        out, dt = generate(plain, ids, args.tokens)
        s1 = ts.get_model_statistics(plain)
        runs.append((dt, s1["bytes_read"] - s0["bytes_read"], s1["forward_passes"] - s0["forward_passes"]))
    dt, nbytes, passes = sorted(runs)[len(runs) // 2]
    plain_tps = args.tokens / dt
    bandwidth = statistics.median(read_bandwidth(plain) for _ in range(3))
    busy = nbytes / bandwidth / dt
    rows.append(
        [
            "offloaded, plain greedy (anchor)",
            f"{busy:.0%}",
            f"{plain_tps:.2f}",
            "1.00x",
            "1.0",
            "",
            f"{dt / passes:.3f}",
            "",
            f"{nbytes / passes / 1e6:.0f}",
            "yes" if torch.equal(out, want) else "NO",
        ]
    )
    del plain

    perfect = build_llama(cfg, torch.float32)
    cases = [("perfect draft", perfect, k) for k in (2, 4, 8, 16)] + [("perfect draft", perfect, None)]
    cases.append(("small draft (2 layers)", small, None))
    for name, draft, k in cases:
        model = offloaded(draft)
        kw = {"num_assistant_tokens": k} if k else {}
        generate(model, ids, 2, **kw)  # warm: learns the order and measures a pass
        results = []
        for _ in range(args.reps):
            s0 = ts.get_model_statistics(model)
            out, dt = generate(model, ids, args.tokens, **kw)
            s1 = ts.get_model_statistics(model)
            results.append((dt, out, s0, s1))
        dt, out, s0, s1 = sorted(results, key=lambda r: r[0])[len(results) // 2]
        a, b = s0["speculative"], s1["speculative"]
        passes = b["verification_passes"] - a["verification_passes"]
        drafted = b["drafted"] - a["drafted"]
        accepted = b["accepted"] - a["accepted"]
        nbytes = s1["bytes_read"] - s0["bytes_read"]
        pass_s = dt / max(passes, 1)
        busy = nbytes / bandwidth / dt if bandwidth else 0
        rows.append(
            [
                f"{name}, k={k if k else 'chosen: ' + str(b['drafted_per_pass'])}",
                "",
                f"{args.tokens / dt:.2f}",
                f"{args.tokens / dt / plain_tps:.2f}x",
                f"{args.tokens / max(passes, 1):.1f}",
                f"{accepted / drafted:.0%}" if drafted else "",
                f"{pass_s:.3f}",
                f"{(b['draft_seconds_per_token'] or 0) * 1e3:.1f} ms",
                f"{nbytes / max(passes, 1) / 1e6:.0f}",
                "yes" if torch.equal(out, want) else "NO",
            ]
        )
        rows[-1][1] = f"{busy:.0%}"
        del model
    print_table(
        f"Speculative decoding, disk-bound (pread, O_DIRECT) fp32 Llama of {size / 1e9:.2f} GB, budget "
        f"{args.share:.0%} of it plus the draft, {args.tokens} new tokens, median of {args.reps}; "
        f"disk bandwidth in the run {bandwidth / 1e9:.2f} GB/s",
        [
            "",
            "disk busy",
            "tok/s",
            "vs plain",
            "tokens/pass",
            "accepted",
            "s/pass",
            "draft/token",
            "MB read/pass",
            "tokens identical",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
