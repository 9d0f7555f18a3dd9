"""A store or checkpoint changed on disk under a running model: truncated or written in
place, the next forward raises StoreCorruptedError or StreamIOError naming the file (no
SIGBUS, no silently different outputs); replaced or deleted, the model keeps its own weights
(it holds the open file)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

CHANGE_SCRIPT = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from conftest import tiny_llama, budget_gb, input_ids
import tensorstream as ts
d, backend, how, change = sys.argv[2:6]
ref = tiny_llama(tied=False)
cfg = ts.Config(d + "/store", vram_budget_gb=budget_gb(ref, 2.5), backend=backend)
if how == "offload":
    model = ts.offload(tiny_llama(tied=False), cfg)
else:
    ref.save_pretrained(d + "/ckpt")
    model = ts.from_pretrained(d + "/ckpt", cfg)
path = ts.get_model_statistics(model)["store_path"]
if os.path.isdir(path):
    path = os.path.join(path, "model.safetensors")
ids = input_ids()
with torch.no_grad():
    want = ref(ids).logits
    assert torch.equal(model(ids).logits, want)
    time.sleep(0.05)
    size = os.path.getsize(path)
    if change == "truncate":
        os.truncate(path, size // 2)
    elif change == "in_place":  # inside the first layer's bytes
        at = ts._core.Store(path).units()[0].offset + 4096 if how == "offload" else size // 2
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(bytes(4096))
    elif change == "replace":
        tmp = path + ".new"
        with open(tmp, "wb") as f:
            f.write(os.urandom(size))
        os.replace(tmp, path)
    elif change == "delete":
        os.unlink(path)
    for _ in range(2):
        try:
            out = model(ids).logits
        except (ts.StoreCorruptedError, ts.StreamIOError) as e:
            assert path in str(e), str(e)  # the pread path's own checks name the unit too
            print("RAISED")
            continue
        assert torch.equal(out, want), "silently different"
        print("SAME")
"""


CASES = [("offload", b, c) for b in ("mmap", "pread") for c in ("truncate", "in_place", "replace", "delete")]
CASES += [("from_pretrained", "pread", c) for c in ("truncate", "in_place")]  # a checkpoint read in place


@pytest.mark.parametrize(("how", "backend", "change"), CASES)
def test_a_file_changed_under_a_running_model(tmp_path, how, backend, change):
    p = subprocess.run(
        [sys.executable, "-c", CHANGE_SCRIPT, str(HERE), str(tmp_path), backend, how, change],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"exit {p.returncode}: {p.stdout}{p.stderr[-2000:]}"
    want = "RAISED" if change in ("truncate", "in_place") else "SAME"
    assert p.stdout.split() == [want, want], p.stdout + p.stderr[-2000:]
