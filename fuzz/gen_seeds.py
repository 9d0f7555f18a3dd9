"""Write the fuzz seed corpora under fuzz/seeds/<target>/: small, valid inputs made with the
crate's own StoreWriter (through the Python extension) and the safetensors library.

    .venv/bin/python fuzz/gen_seeds.py

The seeds are checked in; rerun this only to regenerate them. Deterministic output.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from tensorstream import _core

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "seeds"
ST = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.bool: "BOOL",
    torch.float64: "F64",
    torch.int32: "I32",
    torch.int16: "I16",
}


def tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


def weights(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return torch.randint(0, 256 if dtype == torch.uint8 else 1000, shape, generator=g).to(dtype)


STORES = {
    "one_unit": [("layers.0", [("weight", torch.float32, (4, 4))])],
    "three_units": [
        ("model.layers.0", [("q.weight", torch.float32, (8, 8)), ("q.bias", torch.float32, (8,))]),
        (
            "model.layers.1",
            [("q.weight", torch.bfloat16, (8, 8)), ("norm", torch.float16, (8,)), ("step", torch.int64, ())],
        ),
        (
            "model.layers.2",
            [("mask", torch.bool, (3, 5)), ("empty", torch.float32, (0, 4)), ("ids", torch.uint8, (7,))],
        ),
    ],
    "two_block_unit": [
        ("big", [("w", torch.float32, (1100,)), ("v", torch.int8, (3000,))]),
        ("small", [("w", torch.float64, (2,))]),
    ],
    "empty": [],
}

# Units coded with the bytegroup codec (weights-like values compress; random bytes stay raw).
CODED_STORES = {
    "coded_two_units": [
        ("model.layers.0", [("w", torch.bfloat16, (64, 64)), ("b", torch.float32, (64,))]),
        ("model.layers.1", [("w", torch.float32, (128, 32))]),
    ],
    "coded_mixed": [
        ("a", [("w", torch.float16, (32, 32))]),
        ("b", [("noise", torch.uint8, (3000,)), ("ids", torch.int64, (40,))]),
    ],
}


def write_store(path: str, units, meta: bool, level=None) -> None:
    w = _core.StoreWriter(path, "0123456789abcdef0123456789abcdef")
    make = tensor
    if level is not None:
        w.set_compression(level, 1)
        make = weights
    if meta:
        w.set_metadata("model_class", "transformers.LlamaForCausalLM")
        w.set_metadata("writer", "tensorstream seed")
    keep = []
    for k, (uname, tensors) in enumerate(units):
        w.begin_unit(uname)
        for j, (tname, dtype, shape) in enumerate(tensors):
            t = make(dtype, shape, 100 * k + j).contiguous()
            keep.append(t)
            w.add_tensor(tname, ST[dtype], list(shape), t.data_ptr(), t.numel() * t.element_size())
        w.end_unit()
    w.finish()


def safetensors_files() -> dict:
    out = {}
    out["one_tensor"] = st_save({"w": tensor(torch.float32, (2, 3), 1)})
    out["dtypes"] = st_save(
        {f"t.{ST[d].lower()}": tensor(d, (3,), i) for i, d in enumerate(ST)}, metadata={"format": "pt"}
    )
    out["scalar_and_empty"] = st_save(
        {"s": tensor(torch.float32, (), 2), "e": torch.zeros(0, 5), "v": tensor(torch.int64, (4,), 3)}
    )
    out["layers"] = st_save(
        {
            f"model.layers.{i}.{n}": tensor(torch.bfloat16, (4, 4), i)
            for i in range(3)
            for n in ("q.weight", "k.weight")
        }
    )
    header = b"{}"
    out["empty_header"] = struct.pack("<Q", len(header)) + header
    return {k: bytes(v) for k, v in out.items()}


INDEXES = {
    "valid": {
        "metadata": {"total_size": 12},
        "weight_map": {
            "a.w": "model-00001-of-00002.safetensors",
            "a.v": "model-00001-of-00002.safetensors",
            "b.w": "model-00002-of-00002.safetensors",
        },
    },
    "one_shard": {"weight_map": {"b.w": "model-00002-of-00002.safetensors"}},
    "inner_symlink": {"weight_map": {"b.w": "inner.safetensors"}},
    "outside_symlink": {"weight_map": {"a.w": "link.safetensors"}},
    "parent": {"weight_map": {"a.w": "../outside.safetensors"}},
    "subdir": {"weight_map": {"c.w": "sub/c.safetensors"}},
    "absolute": {"weight_map": {"a.w": "/dev/shm/outside.safetensors"}},
    "wrong_shard": {"weight_map": {"a.w": "model-00002-of-00002.safetensors"}},
    "empty_map": {"weight_map": {}},
}


def codec_seeds() -> dict:
    """Raw chunks for the codec_decode target: weights as bf16, f16 and f32 bytes, small
    integers, zeros. Byte 0 picks the mode (1: round trip, 2: encode then corrupt)."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2048, generator=g) * 0.02
    raws = {
        "bf16": (2, w.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()),
        "f16": (2, w.to(torch.float16).view(torch.uint8).numpy().tobytes()),
        "f32": (4, w.view(torch.uint8).numpy().tobytes()),
        "i64": (8, torch.arange(300, dtype=torch.int64).view(torch.uint8).numpy().tobytes()),
        "u8": (1, bytes(range(256)) * 8),
        "zeros": (4, bytes(4096)),
    }
    widx = {1: 0, 2: 1, 4: 2, 8: 3}
    out = {}
    for name, (width, raw) in raws.items():
        out[f"roundtrip_{name}"] = bytes([1, widx[width]]) + raw
        out[f"corrupt_{name}"] = bytes([2, widx[width], 7, 0, 0x10, 0]) + raw
    # Hostile decode framing: a raw chunk of 16 bytes, and a grouped one with a bad header.
    out["decode_raw"] = bytes([0, 0]) + (16 << 8).to_bytes(3, "little") + bytes(range(16))
    out["decode_bg2"] = bytes([0, 2]) + (64 << 8).to_bytes(3, "little") + bytes(10) + bytes(range(64))
    return out


def main() -> int:
    if SEEDS.exists():
        shutil.rmtree(SEEDS)
    for t in ("store_open", "store_manifest", "safetensors_header", "safetensors_index", "codec_decode"):
        (SEEDS / t).mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(n, u, m, None) for n, u in STORES.items() for m in (False, True)]
        runs += [(n, u, True, 3) for n, u in CODED_STORES.items()]
        for name, units, meta, level in runs:
            if True:
                p = os.path.join(tmp, f"{name}.tstore")
                write_store(p, units, meta, level)
                data = Path(p).read_bytes()
                tag = f"{name}{'_meta' if meta else ''}"
                (SEEDS / "store_open" / f"{tag}.tstore").write_bytes(data)
                off, n = struct.unpack_from("<QQ", data, 16)
                blocks = (off - 4096) // 4096
                assert off % 4096 == 0 and blocks < 256
                (SEEDS / "store_manifest" / f"{tag}.bin").write_bytes(
                    bytes([blocks, 0]) + data[off : off + n]
                )
    for name, data in safetensors_files().items():
        (SEEDS / "safetensors_header" / f"{name}.safetensors").write_bytes(data)
    for name, idx in INDEXES.items():
        (SEEDS / "safetensors_index" / f"{name}.json").write_text(json.dumps(idx, indent=1))
    for name, data in codec_seeds().items():
        (SEEDS / "codec_decode" / f"{name}.bin").write_bytes(data)
    for t in sorted(SEEDS.iterdir()):
        files = list(t.iterdir())
        print(f"{t.name}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
