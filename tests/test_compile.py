"""torch.compile of an offloaded model: ``torch.compile(model)``, ``model.forward =
torch.compile(model.forward)`` and ``model.compile()`` run, and give the logits of the same
compile of the model in memory (torch.equal), while the units stream.

Dynamo skips the streaming wrappers (torch.compiler.disable): the streamed model runs eagerly
inside the compiled caller. The backends here are "eager" and "aot_eager": they trace and
run the graph with the eager kernels, so the in-memory model compiled with them is exact, and
inductor's CPU code generation takes minutes on a 2-core machine. Under inductor the
in-memory model runs fused kernels that round differently from the eager ones the offloaded
model runs (docs/design.md, "torch.compile").
"""

from __future__ import annotations

import pytest
import torch
from conftest import budget_gb, input_ids, tiny_llama

import tensorstream as ts

HOW = {
    "torch.compile(model)": lambda m, backend: torch.compile(m, backend=backend),
    "model.forward": lambda m, backend: _compile_forward(m, backend),
    "model.compile()": lambda m, backend: _compile_method(m, backend),
}


def _compile_forward(m, backend):
    m.forward = torch.compile(m.forward, backend=backend)
    return m


def _compile_method(m, backend):
    m.compile(backend=backend)
    return m


def _offloaded(tmp_path, ref_seed: int = 3):
    ref = tiny_llama(tied=False, seed=ref_seed)
    cfg = ts.Config(tmp_path, vram_budget_gb=budget_gb(ref, 2.5), backend="pread")
    return ref, ts.offload(tiny_llama(tied=False, seed=ref_seed), cfg)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("how", list(HOW))
def test_compiled_offloaded_model_gives_the_logits_of_the_same_compile_in_memory(tmp_path, how, backend):
    ref, model = _offloaded(tmp_path)
    ids = input_ids()
    with torch.no_grad():
        eager = ref(ids).logits
        want = HOW[how](ref, backend)(ids).logits
        compiled = HOW[how](model, backend)
        before = ts.get_model_statistics(model)["accesses"]
        for seed in (1, 2):  # a second call runs what the first compiled
            other = input_ids(seed=seed)
            assert torch.equal(compiled(other).logits, HOW[how](ref, backend)(other).logits)
        got = compiled(ids).logits
    assert torch.equal(want, eager), "the in-memory compile itself is exact with this backend"
    assert torch.equal(got, want)
    assert ts.get_model_statistics(model)["accesses"] > before, "the units streamed"


def test_compiled_offloaded_model_in_grad_mode_matches_and_generates(tmp_path):
    """The same in grad mode (parameters requiring grad, as transformers gives them), and
    generate() of a model whose forward was compiled."""
    ref, model = _offloaded(tmp_path)
    ids = input_ids()
    want = torch.compile(ref, backend="aot_eager")(ids).logits
    got = torch.compile(model, backend="aot_eager")(ids).logits
    assert torch.equal(got, want)
    assert got.requires_grad == want.requires_grad
    _compile_forward(model, "aot_eager")
    _compile_forward(ref, "aot_eager")
    with torch.no_grad():
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
