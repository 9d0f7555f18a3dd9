"""The ``tensorstream`` command line.

    tensorstream demo                      offload a locally built model and check its tokens
    tensorstream convert CHECKPOINT STORE  write a store from a checkpoint (safetensors or .bin)
    tensorstream inspect STORE             a store's units, sizes, dtypes and checksums
    tensorstream inspect DIRECTORY         one line per store in a directory

A user's error (a missing file, a directory where a file is expected, a bad option, a damaged
store, any TensorStreamError) is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from .cli_demo import CommandError, _demo_run, demo
from .errors import TensorStreamError

DTYPES = ("float32", "bfloat16", "float16")

EPILOG = (
    "exit status: 0 success; 1 the command ran and found a problem (damaged units, tokens that "
    "differ); 2 a user error, reported in one line on stderr."
)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _open_store(path: str):
    """The store at `path`, its manifest checked against its own content."""
    from tensorstream import _core
    from tensorstream.sources import check_manifest, has_digests

    store = _core.Store(path)
    if has_digests(store):  # a manifest edited with a recomputed checksum does not pass
        check_manifest(store, store.fingerprint, store.metadata.get("model_class", ""))
    return store


def inspect(args) -> int:
    path = Path(args.store)
    if path.is_dir():
        return list_stores(path)
    if not path.exists():
        raise CommandError(f"{path}: no such file or directory")
    return inspect_store(str(path), verify=not args.no_verify)


def inspect_store(path: str, verify: bool = True) -> int:
    """Print one store: its metadata, then a row per unit (checksum verified unless `verify`
    is false). Returns 1 when a unit fails its checksum."""
    from tensorstream import _core
    from tensorstream.memory import aligned_empty

    store = _open_store(path)
    print(f"store {store.path}: {store.file_len / 1e9:.3f} GB, fingerprint {store.fingerprint}")
    for k, v in sorted(store.metadata.items()):
        print(f"  {k}: {v}")
    raw, stored = store.raw_bytes, store.stored_bytes
    ratio = raw / max(stored, 1)
    print(f"  units: {raw / 1e9:.3f} GB raw, {stored / 1e9:.3f} GB on disk, compression ratio {ratio:.3f}")
    engine = _core.Engine("pread", 4) if verify else None
    print("\n| unit | offset | bytes | stored | ratio | tensors | dtypes | codec | checksum |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    codecs = {name: stored_len for (name, _codec, _len, stored_len, _chunks) in store.unit_codecs()}
    for i, (name, offset, length, _padded, codec, checksum) in enumerate(store.units()):
        lay = store.layout(i)
        stored_len = codecs[name]
        dtypes = sorted({t.dtype for t in lay.tensors})
        status = "not verified"
        if engine is not None:
            buf = aligned_empty(lay.buffer_len)
            try:
                engine.wait(engine.submit(lay, buf.data_ptr(), lay.buffer_len, True, buf))
                status = f"ok ({checksum})"
            except TensorStreamError as e:
                status = f"CORRUPTED: {_one_line(e)}"
                bad += 1
        print(
            f"| {name} | {offset} | {length} | {stored_len} | {length / stored_len:.3f} | {len(lay.tensors)} "
            f"| {','.join(dtypes)} | {codec} | {status} |"
        )
    return 1 if bad else 0


def list_stores(directory: Path) -> int:
    """Print one line per store (``*.tstore``) in `directory`, without reading the units.
    Returns 1 when a store cannot be opened (its line says why)."""
    paths = sorted(p for p in directory.glob("*.tstore") if p.is_file())
    if not paths:
        raise CommandError(f"{directory}: no stores (*.tstore) in this directory")
    rows = [("store", "model class", "units", "size", "dtypes", "compression")]
    damaged = []
    for p in paths:
        try:
            store = _open_store(str(p))
        except (TensorStreamError, OSError) as e:
            damaged.append((p.name, f"DAMAGED: {type(e).__name__}: {_one_line(e)}"))
            continue
        dtypes = sorted({t.dtype for i in range(len(store.units())) for t in store.layout(i).tensors})
        coded = store.coded_units > 0
        rows.append(
            (
                p.name,
                store.metadata.get("model_class", "?").rsplit(".", 1)[-1],
                str(len(store.units())),
                _size(store.file_len),
                ",".join(dtypes),
                f"ratio {store.raw_bytes / max(store.stored_bytes, 1):.2f}" if coded else "none",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for name, why in damaged:
        print(f"{name.ljust(widths[0])}  {why}")
    return 1 if damaged else 0


def convert(args) -> int:
    import torch

    from tensorstream.hf import convert as convert_checkpoint

    checkpoint, store = Path(args.checkpoint), Path(args.store)
    if checkpoint.is_file():
        raise CommandError(
            f"{checkpoint} is a file; CHECKPOINT is a directory holding config.json and its weights (*.safetensors or pytorch_model*.bin)"
        )
    if checkpoint.is_dir() and not (checkpoint / "config.json").is_file():
        raise CommandError(f"{checkpoint} has no config.json: it is not a Hugging Face checkpoint directory")
    if store.is_file() and store.suffix != ".tstore":
        raise CommandError(
            f"{store} is a file that is not a store (*.tstore); STORE is a .tstore file or a directory"
        )
    if store.suffix and not store.exists() and not store.parent.is_dir():
        raise CommandError(f"{store.parent}: no such directory, to write the store {store.name} into")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(convert_checkpoint(str(checkpoint), str(store), dtype=dtype, progress=not args.quiet))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see 'PROG --help')``, status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        default=os.path.join(tempfile.gettempdir(), "tensorstream-demo"),
        help="directory of the demo's store, rewritten by every run (default: %(default)s)",
    )
    p.add_argument(
        "--tokens", type=_positive(int), default=32, help="tokens to generate (default: %(default)s)"
    )
    p.add_argument(
        "--prompt", type=_positive(int), default=16, help="tokens in the random prompt (default: %(default)s)"
    )
    p.add_argument(
        "--budget-fraction",
        metavar="F",
        type=_positive(float),
        default=0.4,
        help="memory budget of the offloaded run, as a fraction of the model's size (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the public commands (the demo's internal child role is not among them)."""
    from tensorstream import __version__

    ap = _Parser(
        prog="tensorstream",
        description="Stream the layers of PyTorch models from disk: run the demo, write and inspect stores.",
        epilog=EPILOG,
    )
    ap.add_argument(
        "--version",
        action="version",
        version=f"tensorstream {__version__}",
        help="print the version of tensorstream and exit",
    )
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND", title="commands", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, epilog=EPILOG)

    d = command(
        "demo",
        "offload a locally built Llama model and check that its tokens are unchanged",
        "Build a Llama-architecture model locally (seeded random weights, no download), generate "
        "greedily in memory and offloaded with a budget below its size, each in its own process, "
        "and print tokens/s, bytes streamed, hit rates and peak RSS side by side.",
    )
    _add_demo_options(d)
    c = command(
        "convert",
        "write an aligned, checksummed store from a checkpoint (safetensors or .bin)",
        "Write a store from a Hugging Face checkpoint (safetensors or pytorch_model.bin), tensor by tensor (constant "
        "memory), atomically; prints the store's path. from_pretrained(..., store=PATH) uses it.",
    )
    c.add_argument(
        "checkpoint", help="checkpoint directory (or a hub id already in the local Hugging Face cache)"
    )
    c.add_argument(
        "store", help="store file to write (*.tstore), or a directory to write <ModelClass>.tstore into"
    )
    c.add_argument("--dtype", choices=DTYPES, default=None, help="convert the tensors to this dtype")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    i = command(
        "inspect",
        "show a store's units and checksums, or list the stores in a directory",
        "With a store file: its metadata and one row per unit (offset, bytes, compression, dtypes, "
        "checksum status). With a directory: one line per store in it (model class, units, size, "
        "dtypes), without reading the units.",
    )
    i.add_argument("store", metavar="PATH", help="a store file (*.tstore), or a directory of stores")
    i.add_argument("--no-verify", action="store_true", help="do not read the units to verify their checksums")
    return ap


def _demo_run_parser() -> argparse.ArgumentParser:
    r = _Parser(prog="tensorstream _demo-run", description="one side of `tensorstream demo` (internal)")
    r.add_argument("role", choices=["reference", "offload"], help="the run in memory or the offloaded run")
    _add_demo_options(r)
    r.set_defaults(cmd="_demo-run")
    return r


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # The demo's child processes: dispatched before the public parser so that the role
        # never shows in `tensorstream --help` (argparse cannot hide a subcommand).
        if argv[:1] == ["_demo-run"]:
            args = _demo_run_parser().parse_args(argv[1:])
        else:
            args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return COMMANDS[args.cmd](args)
    except CommandError as e:
        print(f"tensorstream {args.cmd}: {_one_line(e)}", file=sys.stderr)
        return e.status
    except (TensorStreamError, OSError) as e:
        print(f"tensorstream {args.cmd}: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorstream {args.cmd}: interrupted", file=sys.stderr)
        return 130


COMMANDS = {"demo": demo, "_demo-run": _demo_run, "convert": convert, "inspect": inspect}


if __name__ == "__main__":
    sys.exit(main())
