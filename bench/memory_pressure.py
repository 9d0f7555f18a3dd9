"""Memory pressure on this machine: a model offloaded with the default CPU budget keeps
generating identical tokens while another process takes most of the remaining RAM, and its
budget grows back when that process exits.

One greedy generate() of --tokens new tokens per backend, in three phases: before; during
(from token --from-token, a child process holds all of the available RAM but --leave
headrooms); after (from token --to-token, the child has exited). For each phase: tok/s, the
effective budget, what TensorStream held (its own accounting), and the lowest MemAvailable
seen; then the memory pressure callback's events, and whether the tokens are those of the
un-offloaded model. The anchor is that model, in memory, in the same run.

With --gpu (on a device): the 7.0 GB bf16 Llama (hidden 4096, 16 layers) at
`vram_budget_gb=3` on a GPU capped at --cap-gb for the process
(`torch.cuda.set_per_process_memory_fraction`), prompt of --context tokens: with the budget
fixed (no headroom, no retry) the KV cache pushes it out of memory; with memory pressure on
it completes, with the tokens of the model fully on the GPU.

Usage: python bench/memory_pressure.py [--workdir DIR] [--tokens 48] [--layers 8]
       python bench/memory_pressure.py --gpu [--cap-gb 4] [--context 4096] [--tokens 32]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from _common import build_llama, llama_config, machine, print_table  # noqa: E402

import tensorstream as ts  # noqa: E402
from tensorstream import pressure  # noqa: E402
from tensorstream.memory import available_ram, total_ram  # noqa: E402

GiB = 1 << 30
HOG = (
    "import sys; n = int(sys.argv[1]); b = bytearray(n); b[::4096] = b'\\x01' * len(range(0, n, 4096)); "
    "print('held', flush=True); sys.stdin.read()"
)


class Phases:
    """A generate() streamer: times each token, starts the memory hog at one token and ends
    it at another, and samples TensorStream's accounting after every token."""

    def __init__(self, rt, start: int, stop: int, leave: int):
        self.rt, self.start, self.stop, self.leave = rt, start, stop, leave
        self.count = -1  # the first put() is the prompt
        self.hog = None
        self.taken = 0
        self.samples = []  # (phase, seconds, effective budget, held, MemAvailable)
        self.t = None

    def phase(self) -> str:
        return "before" if self.count < self.start else "during" if self.count < self.stop else "after"

    def put(self, _tokens) -> None:
        now = time.perf_counter()
        rt = self.rt
        if self.t is not None and rt is None:
            self.samples.append((self.phase(), now - self.t))
        elif self.t is not None:
            effective = rt.budget_plan.resident + rt.planner.budget
            self.samples.append((self.phase(), now - self.t, effective, rt.held_bytes(), available_ram()))
        self.count += 1
        if self.count == self.start:
            self.taken = max(available_ram() - self.leave, 0)
            self.hog = subprocess.Popen(
                [sys.executable, "-c", HOG, str(self.taken)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self.hog.stdout.readline()  # it holds the memory now
        elif self.count == self.stop and self.hog is not None:
            self.end()
        self.t = time.perf_counter()

    def end(self) -> None:
        """Let the memory hog exit (generate() calls this at its end, and so does run())."""
        if self.hog is not None:
            self.hog.stdin.close()
            self.hog.wait()
            self.hog = None


def run(model, ids, tokens: int, args, backend: str) -> tuple:
    events = []
    ts.set_memory_pressure_callback(events.append)
    cfg = ts.Config(os.path.join(args.workdir, backend), backend=backend)  # the default budget
    model = ts.offload(model, cfg)
    rt = model._tensorstream
    room = pressure.headroom(cfg, total_ram())
    phases = Phases(rt, args.from_token, args.to_token, int(args.leave * room))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                streamer=phases,
            )
    finally:
        phases.end()
    total = time.perf_counter() - t0
    ts.set_memory_pressure_callback(None)
    s = ts.get_model_statistics(model)
    return out, phases, events, s, room, total


def gpu(args) -> None:
    from tensorstream import runtime

    cfg = llama_config(hidden=4096, intermediate=11008, layers=16, heads=32)
    ids = torch.randint(0, 32000, (1, args.context), generator=torch.Generator().manual_seed(1)).cuda()
    print(f"machine: {machine()}", flush=True)
    model = build_llama(cfg, torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False
        )
    model = model.cpu()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    rows = []
    for name, headroom, retry in (("fixed budget", 0.0, set()), ("memory pressure", None, {"cuda"})):
        m = model if name == "memory pressure" else build_llama(cfg, torch.bfloat16)
        m = ts.offload(
            m, ts.Config(os.path.join(args.workdir, "gpu"), vram_budget_gb=3, memory_headroom_gb=headroom)
        )
        m.to("cuda")
        events = []
        ts.set_memory_pressure_callback(events.append)
        runtime.OOM_RETRY_DEVICES = retry
        torch.cuda.set_per_process_memory_fraction(args.cap_gb * GiB / total)
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = m.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False
                )
            result = "yes" if torch.equal(out, want) else "NO"
        except torch.OutOfMemoryError as e:
            result = f"out of memory ({type(e).__name__})"
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        s = ts.get_model_statistics(m)
        rows.append(
            [
                name,
                result,
                f"{time.perf_counter() - t0:.1f}",
                f"{torch.cuda.max_memory_allocated() / GiB:.2f}",
                f"{s['effective_budget_gb']:.2f} of {s['budget_gb']:.2f}",
                s["oom_retries"],
                " -> ".join([events[0].previous] + [ev.level for ev in events]) if events else "",
            ]
        )
        m.to("cpu")
        del m
        gc.collect()
        torch.cuda.empty_cache()
    print_table(
        f"7.0 GB bf16 Llama, vram_budget_gb=3, GPU capped at {args.cap_gb} GiB, {args.context}-token prompt, "
        f"{args.tokens} new tokens",
        [
            "",
            "completes with the reference's tokens",
            "seconds",
            "peak allocated GiB",
            "effective budget GiB",
            "OOM retries",
            "pressure levels",
        ],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--from-token", type=int, default=12)
    ap.add_argument("--to-token", type=int, default=32)
    ap.add_argument("--leave", type=float, default=0.4, help="headrooms the other process leaves free")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--backends", default="auto,pread")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--cap-gb", type=float, default=4.0)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="ts-pressure-")
    if args.gpu:
        return gpu(args)
    cfg = llama_config(hidden=2048, intermediate=5504, layers=args.layers, heads=16)
    ids = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(1))
    print(f"machine: {machine()}; MemAvailable {available_ram() / GiB:.1f} GiB at the start", flush=True)

    model = build_llama(cfg, torch.float32)
    size = ts.estimate_model_memory(model)
    timer = Phases(None, args.tokens + 1, args.tokens + 1, 0)  # times tokens only
    with torch.no_grad():
        want = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            streamer=timer,
        )
    secs = sorted(x[1] for x in timer.samples)
    ref_tps = 1 / secs[len(secs) // 2]
    del model

    rows, notes = [["in memory (anchor)", "", f"{ref_tps:.2f}", f"{size / GiB:.2f}", "", "", ""]], []
    for backend in args.backends.split(","):
        model = build_llama(cfg, torch.float32)
        out, phases, events, s, room, _ = run(model, ids, args.tokens, args, backend)
        same = torch.equal(out, want)
        for ph in ("before", "during", "after"):
            xs = [x for x in phases.samples if x[0] == ph]
            if not xs:
                continue
            secs = sorted(x[1] for x in xs)
            rows.append(
                [
                    f"TensorStream {backend} ({s['backend']})",
                    ph,
                    f"{1 / secs[len(secs) // 2]:.2f}",
                    f"{min(x[2] for x in xs) / GiB:.2f} to {max(x[2] for x in xs) / GiB:.2f}",
                    f"{max(x[3] for x in xs) / GiB:.2f}",
                    f"{min(x[4] for x in xs) / GiB:.2f}",
                    "yes" if same else "NO",
                ]
            )
        notes.append(
            f"{backend}: budget {s['budget_bytes'] / GiB:.2f} GiB (default), headroom {room / GiB:.2f} GiB, "
            f"the other process took {phases.taken / GiB:.1f} GiB; {len(events)} callback events:"
        )
        notes += [f"  - {ev}" for ev in events]
        del model, phases
        gc.collect()  # a deleted model's runtime would still answer the next one's pressure
    print_table(
        f"Memory pressure, {args.layers}-layer fp32 Llama of {size / GiB:.2f} GiB, {args.tokens} new tokens",
        [
            "",
            "phase",
            "tok/s (median)",
            "effective budget GiB",
            "held GiB (max)",
            "MemAvailable GiB (min)",
            "tokens identical",
        ],
        rows,
    )
    print("\n".join(notes))


if __name__ == "__main__":
    main()
