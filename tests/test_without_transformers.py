"""TensorStream with only torch installed: transformers is an extra (``tensorstream[hf]``).
In a subprocess whose imports of transformers (and of peft and accelerate, which import it)
fail as if it were not installed, ``import tensorstream`` works, and ``offload()`` of a plain
``nn.Sequential`` streams its layers with outputs identical to the un-offloaded copy's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = r"""
import sys

BLOCKED = ("transformers", "peft", "accelerate")
tried = []


class NotInstalled:
    # A meta path finder consulted before all others: these packages cannot be imported.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())


def check(ok, what):
    if not ok:
        print("FAILED:", what, file=sys.stderr)
        sys.exit(1)


try:
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    check(False, "the blocker let transformers be imported")

import torch
from torch import nn

sys.path.insert(0, sys.argv[1])
from conftest import budget_gb

import tensorstream as ts


def mlp():
    torch.manual_seed(0)
    layers = []
    for _ in range(6):
        layers += [nn.Linear(64, 64), nn.ReLU()]
    return nn.Sequential(*layers).eval()


ref, model = mlp(), mlp()
x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
cfg = ts.Config(sys.argv[2], vram_budget_gb=budget_gb(model, 2), backend="pread")
model = ts.offload(model, cfg)
with torch.no_grad():
    want = ref(x)
    got = [model(x) for _ in range(2)]
check(all(torch.equal(g, want) for g in got), "the offloaded model's outputs differ from the copy's")
s = ts.get_model_statistics(model)
check(len(model._tensorstream.units) == 6, f"units: {[u.name for u in model._tensorstream.units]}")
check(s["budget_bytes"] < ts.estimate_model_memory(ref), f"the whole model fits the budget: {s}")
check(s["bytes_read"] > 0, f"no layer was read from the store: {s}")
check(not any(m.split(".")[0] in BLOCKED for m in sys.modules), "a blocked package is in sys.modules")
check("transformers" not in sys.modules, "transformers is in sys.modules")
check(tried == ["transformers"], f"tensorstream tried to import {tried[1:]}")  # the first: the check above
print("WITHOUT-TRANSFORMERS-OK")
"""


def test_import_and_offload_of_a_plain_module_need_only_torch(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")  # PYTHONPATH, if any, is kept
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(HERE), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "WITHOUT-TRANSFORMERS-OK" in p.stdout, p.stdout + p.stderr
