"""Where units' bytes come from: a TensorStream store, or a safetensors checkpoint read in
place. Both give the runtime one read layout per unit (through the Rust core)."""

from __future__ import annotations

import os

from . import _core


class StoreSource:
    """A TensorStream store: aligned, checksummed units; zero-copy mapping allowed on CPU."""

    kind = "store"
    zero_copy = True

    def __init__(self, store: _core.Store):
        self.store = store
        self.path = store.path
        self.files = [store.path]
        self.file_len = store.file_len
        self.unit_offsets = {name: off for (name, off, *_rest) in store.units()}

    def layouts(self, units: list) -> list:
        out = []
        for u in units:
            i = self.store.unit_index(u.name)
            if i is None:
                from .errors import StoreMismatchError

                raise StoreMismatchError(f"store {self.path} has no unit {u.name!r}; it was written for another model")
            out.append(self.store.layout(i))
        return out


class CheckpointSource:
    """A safetensors checkpoint (single file or sharded index), streamed where it lies.
    Unaligned offsets are widened to 4 KiB bounds by the core; no checksums."""

    kind = "safetensors"
    zero_copy = False

    def __init__(self, path: str):
        self.view = _core.SafetensorsView(path)
        self.path = path
        self.files = self.view.files()
        self.file_len = sum(os.path.getsize(f) for f in self.files)
        self.tensors = self.view.tensors()

    def layouts(self, units: list) -> list:
        return [self.view.layout(u.name, [n for p in u.params for n in p.source_names]) for u in units]
