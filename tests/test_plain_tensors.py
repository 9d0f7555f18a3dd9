"""Nothing unchecked crosses into the Rust core: a tensor that is not plain and dense is
streamed as its plain values or refused with a TensorStreamError naming it, and a binding
called with a pointer or length that cannot be valid raises. Each case runs in a subprocess,
so that a crash (SIGSEGV, SIGABRT) fails the test instead of ending the run.

Without the gate (``plain.why_not_streamable`` returning None, ``plain.plain_cpu`` skipping
``resolve_neg``, the bindings' span checks removed) the refusals below crashed the
interpreter or raised raw errors, the negative-bit view was stored un-negated, and a
non-contiguous or expanded weight streamed as a contiguous copy whose results differed from
the model in memory in the last bits (its matmul takes another path)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

PRELUDE = """
import sys, torch
from torch import nn
import tensorstream as ts

torch.manual_seed(0)

def offload(model, tmp, **kw):
    return ts.offload(model, ts.Config(tmp, vram_budget_gb=1e-6 * 4, **kw))

def refused(model, tmp, *words):
    try:
        offload(model, tmp)
    except ts.TensorStreamError as e:
        msg = str(e)
        missing = [w for w in words if w not in msg]
        print("REFUSED" if not missing else f"MESSAGE LACKS {missing}: {msg}")
    else:
        print("ACCEPTED")

def same(make, tmp):
    ref = make()
    torch.manual_seed(0)
    model = make()
    om = ts.offload(model, ts.Config(tmp, vram_budget_gb=1e-6 * 4))
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(x), om(x)
    streamed = ts.get_model_statistics(om)["bytes_read"] > 0
    print("EQUAL" if torch.equal(want, got) and streamed else f"DIFFERENT streamed={streamed}")
"""


def run(body: str, tmp_path) -> str:
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (a negative one is a signal):\n{proc.stderr[-3000:]}"
    )
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


REFUSED = {
    "parameter subclass with __torch_function__": """
        class Scaled(nn.Parameter):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                out = super().__torch_function__(func, types, args, kwargs or {})
                return out * 2 if func is torch.nn.functional.linear else out
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[0].weight = Scaled(m[0].weight.detach())
        refused(m, sys.argv[1], "0.weight", "Scaled", "tensor subclass")
    """,
    "parameter subclass with __slots__": """
        class Slotted(nn.Parameter):
            __slots__ = ("tag",)
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[1].weight = Slotted(m[1].weight.detach())
        refused(m, sys.argv[1], "1.weight", "Slotted")
    """,
    "wrapper subclass": """
        class Wrapper(torch.Tensor):
            @staticmethod
            def __new__(cls, inner):
                return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)
            def __init__(self, inner):
                self.inner = inner
            @classmethod
            def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
                unwrap = lambda a: a.inner if isinstance(a, Wrapper) else a
                return func(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in (kwargs or {}).items()})
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[0]._parameters["weight"] = Wrapper(torch.randn(8, 8))
        refused(m, sys.argv[1], "0.weight", "Wrapper")
    """,
    "uninitialised lazy module": """
        m = nn.Sequential(nn.LazyLinear(8), nn.Linear(8, 8))
        refused(m, sys.argv[1], "not initialised")
    """,
    "meta parameters": """
        m = nn.Sequential(nn.Linear(8, 8, device="meta"), nn.Linear(8, 8, device="meta"))
        refused(m, sys.argv[1], "meta")
    """,
    "sparse CSR parameter": """
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[0].weight = nn.Parameter(m[0].weight.detach().to_sparse_csr(), requires_grad=False)
        refused(m, sys.argv[1], "0.weight", "layout")
    """,
    "non-contiguous view": """
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[1].weight = nn.Parameter(m[1].weight.detach().t(), requires_grad=False)
        refused(m, sys.argv[1], "1.weight", "contiguous")
    """,
    "overlapping (expanded) view": """
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[0].weight = nn.Parameter(torch.randn(1, 8).expand(8, 8), requires_grad=False)
        refused(m, sys.argv[1], "0.weight", "contiguous")
    """,
    "mkldnn parameter": """
        m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        m[0].weight = nn.Parameter(m[0].weight.detach().to_mkldnn(), requires_grad=False)
        refused(m, sys.argv[1], "0.weight", "layout")
    """,
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_tensor_that_is_not_plain_is_refused_naming_it(case, tmp_path):
    assert run(REFUSED[case], tmp_path) == "REFUSED"


STREAMED = {
    "negative-bit view": """
        def make():
            m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            m[0].weight = nn.Parameter(torch._neg_view(m[0].weight.detach()), requires_grad=False)
            assert m[0].weight.is_neg()
            return m.requires_grad_(False)
        same(make, sys.argv[1])
    """,
    "zero-size parameter": """
        def make():
            m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
            m[0].register_parameter("empty", nn.Parameter(torch.empty(0, 8)))
            return m.requires_grad_(False)
        same(make, sys.argv[1])
    """,
}


@pytest.mark.parametrize("case", sorted(STREAMED))
def test_a_view_streams_as_its_values(case, tmp_path):
    assert run(STREAMED[case], tmp_path) == "EQUAL"


def test_bindings_refuse_spans_that_cannot_be_memory(tmp_path):
    body = """
        from tensorstream import _core
        out = []
        for call in (
            lambda: _core.checksum(0, 16),
            lambda: _core.checksum(1 << 63, 1 << 63),
            lambda: _core.codec_decode("tb4", bytes(24), 1 << 40),
        ):
            try:
                call()
                out.append("returned")
            except (ValueError, ts.TensorStreamError):
                out.append("raised")
        print(",".join(out))
    """
    assert run(body, tmp_path) == "raised,raised,raised"


def test_a_module_that_replaces_its_weight_while_bound_is_refused_naming_it(tmp_path):
    """bitsandbytes repacks a 4-bit weight on its first CPU forward by replacing
    ``weight.data``; streamed, the next load would bind the store's bytes again while the
    module believes them repacked (wrong tokens, silently). A weight whose data was replaced
    during its unit's forward is refused instead (without the data-pointer check in
    ``Placement.check_unwritten`` this forward returned and the next one differed)."""
    import torch
    from torch import nn

    import tensorstream as ts

    class Repacking(nn.Linear):
        def forward(self, x):
            if not getattr(self, "packed", False):
                self.weight.data = self.weight.data.flip(0)  # a new layout, in new memory
                self.packed = True
            w = self.weight.flip(0)
            return nn.functional.linear(x, w, self.bias)

    torch.manual_seed(0)
    model = nn.Sequential(Repacking(8, 8), nn.Linear(8, 8), Repacking(8, 8)).requires_grad_(False)
    om = ts.offload(model, ts.Config(tmp_path / "store", vram_budget_gb=3 * 8192 / 2**30))
    with (
        torch.no_grad(),
        pytest.raises(ts.TensorStreamError, match=r"0\.weight: the module replaced this weight's data"),
    ):
        om(torch.randn(2, 8))
