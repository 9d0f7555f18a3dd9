"""An offloaded model copied, pickled or forked: what happens to its runtime.

- ``copy.deepcopy(model)``: the copy's runtime shares the source (read-only) and gets its
  own engines and buffers, built when the copy is first used (:func:`deep_copy`, finished by
  :func:`resolve`).
- Pickling raises (:func:`refuse_pickle`): the streamed weights live in the store.
- ``fork()``: the I/O workers do not exist in the child; the parent's engines and reads are
  kept alive forever and the child starts afresh (:func:`after_fork_in_child`, called for
  every live runtime by :mod:`.registry`).
"""

from __future__ import annotations

import copy
import threading

from .errors import TensorStreamError
from .units import ParamRef, UnitSpec

_FORK_LEFTOVERS: list = []  # engines and tickets of the parent: never dropped in a child


def deep_copy(rt, memo: dict):
    """A copy of runtime `rt` for a deep copy of its model, not yet resolved."""
    new = type(rt).__new__(type(rt))
    memo[id(rt)] = new
    rt.resolve()
    names = {id(m): n for n, m in rt.model.named_modules(remove_duplicate=False)}
    spec = [
        (u.name, [names[id(m)] for m in u.modules], [(names[id(p.module)], p) for p in u.params])
        for u in rt.units
    ]
    new.__dict__.update(
        lock=threading.RLock(),
        _depth=0,
        _pending=(copy.deepcopy(rt.model, memo), spec, rt.source, copy.deepcopy(rt.config, memo), rt.device),
    )
    return new


def resolve(rt) -> None:
    """Finish a deep copy: find the copied model's units and parameters (a no-op otherwise)."""
    pending = rt.__dict__.get("_pending")
    if pending is None:
        return
    model, spec, source, config, device = pending
    mods = dict(model.named_modules(remove_duplicate=False))
    units = []
    for idx, (name, paths, params) in enumerate(spec):
        refs = [ParamRef(mods[mp], p.attr, p.store_name, p.dtype, p.shape, p.recipe) for mp, p in params]
        units.append(UnitSpec(index=idx, name=name, modules=[mods[m] for m in paths], params=refs))
    type(rt).__init__(rt, model, units, source, config, device)
    rt.placement.adopt(rt)
    rt.placement.unbind_all(device)


def refuse_pickle(rt) -> TensorStreamError:
    return TensorStreamError(
        "an offloaded model cannot be pickled: its streamed weights live in the store "
        f"{rt.source.path}, not in the model. Save it with model.save_pretrained(DIR) or "
        "torch.save(model.state_dict(), FILE) (both read the real weights), or copy it with copy.deepcopy."
    )


def after_fork_in_child(rt) -> None:
    """In a forked child: keep the parent's engines and reads alive forever (dropping them
    would wait for workers that do not exist here) and start afresh, reopening the source's
    files through /proc/self/fd."""
    rt.lock = threading.RLock()
    rt._depth = 0
    rt._in_pass = False
    if rt.transfer is not None:
        _FORK_LEFTOVERS.extend(rt.transfer.abandon())
        _FORK_LEFTOVERS.append(rt.transfer)
    if rt.sparse is not None:
        _FORK_LEFTOVERS.extend(rt.sparse.abandon())
        _FORK_LEFTOVERS.append(rt.sparse)
        rt.sparse = None
    _FORK_LEFTOVERS.extend(rt.engines.values())
    rt.engines = {}
    rt.transfer = None
    rt.planner = None
    rt.engine = None
    rt.reads.clear()
    rt.forked = True
    if rt.device.type == "cuda":
        rt.forked_cuda = True
    rt.placement.unbind_all(rt.device)
