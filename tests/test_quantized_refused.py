"""Quantized models as users build them (torchao, optimum-quanto, bitsandbytes through
transformers' quantizer), each a tiny seeded Llama: their weights are tensor subclasses, which
do not stream yet. offload() refuses them with a TensorStreamError naming the parameter and
its type, where it crashed the interpreter (torchao, quanto: SIGSEGV in the fingerprint's
checksum) or gave wrong tokens (bitsandbytes NF4 on pread). One subprocess for all four
(importing the libraries is the slow part), so that a crash fails the test."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

# Not in requirements-dev.txt: installed beside the suite, torchao made transformers import it
# on first use (seconds), which moved the timing of tests/test_crash_safety.py. Install them
# (`uv pip install torchao==0.18.0 bitsandbytes==0.50.2 optimum-quanto==0.2.7`) to run these.
LIBRARIES = ("torchao", "bitsandbytes", "optimum.quanto")
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m.split(".")[0]) is None for m in LIBRARIES),
    reason="torchao, bitsandbytes and optimum-quanto are not installed (see the module's comment)",
)

CODE = r"""
import sys, tempfile, warnings
import torch
import tensorstream as ts
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

warnings.simplefilter("ignore")
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()

def torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    m = llama(); quantize_(m, Int8WeightOnlyConfig()); return m

def torchao_int8_dynamic():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    m = llama(); quantize_(m, Int8DynamicActivationInt8WeightConfig()); return m

def quanto_qint8():
    from optimum.quanto import freeze, qint8, quantize
    m = llama(); quantize(m, weights=qint8); freeze(m); return m

def bnb_nf4():
    d = tempfile.mkdtemp(); llama().save_pretrained(d)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    return LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")

ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
for make in (torchao_int8, torchao_int8_dynamic, quanto_qint8, bnb_nf4):
    model = make()
    with torch.no_grad():
        model(ids)  # the quantized model runs in memory
    try:
        ts.offload(model, ts.Config(tempfile.mkdtemp(), vram_budget_gb=0.001, backend="pread"))
        print(make.__name__, "ACCEPTED")
    except ts.TensorStreamError as e:
        print(make.__name__, "REFUSED", str(e).split(":")[0], "|", str(e))
"""


def test_quantized_models_are_refused_naming_the_parameter_never_a_crash():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (a negative one is a signal):\n{proc.stderr[-3000:]}"
    )
    lines = {
        line.split()[0]: line
        for line in proc.stdout.splitlines()
        if " REFUSED " in line or " ACCEPTED" in line
    }
    types = {
        "torchao_int8": "torchao",
        "torchao_int8_dynamic": "torchao",
        "quanto_qint8": "optimum.quanto",
        "bnb_nf4": "bitsandbytes",
    }
    for name, library in types.items():
        line = lines.get(name, f"{name}: no result")
        assert " REFUSED model.layers.0.self_attn.q_proj.weight |" in line, line
        assert library in line and "tensor subclass" in line, line


CHECKPOINTS = r"""
import sys, tempfile, warnings
import torch
import tensorstream as ts
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, TorchAoConfig

warnings.simplefilter("ignore")
cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(0)
plain = tempfile.mkdtemp()
LlamaForCausalLM(cfg).save_pretrained(plain)

def torchao_int8():
    from torchao.quantization import Int8WeightOnlyConfig
    return TorchAoConfig(Int8WeightOnlyConfig()), False

for name, (q, safe) in {
    "bnb_nf4": (BitsAndBytesConfig(load_in_4bit=True), True),
    "bnb_int8": (BitsAndBytesConfig(load_in_8bit=True), True),
    "torchao_int8": torchao_int8(),
}.items():
    quantized = tempfile.mkdtemp()
    LlamaForCausalLM.from_pretrained(plain, quantization_config=q, device_map="cpu").save_pretrained(
        quantized, safe_serialization=safe)
    try:
        ts.from_pretrained(quantized, ts.Config(tempfile.mkdtemp(), vram_budget_gb=0.001))
        print(name, "LOADED")
    except ts.TensorStreamError as e:
        print(name, "REFUSED", type(e).__name__, str(e))
"""


def test_quantized_checkpoints_are_refused_by_from_pretrained():
    """A checkpoint saved quantized (bitsandbytes NF4 and int8, torchao int8) is refused up
    front naming its quantizer. Before, the int8 one loaded: its packed weights were
    converted into a store of the unquantized architecture (not the quantized model)."""
    proc = subprocess.run([sys.executable, "-c", CHECKPOINTS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {
        line.split()[0]: line for line in proc.stdout.splitlines() if " REFUSED " in line or " LOADED" in line
    }
    for name, method in (
        ("bnb_nf4", "bitsandbytes"),
        ("bnb_int8", "bitsandbytes"),
        ("torchao_int8", "torchao"),
    ):
        line = lines.get(name, f"{name}: no result")
        assert " REFUSED " in line and "quantized checkpoint" in line and method in line, line
