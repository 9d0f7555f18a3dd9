"""The module contract on the CUDA transfer path (see test_module_contract.py and
test_interrupts.py for the CPU paths): state_dict() gives the real weights, an interrupt at
every line of the hook and transfer code leaves the model consistent, and a frozen streamed
base with LoRA adapters trains with the reference's gradients. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from conftest import budget_gb, small_llama_bf16
from test_interrupts import PKG, TRACED, Injector, _accounting

import tensorstream as ts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _pair(tmp_path, k: float = 3):
    ref = small_llama_bf16(seed=0).cuda()
    model = small_llama_bf16(seed=0)
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=budget_gb(model, k), host_cache_gb=0)).to(
        "cuda"
    )
    return ref, model


def _ids():
    return torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(5)).cuda()


def test_cuda_state_dict_is_the_real_weights(tmp_path):
    ref, model = _pair(tmp_path)
    with torch.no_grad():
        model(_ids())
    want = ref.state_dict()
    got = model.state_dict()
    assert list(got) == list(want)
    for k, v in got.items():
        assert torch.equal(v.cpu(), want[k].cpu()), k


def test_cuda_interrupt_at_every_line_leaves_the_model_consistent(tmp_path):
    ref, model = _pair(tmp_path)
    ids = _ids()
    traced = TRACED | {str(PKG / "transfer/cuda.py")}
    with torch.no_grad():
        expected = ref(ids).logits
        for _ in range(2):
            assert torch.equal(model(ids).logits, expected)
        before = _accounting(model)
        with Injector(files=traced) as rec:
            assert torch.equal(model(ids).logits, expected)
        for line in rec.lines:
            try:
                with Injector(line, files=traced):
                    model(ids)
            except KeyboardInterrupt:
                pass
            assert torch.equal(model(ids).logits, expected), f"after an interrupt at {line}"
            assert _accounting(model) == before, f"after an interrupt at {line}"


def test_cuda_lora_on_a_frozen_streamed_base_trains_like_the_reference(tmp_path):
    peft = pytest.importorskip("peft")  # the device machine may not have it
    ref, model = _pair(tmp_path)
    for p in ref.parameters():
        p.requires_grad_(False)
    grads = []
    for m in (ref, model):
        torch.manual_seed(5)
        m = peft.get_peft_model(
            m, peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
        )
        ids = _ids()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
