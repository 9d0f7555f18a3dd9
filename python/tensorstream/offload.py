"""`offload()`: analyse the model, write or reuse its store, free the units and install
the streaming runtime."""

from __future__ import annotations

import fcntl
import glob
import logging
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from . import _core
from .budget import streamed_subset
from .config import BackendType, Config
from .dispatched import Dispatch, check_devices
from .errors import (
    ConfigError,
    InvalidArgumentError,
    StoreCorruptedError,
    StoreMismatchError,
    TensorStreamError,
)
from .module import install
from .placement import slot_sizes
from .runtime import Runtime
from .sources import StoreSource, has_digests
from .speculative import attach_draft, check_draft, detach_draft
from .speculative.selfdraft import build_int8_draft
from .units import analyse, fingerprint, own_value, with_candidates, write_store

log = logging.getLogger("tensorstream")


def _model_device(model: nn.Module, dispatch=None) -> torch.device:
    """Where the model runs: its first parameter's device, or for a parameter accelerate
    offloaded (on the meta device), the device accelerate ran it on."""
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is None:
                continue
            if p.device.type == "meta" and dispatch is not None:
                return dispatch.execution_device(mod, attr)
            return p.device
    return torch.device("cpu")


def _clean_stale_temps(store_path: Path) -> None:
    """Remove temporary files of writers that died. A live writer holds an exclusive flock on
    its temporary file until it renames or removes it, so a temporary file whose lock can be
    taken has no writer (PIDs would not tell: another PID namespace may share the folder)."""
    for tmp in glob.glob(str(store_path.parent / f".{store_path.name}.tmp-*")):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a writer holds it
        else:
            try:
                os.unlink(tmp)  # while holding the lock
            except OSError:
                pass
        finally:
            os.close(fd)


def store_code(config: Config, device: torch.device) -> str:
    """The code a compressed store is written with: "table" (decoded on the GPU, so the
    link carries coded bytes) when it is for a GPU, the model already on CUDA or the backend
    asked being "cuda" or "gpudirect"; else "bytegroup" (smaller, decoded on the CPU)."""
    gpu = device.type == "cuda" or config.backend in (BackendType.CUDA, BackendType.GPUDIRECT)
    return "table" if gpu else "bytegroup"


def open_or_write_store(model: nn.Module, units: list, config: Config, value=own_value) -> StoreSource:
    """Reuse the store under `config.storage_path` if it was written for this model, else
    write it. A store written for another model is refused unless `overwrite_store`. A
    store of this model whose compression (code or level) differs from the config's is
    rewritten. `value` gives a parameter's value (:func:`units.fingerprint`)."""
    root = Path(config.storage_path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"Config.storage_path={str(root)!r} cannot be used as a directory for stores: {e}"
        ) from None
    name = config.store_name or f"{type(model).__name__}.tstore"
    path = root / name
    _clean_stale_temps(path)
    fp = fingerprint(model, units, value)
    level = config.compression_level if config.compression_enabled else None
    code = store_code(config, _model_device(model))
    if path.exists():
        try:
            store = _core.Store(str(path), fp)
            # The fingerprint is of the raw weights: a store of the same model written with
            # another compression matches it, and is rewritten as the config asks.
            meta = store.metadata
            compressed = meta.get("compression", "none") != "none"
            on_disk = int(meta.get("compression_level", 0)) if compressed else None
            if not has_digests(store):
                log.info("rewriting store %s: written before tensor digests, it cannot be checked", path)
            elif on_disk == level and (level is None or meta.get("compression") == code):
                source = StoreSource(store)  # checks the manifest against the fingerprint
                log.info("reusing store %s", path)
                return source
            else:
                log.info(
                    "rewriting store %s: it is %s, the config asks for %s",
                    path,
                    "raw"
                    if on_disk is None
                    else f"compressed ({meta.get('compression')}) at level {on_disk}",
                    "no compression" if level is None else f"compression ({code}) at level {level}",
                )
        except StoreMismatchError as e:
            if not config.overwrite_store:
                e.args = (
                    f"{(e.args[0] if e.args else str(e)).rstrip('.')}. A storage_path holds one store per model class: give this "
                    "model its own (another storage_path, or Config(store_name=...)), or replace the store "
                    "with Config(overwrite_store=True)",
                )
                raise
            log.warning("overwriting store %s, which was written for another model", path)
        except StoreCorruptedError as e:
            if not config.overwrite_store:
                e.args = (
                    f"{(e.args[0] if e.args else str(e)).rstrip('.')}. Delete {path} or set Config(overwrite_store=True) to rebuild it",
                )
                raise
            log.warning("rebuilding store %s, which is damaged: %s", path, e)
    write_store(
        str(path), fp, model, units, progress=config.progress, compression_level=level, code=code, value=value
    )
    return StoreSource(_core.Store(str(path), fp))


def offload(model: nn.Module, config: Config, draft: Union[nn.Module, str, None] = None) -> nn.Module:
    """Stream `model`'s blocks from disk within `config.vram_budget_gb`.

    Offloads in place and returns the same model. Its outputs stay bit-identical; the
    blocks' weights live in a store under `config.storage_path` and are made resident just
    before each block runs. Call ``model.to(device)`` afterwards to run on another device.

    `draft`: a small model with the same tokenizer for speculative decoding. It stays
    resident where the model runs (it moves with it) and counts in the budget; ``generate()``
    is then assisted by it (unless the call names its own ``assistant_model``), with the
    drafting knobs chosen for a streamed model. Greedy tokens are those of plain generation;
    sampled ones those of the same assisted call on the un-offloaded model.

    ``draft="int8"`` builds the draft from the model itself (:func:`tensorstream.speculative.selfdraft.build_int8_draft`):
    its linear layers with int8 weights, its other tensors the model's own where the model
    keeps them resident (counted once in the budget) and copies of the ones it streams.
    """
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"offload() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, Config):
        raise InvalidArgumentError(f"offload() needs a tensorstream.Config, got {type(config).__name__}")
    if getattr(model, "_tensorstream", None) is not None:
        raise TensorStreamError("this model is already offloaded; offload() it once")
    if draft is not None:
        check_draft(draft, model)
    # A model accelerate dispatched: its offloaded weights are read from accelerate's weights
    # map one at a time, its hooks removed (and put back if the offload is refused).
    dispatch = Dispatch(model)
    if isinstance(draft, str) and dispatch.lazy:
        raise InvalidArgumentError(
            f"offload(draft={draft!r}) builds the draft from the model's weights, and accelerate offloaded some of "
            "them: load the model without a device_map, or give a draft model"
        )
    dispatch.remove_hooks()
    shared: list = []
    try:
        units = analyse(model, config.units)
        if not units:
            raise InvalidArgumentError(
                f"found no streamable units in {type(model).__name__}: no ModuleList or Sequential with two or "
                "more blocks holding parameters; name them with Config(units=[...])"
            )
        all_units = with_candidates(model, units)
        source = open_or_write_store(model, all_units, config, dispatch.value)
        if isinstance(draft, str):
            draft = build_int8_draft(model)  # while the weights are real: install() frees them
        if draft is not None:
            attach_draft(model, draft)  # not a submodule: not in the model's state_dict
        device = _model_device(model, dispatch)
        units = streamed_subset(
            model, units, all_units[len(units) :], unit_sizes(all_units, source), config, device
        )
        dispatch.settle({id(p.get()) for u in units for p in u.params})
        if dispatch.active:
            check_devices(model)
        if draft is not None:
            shared = _own_copies(draft, units)
        install(model, Runtime(model, units, source, config, device))
    except BaseException:
        detach_draft(model)  # a refused model is left as it was
        for module, name, t in shared:
            module._parameters[name] = t
        dispatch.restore()
        raise
    return model


def _own_copies(draft: nn.Module, units: list) -> list:
    """Give the draft its own copy of each parameter it shares with the model that `units`
    stream (install() turns those into placeholders); the budget already counts the copies
    (``budget.kept_beside``). Returns (module, name, the shared parameter) for each one
    replaced, to put back if the offload is refused."""
    streamed = {id(p.get()) for u in units for p in u.params}
    copies: dict = {}
    replaced = []
    for mod in draft.modules():
        for name, t in list(mod._parameters.items()):
            if t is None or id(t) not in streamed:
                continue
            if id(t) not in copies:  # a parameter tied within the draft stays tied
                copies[id(t)] = nn.Parameter(t.detach().clone(), t.requires_grad)
            mod._parameters[name] = copies[id(t)]
            replaced.append((mod, name, t))
    return replaced


def unit_sizes(units: list, source) -> dict:
    """Unit name -> buffer bytes, for these units read from `source`."""
    return dict(zip((u.name for u in units), slot_sizes(units, source.layouts(units), source.path)))


def runtime_of(model: nn.Module) -> Runtime:
    rt = getattr(model, "_tensorstream", None)
    if rt is None:
        raise InvalidArgumentError(
            f"{type(model).__name__} is not offloaded; call tensorstream.offload(model, config) first"
        )
    return rt
