"""Shared helpers of the benchmark scripts: model builders, timing, table printing."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name(0)}"
    return f"{os.cpu_count()} cores ({cpu}), {ram:.0f} GiB RAM{gpu}, torch {torch.__version__}"


def llama_config(hidden: int, intermediate: int, layers: int, heads: int, vocab: int = 32000, kv_heads=None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def build_llama(cfg, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    """A Llama-architecture model with seeded random weights, built directly in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of copies from pinned host memory to the GPU (the PCIe link's measured rate)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    sync()
    bw = nbytes * reps / (time.perf_counter() - t0)
    del src, dst
    return bw


def time_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs):
    """(tokens per second of generated tokens, output ids) for one greedy generate();
    `kwargs` go to generate()."""
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **kwargs,
        )
    sync()
    dt = time.perf_counter() - t0
    return ids.shape[0] * new_tokens / dt, out


def print_table(title: str, header: list, rows: list) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in r) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def drop_caches(paths) -> None:
    from tensorstream import _core

    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                for f in files:
                    _core.drop_page_cache(os.path.join(root, f))
        elif os.path.exists(p):
            _core.drop_page_cache(p)


def page_cache_share(paths) -> float:
    """The share of the files' bytes (files or directories of files) that the page cache
    holds right now, from mincore(2): 0.0 all on disk, 1.0 all in memory."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = total = 0
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
        elif os.path.exists(p):
            files.append(p)
    for f in files:
        size = os.path.getsize(f)
        if size == 0:
            continue
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        with open(f, "rb") as fh:
            m = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)  # mapping reads nothing
            head = ctypes.c_char.from_buffer(m)
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(head)), ctypes.c_size_t(size), vec)
            del head
            m.close()
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"mincore {f}")
        resident += sum(v & 1 for v in vec) * page
        total += pages * page
    return resident / total if total else 0.0


def git_rev() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return "unknown"


# A benchmark runs each setting in a child process of its own; the child reports its result
# as one JSON line on stdout, starting with this.
RESULT = "RESULT "


def report_result(res: dict) -> None:
    """In a child: report `res` to the parent's `run_child`."""
    print(RESULT + json.dumps(res), flush=True)


def run_child(cmd: list, what: str) -> dict:
    """Run a child benchmark process (its stderr passes through) and return the result it
    reported last with `report_result`; exits naming `what` if the child failed."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{what} failed ({p.returncode})")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    return json.loads(lines[-1][len(RESULT) :])
