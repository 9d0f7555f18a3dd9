"""A forward in grad mode (no torch.no_grad()) of an offloaded model computes as the model
in memory does: the same logits (torch.equal), the same ``requires_grad`` of the outputs, and
gradients that reach no streamed weight are the reference's. What is refused, at
``backward()``, is a gradient flowing into a streamed weight (test_module_contract.py,
test_training_streamed_weights_is_refused_at_backward)."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS, budget_gb, input_ids, tiny_llama
from test_module_contract import BUILDERS

import tensorstream as ts
from tensorstream.errors import TensorStreamError


def _streamed(model) -> list:
    return [t for objs in model._tensorstream.placement.objects for t in objs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_plain_forward_of_from_pretrained_needs_no_no_grad(tmp_path, backend):
    """transformers gives parameters that require grad: ``model(ids)`` outside generate()."""
    ref, model = BUILDERS["from_pretrained"](tmp_path, backend)
    assert all(t.requires_grad for t in _streamed(model)), "as transformers gives them"
    ids = input_ids()
    for _ in range(2):
        got, want = model(ids).logits, ref(ids).logits
        assert torch.equal(got, want)
        assert got.requires_grad == want.requires_grad and got.grad_fn is not None


@pytest.mark.parametrize("how", list(BUILDERS))
def test_a_gradient_into_the_inputs_alone_is_the_references(tmp_path, how):
    """Streamed weights that require grad are fine as long as no gradient is asked of them:
    the gradient of the logits with respect to the input embeddings (saliency)."""
    ref, model = BUILDERS[how](tmp_path, "pread")
    ids = input_ids()
    grads = []
    for m in (ref, model):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        out = m(inputs_embeds=emb).logits
        (g,) = torch.autograd.grad(out[0, -1].max(), emb)
        grads.append((out.detach(), g))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert all(t.grad is None for t in _streamed(model))


def test_resident_weights_train_beside_frozen_streamed_ones(tmp_path):
    """Streamed weights frozen, the resident ones (embeddings, final norm, head) trainable:
    their gradients and an optimizer step are the reference's."""
    ref = tiny_llama(tied=False, seed=4)
    cfg = ts.Config(tmp_path / "store", vram_budget_gb=budget_gb(ref, 2.5), backend="pread")
    model = ts.offload(tiny_llama(tied=False, seed=4), cfg)
    streamed = {id(t) for t in _streamed(model)}
    names = {n for n, p in model.named_parameters() if id(p) in streamed}
    assert names, "some weights stream"
    ids = input_ids(length=12)
    grads, logits = [], []
    for m in (ref, model):
        for n, p in m.named_parameters():
            p.requires_grad_(n not in names)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
        opt.step()
        with torch.no_grad():
            logits.append(m(ids).logits)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
    assert torch.equal(logits[0], logits[1])


def test_a_weight_made_trainable_after_a_pass_is_refused_at_backward(tmp_path):
    """The refusal follows requires_grad as it is at the forward, not at offload()."""
    ref = tiny_llama(tied=False, seed=4)
    cfg = ts.Config(tmp_path / "store", vram_budget_gb=budget_gb(ref, 2.5), backend="pread")
    model = ts.offload(tiny_llama(tied=False, seed=4), cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = input_ids()
    model(ids).logits.sum()  # frozen: no gradient to refuse, nothing to backward
    w = model.model.layers[1].mlp.up_proj.weight
    assert id(w) in {id(t) for t in _streamed(model)}
    w.requires_grad_(True)
    out = model(ids).logits
    with pytest.raises(TensorStreamError, match=r"layers\.1.*read-only.*requires_grad_\(False\)"):
        out.sum().backward()
    assert w.grad is None
    w.requires_grad_(False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
