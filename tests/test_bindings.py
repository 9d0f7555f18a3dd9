"""The type stub python/tensorstream/_core.pyi names exactly what the bindings define: every
class, function and record, and every method and property of each class."""

from __future__ import annotations

import ast
from pathlib import Path

from tensorstream import _core

STUB = Path(_core.__file__).with_name("_core.pyi")


def _stub() -> dict:
    """name -> set of member names (None for functions and constants)."""
    out: dict = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef):
            members = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
            members |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)}
            out[node.name] = members - {"__init__"}
        elif isinstance(node, ast.FunctionDef):
            out[node.name] = None
        elif isinstance(node, ast.AnnAssign):
            out[node.target.id] = None
    return out


def test_stub_matches_the_bindings():
    stub = _stub()
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert set(stub) == public
    for name, members in stub.items():
        if members is None:
            continue
        obj = getattr(_core, name)
        actual = {m for m in vars(obj) if not m.startswith("_")}
        if issubclass(obj, tuple):  # a record: its fields
            actual = set(obj._fields)
        assert members == actual, f"{name}: stub {sorted(members ^ actual)} differ"


def test_records_unpack_like_tuples_and_read_like_records():
    p = _core.Planner([10, 10], 20, "next_layer", "balanced")
    p.begin_pass()
    a = p.access(0)
    hit, prefetched, load, evict, prefetch, pressure = a
    assert (a.hit, a.load, a.prefetch) == (hit, load, prefetch) == (False, True, [1])
