"""The `tensorstream` command line: `demo` runs the README's main job; `inspect` shows a store."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from .errors import TensorStreamError


def _demo_model(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


class _TqdmStreamer:
    """A transformers streamer that advances a progress bar per generated token."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr)
        self.first = True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.bar.update(1)

    def end(self):
        self.bar.close()


def _demo_run(args) -> int:
    """One side of the demo, in its own process so that its peak RSS is its own."""
    import torch

    import tensorstream as ts
    from tensorstream.memory import peak_rss, reset_peak_rss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _demo_model()
    total = ts.estimate_model_memory(model)
    ids = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    info = {"model_bytes": total}
    if args.role == "offload":
        budget_gb = args.budget_fraction * total / 2**30
        info["budget_gb"] = budget_gb
        cfg = ts.Config(args.store, vram_budget_gb=budget_gb, overwrite_store=True)  # the demo's own store
        t0 = time.perf_counter()
        model = ts.offload(model, cfg)
        info["offload_seconds"] = time.perf_counter() - t0
    import gc

    gc.collect()
    reset_peak_rss()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            streamer=_TqdmStreamer(args.tokens, "offloaded" if args.role == "offload" else "in memory"),
        )
        dt = time.perf_counter() - t0
    info.update(tokens=out[0, args.prompt :].tolist(), tok_per_s=args.tokens / dt, peak_rss=peak_rss())
    if args.role == "offload":
        s = ts.get_model_statistics(model)
        info.update(
            bytes_read=s["bytes_read"],
            hit_rate=s["cache_hit_rate"],
            prefetch_hit_rate=s["prefetch_hit_rate"],
            backend=s["backend"],
            peak_usage=s["peak_usage_bytes"],
            budget_bytes=s["budget_bytes"],
            kept=s["kept_layers"],
            units=s["units"],
        )
    print("RESULT " + json.dumps(info), flush=True)
    return 0


def _run_child(role: str, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "tensorstream.cli",
        "_demo-run",
        role,
        "--store",
        args.store,
        "--tokens",
        str(args.tokens),
    ]
    cmd += ["--prompt", str(args.prompt), "--budget-fraction", str(args.budget_fraction)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"demo: the {role} run failed (exit {proc.returncode})")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def demo(args) -> int:
    print(
        "TensorStream demo: a Llama-architecture model (16 layers, hidden 1024, vocab 32000, fp32, seeded random "
        f"weights) generates {args.tokens} tokens greedily, in memory and offloaded with a budget of "
        f"{args.budget_fraction:.0%} of its size.",
        flush=True,
    )
    ref = _run_child("reference", args)
    off = _run_child("offload", args)
    same = ref["tokens"] == off["tokens"]
    gb = 1e9
    rows = [
        ("model size", f"{ref['model_bytes'] / gb:.2f} GB", ""),
        (
            "budget (vram_budget_gb, on CPU: RAM)",
            f"{off['budget_gb']:.3f} GiB",
            f"{args.budget_fraction:.0%} of the model",
        ),
        ("tokens/s", f"{ref['tok_per_s']:.2f}", f"{off['tok_per_s']:.2f}"),
        ("peak RSS while generating", f"{ref['peak_rss'] / gb:.2f} GB", f"{off['peak_rss'] / gb:.2f} GB"),
        (
            "weights held (engine accounting, peak)",
            "",
            f"{off['peak_usage'] / gb:.2f} GB of {off['budget_bytes'] / gb:.2f} GB budget",
        ),
        ("bytes streamed", "", f"{off['bytes_read'] / gb:.2f} GB"),
        ("layers kept resident", "", f"{off['kept']} of {off['units']}"),
        ("cache hit rate / prefetch hit rate", "", f"{off['hit_rate']:.0%} / {off['prefetch_hit_rate']:.0%}"),
        ("backend", "", off["backend"]),
    ]
    print()
    print(f"| {'':40} | {'in memory':>14} | {'TensorStream':>40} |")
    print(f"|{'-' * 42}|{'-' * 16}|{'-' * 42}|")
    for name, a, b in rows:
        print(f"| {name:40} | {a:>14} | {b:>40} |")
    print()
    print(f"generated tokens identical to the model not offloaded: {same}")
    if not same:
        print(f"  in memory: {ref['tokens']}\n  offloaded: {off['tokens']}")
        return 1
    return 0


def inspect(args) -> int:
    import torch  # noqa: F401  (errors module imports need the package)

    from tensorstream import _core
    from tensorstream.errors import TensorStreamError
    from tensorstream.memory import aligned_empty
    from tensorstream.sources import check_manifest, has_digests

    store = _core.Store(args.store)
    print(f"store {store.path}: {store.file_len / 1e9:.3f} GB, fingerprint {store.fingerprint}")
    if has_digests(store):  # a manifest edited with a recomputed checksum does not pass
        check_manifest(store, store.fingerprint, store.metadata.get("model_class", ""))
    for k, v in sorted(store.metadata.items()):
        print(f"  {k}: {v}")
    raw, stored = store.raw_bytes, store.stored_bytes
    ratio = raw / max(stored, 1)
    print(f"  units: {raw / 1e9:.3f} GB raw, {stored / 1e9:.3f} GB on disk, compression ratio {ratio:.3f}")
    engine = _core.Engine("pread", 4) if not args.no_verify else None
    print("\n| unit | offset | bytes | stored | ratio | tensors | dtypes | codec | checksum |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    codecs = {name: stored_len for (name, _codec, _len, stored_len, _chunks) in store.unit_codecs()}
    for i, (name, offset, length, _padded, codec, checksum) in enumerate(store.units()):
        lay = store.layout(i)
        stored_len = codecs[name]
        dtypes = sorted({t[1] for t in lay.tensors})
        status = "not verified"
        if engine is not None:
            buf = aligned_empty(lay.buffer_len)
            try:
                engine.wait(engine.submit(lay, buf.data_ptr(), lay.buffer_len, True, buf))
                status = f"ok ({checksum})"
            except TensorStreamError as e:
                status = f"CORRUPTED: {e}"
                bad += 1
        print(
            f"| {name} | {offset} | {length} | {stored_len} | {length / stored_len:.3f} | {len(lay.tensors)} "
            f"| {','.join(dtypes)} | {codec} | {status} |"
        )
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tensorstream", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="offload a locally built Llama model and check its tokens")
    d.add_argument("--store", default=os.path.join(tempfile.gettempdir(), "tensorstream-demo"))
    d.add_argument("--tokens", type=int, default=32)
    d.add_argument("--prompt", type=int, default=16)
    d.add_argument("--budget-fraction", type=float, default=0.4)
    r = sub.add_parser("_demo-run", help=argparse.SUPPRESS)
    r.add_argument("role", choices=["reference", "offload"])
    r.add_argument("--store", required=True)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--prompt", type=int, default=16)
    r.add_argument("--budget-fraction", type=float, default=0.4)
    c = sub.add_parser("convert", help="write an aligned, checksummed store from a safetensors checkpoint")
    c.add_argument("checkpoint", help="checkpoint directory (or a hub id in the local Hugging Face cache)")
    c.add_argument("store", help="store file, or directory to write <ModelClass>.tstore into")
    c.add_argument("--dtype", default=None, help="convert tensors to this dtype (float32, bfloat16, float16)")
    i = sub.add_parser("inspect", help="show a store's units, sizes, dtypes and checksum status")
    i.add_argument("store")
    i.add_argument("--no-verify", action="store_true", help="do not read the units to verify their checksums")
    args = ap.parse_args(argv)
    try:
        return _dispatch(args)
    except TensorStreamError as e:
        print(f"tensorstream {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "_demo-run":
        return _demo_run(args)
    if args.cmd == "convert":
        import torch

        from tensorstream.hf import convert

        dtype = getattr(torch, args.dtype) if args.dtype else None
        print(convert(args.checkpoint, args.store, dtype=dtype, progress=True))
        return 0
    return inspect(args)


if __name__ == "__main__":
    sys.exit(main())
