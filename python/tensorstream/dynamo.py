"""``torch.compile`` of an offloaded model: Dynamo skips the streaming wrappers (it
graph-breaks there and runs them eagerly, ``torch.compiler.disable``, public).

Importing Dynamo takes seconds, and a model of plain torch never needs it: where Dynamo is not
imported yet, the wrappers are disabled right after something imports it (``torch.compile``
does, before it traces), through a finder on ``sys.meta_path`` that runs once."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable

import torch

DYNAMO = "torch._dynamo"
_done: list = []


def skip_in_dynamo(classes: tuple) -> None:
    """Have Dynamo skip the ``__call__`` of `classes`, now or once it is imported."""
    if _done or any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    if DYNAMO in sys.modules:
        _disable(classes)
    else:
        sys.meta_path.insert(0, _AfterImport(DYNAMO, lambda: _disable(classes)))


def _disable(classes: tuple) -> None:
    if _done:
        return
    _done.append(True)
    for cls in classes:
        cls.__call__ = torch.compiler.disable(cls.__call__)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `then` once module `name` is imported (after its code ran), then steps aside."""

    def __init__(self, name: str, then: Callable[[], None]):
        self.name = name
        self.then = then

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the other finders find the module itself
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, then = spec.loader, self.then
        run = loader.exec_module

        def exec_module(module):
            run(module)
            try:
                then()
            except Exception as e:  # noqa: BLE001 - never break the import that triggered it
                warnings.warn(
                    f"TensorStream: could not have torch.compile skip its streaming wrappers ({e})",
                    RuntimeWarning,
                    stacklevel=2,
                )

        loader.exec_module = exec_module
        return spec
