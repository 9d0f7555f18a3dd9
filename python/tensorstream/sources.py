"""Where units' bytes come from: a TensorStream store, or a safetensors checkpoint read in
place. Both give the runtime one read layout per unit (through the Rust core)."""

from __future__ import annotations

import os

from . import _core


class StoreSource:
    """A TensorStream store: aligned, checksummed units; zero-copy mapping allowed on CPU,
    unless the store holds compressed units (they are decoded into buffers)."""

    kind = "store"

    def __init__(self, store: _core.Store):
        self.store = store
        self.path = store.path
        self.files = [store.path]
        self.file_len = store.file_len
        self.unit_offsets = {name: off for (name, off, *_rest) in store.units()}
        self.raw_bytes = store.raw_bytes
        self.stored_bytes = store.stored_bytes
        self.compressed = store.coded_units > 0

    @property
    def zero_copy(self) -> bool:
        """Whether the parameters can be views of the mapped store: not when units are coded."""
        return not self.compressed

    @property
    def compression_ratio(self) -> float:
        """Raw bytes of the units over the bytes they take on disk (1.0: uncompressed)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def layouts(self, units: list) -> list:
        out = []
        for u in units:
            i = self.store.unit_index(u.name)
            if i is None:
                from .errors import StoreMismatchError

                raise StoreMismatchError(
                    f"store {self.path} has no unit {u.name!r}; it was written for another model"
                )
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
