"""A Hugging Face checkpoint's tensors by name, whatever its format: where it is (a local
directory or the local Hugging Face cache, never downloaded) and how its tensors are read."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from .consts import TORCH_TO_ST
from .errors import InvalidArgumentError
from .sources import CheckpointSource


def resolve_checkpoint(name_or_path: str) -> str:
    """A local directory, or a hub id found in the local Hugging Face cache. Never downloads."""
    if os.path.isdir(name_or_path) or os.path.isfile(name_or_path):
        return str(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(str(name_or_path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise InvalidArgumentError(
            f"{name_or_path!r} is not a local path, and it is not in the local Hugging Face cache "
            f"({type(e).__name__}). TensorStream never downloads: fetch the checkpoint first "
            "(for example with `huggingface-cli download`) or pass a local directory."
        ) from None


class _Entry(NamedTuple):
    dtype: str
    shape: list
    file: str
    nbytes: int


class Checkpoint:
    """A checkpoint's tensors by name, whatever its format: safetensors files, which can
    stream where they lie (`source`), or PyTorch pickles (``pytorch_model.bin``, sharded or
    not), read mapped and weights-only, one file at a time, to be converted."""

    def __init__(self, path: str):
        self.path = path
        bins = _bin_files(path)
        self.source = CheckpointSource(path) if bins is None else None
        self.files = self.source.files if self.source else bins
        self.tensors = self.source.tensors if self.source else {}
        for f in bins or []:
            for name, t in _load_bin(f).items():
                self.tensors[name] = _Entry(
                    TORCH_TO_ST[t.dtype], list(t.shape), f, t.numel() * t.element_size()
                )
        self._open: tuple = (None, None)

    def get(self, name: str) -> torch.Tensor:
        """One tensor; the file it is in stays open until a tensor of another file is read."""
        file = self.tensors[name].file
        if self._open[0] != file:
            self._open = (None, None)
            if self.source:
                from safetensors import safe_open

                self._open = (file, safe_open(file, framework="pt"))
            else:
                self._open = (file, _load_bin(file))
        handle = self._open[1]
        return handle.get_tensor(name) if self.source else handle[name]

    def close(self) -> None:
        self._open = (None, None)


def _bin_files(path: str) -> Optional[list]:
    """The PyTorch pickle files of a checkpoint directory that has no safetensors files, or
    None where it has them."""
    p = Path(path)
    if not p.is_dir() or (p / "model.safetensors").exists() or (p / "model.safetensors.index.json").exists():
        return None
    index = p / "pytorch_model.bin.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [str(p / f) for f in dict.fromkeys(weight_map.values())]
    if (p / "pytorch_model.bin").exists():
        return [str(p / "pytorch_model.bin")]
    raise InvalidArgumentError(
        f"{path} holds no weights that TensorStream reads: no model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _load_bin(file: str) -> dict:
    # Mapped: the file's pages are read when a tensor is used, so a shard is never all in RAM.
    try:
        return torch.load(file, mmap=True, weights_only=True, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError) as e:
        raise InvalidArgumentError(
            f"{file} cannot be read mapped and weights-only ({str(e).splitlines()[0]}): TensorStream reads "
            "PyTorch checkpoints saved by torch.save since torch 1.6, holding only tensors. Load it with "
            "transformers and save it again with save_pretrained (safetensors)."
        ) from None
