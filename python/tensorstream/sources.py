"""Where units' bytes come from: a TensorStream store, or a safetensors checkpoint read in
place. Both give the runtime one read layout per unit (through the Rust core), and hold the
files they validated open for the source's life."""

from __future__ import annotations

import os
from typing import Optional

from . import _core
from .errors import StoreCorruptedError, StoreMismatchError


class _OpenFiles:
    """Descriptors of a source's files, opened once and closed with the source, and what
    each file was when opened (size, modification time)."""

    def __init__(self, paths: list):
        self.fds = {p: os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths}
        self.seen = {p: self._state(fd) for p, fd in self.fds.items()}

    @staticmethod
    def _state(fd: int) -> tuple:
        st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        """Raise StoreCorruptedError if a file was written or truncated since it was opened
        (a mapped file read after truncation kills the process with SIGBUS; bytes changed in
        place would be read silently). Replacing or deleting the path is fine: the open
        file stays as it was."""
        for path, fd in self.fds.items():
            now = self._state(fd)
            if now != self.seen[path]:
                (size0, _), (size1, _) = self.seen[path], now
                what = (
                    f"truncated or grown from {size0} to {size1} bytes"
                    if size1 != size0
                    else "written in place"
                )
                raise StoreCorruptedError(
                    f"{path} was {what} while a model streamed from it: its bytes are no longer the ones "
                    "that were checked. Offload the model again (or load it again with from_pretrained)."
                )

    def __del__(self):
        for fd in getattr(self, "fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def has_digests(store: _core.Store) -> bool:
    """Whether the store records tensor digests (written since store minor version 1)."""
    return all(t.digest is not None for i in range(len(store.units())) for t in store.layout(i).tensors)


def check_manifest(store: _core.Store, fingerprint: str, model_class: str) -> None:
    """Raise StoreMismatchError unless the fingerprint recomputed from the manifest's own
    content (names, dtypes, shapes, tensor digests) is `fingerprint`: a manifest edited with a
    recomputed checksum is refused. The engine verifies the digests against the bytes."""
    recomputed = store.manifest_fingerprint(model_class)
    if recomputed != fingerprint:
        raise StoreMismatchError(
            f"store {store.path}: its manifest describes other tensors than the model's (fingerprint "
            f"{recomputed} recomputed from the manifest, {fingerprint} expected); it was edited or written "
            "for another model. Delete it and convert or offload again."
        )


class StoreSource:
    """A TensorStream store: aligned, checksummed units; zero-copy mapping allowed on CPU,
    unless the store holds compressed units (they are decoded into buffers)."""

    kind = "store"
    checksummed = True

    def __init__(self, store: _core.Store):
        self.store = store
        self.path = store.path
        self.files = [store.path]
        self.file_len = store.file_len
        self.unit_offsets = {u.name: u.offset for u in store.units()}
        self.raw_bytes = store.raw_bytes
        self.stored_bytes = store.stored_bytes
        self.compressed = store.coded_units > 0
        if has_digests(store):
            check_manifest(store, store.fingerprint, store.metadata.get("model_class", ""))
        self.files_open = _OpenFiles(self.files)
        self.fds = self.files_open.fds
        self.fd = self.fds[self.path]

    @property
    def mappable(self) -> bool:
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
                raise StoreMismatchError(
                    f"store {self.path} has no unit {u.name!r}; it was written for another model"
                )
            out.append(self.store.layout(i))
        return out

    def span(self, unit: str, part) -> Optional[tuple]:
        """(fd, file offset) of a stored tensor's raw bytes, or None where they are coded."""
        if self.compressed:
            return None
        return self.fd, self.unit_offsets[unit] + part.offset


class CheckpointSource:
    """A safetensors checkpoint (single file or sharded index), streamed where it lies.
    Unaligned offsets are widened to 4 KiB bounds by the core; no checksums."""

    kind = "safetensors"
    mappable = False
    checksummed = False

    def __init__(self, path: str):
        self.view = _core.SafetensorsView(path)
        self.path = path
        self.files = self.view.files()
        self.file_len = sum(os.path.getsize(f) for f in self.files)
        self.tensors = self.view.tensors()
        self.files_open = _OpenFiles(self.files)
        self.fds = self.files_open.fds

    def layouts(self, units: list) -> list:
        return [self.view.layout(u.name, [n for p in u.params for n in p.source_names]) for u in units]

    def span(self, unit: str, part) -> Optional[tuple]:
        """(fd, file offset) of a stored tensor's bytes."""
        t = self.tensors[part.name]
        return self.fds[t.file], t.offset
