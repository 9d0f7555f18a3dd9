"""The budget measured from outside the library: the process's own resident memory, read
from /proc/self/status at every decoder layer during a forward, not TensorStream's counters.

``from_pretrained(..., backend="mmap")`` reads the checkpoint's layers by copying them out of
a mapping of its files; the mapping's pages stayed resident after the copy (RssFile grew by
the whole checkpoint, outside any budget, while the statistics reported the budget). The
engine now drops them once copied (``io/mmap.rs``, ``drop_pages``); without that line this
test measured a growth of the checkpoint's size."""

from __future__ import annotations

import subprocess
import sys

CODE = r"""
import sys, torch
import tensorstream as ts
from transformers import LlamaConfig, LlamaForCausalLM

MiB = 1 << 20

def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssFile", "RssAnon")):
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out

cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
torch.manual_seed(0)
ref = LlamaForCausalLM(cfg).eval()
ckpt, store = sys.argv[1] + "/ckpt", sys.argv[1] + "/store"
ref.save_pretrained(ckpt)
size = sum(p.numel() * p.element_size() for p in ref.parameters())
budget = size // 4
ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want = ref(ids).logits
del ref
model = ts.from_pretrained(ckpt, ts.Config(store, vram_budget_gb=budget / (1 << 30), backend="mmap"))
samples = []
for layer in model.model.layers:
    layer.register_forward_pre_hook(lambda m, a: samples.append(rss()))
before = rss()
with torch.no_grad():
    got = [model(ids).logits for _ in range(3)]
assert all(torch.equal(g, want) for g in got), "logits differ"
s = ts.get_model_statistics(model)
assert s["bytes_read"] > size, "the layers were not streamed"
grew = max(x["RssFile"] for x in samples) - before["RssFile"]
print(f"RESULT checkpoint_mib={size / MiB:.1f} budget_mib={budget / MiB:.1f} rssfile_growth_mib={grew / MiB:.1f}")
"""


def test_a_checkpoint_read_through_a_mapping_does_not_stay_resident(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    fields = dict(kv.split("=") for kv in line.split()[1:])
    budget, growth = float(fields["budget_mib"]), float(fields["rssfile_growth_mib"])
    slack = 16.0  # MiB: code pages of kernels the first forward runs, mapped files of libraries
    assert growth <= budget + slack, (
        f"{line}: the mapping's pages stayed resident ({growth:.1f} MiB > {budget + slack:.1f})"
    )
