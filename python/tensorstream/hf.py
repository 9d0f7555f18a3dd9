"""Hugging Face integration: load a checkpoint without ever materialising the streamed
layers (`from_pretrained`), and convert a checkpoint into an aligned store (`convert`)."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import _core
from .budget import fits, streamed_subset
from .checkpoints import Checkpoint, resolve_checkpoint
from .config import Config
from .consts import TORCH_TO_ST
from .conversion import recipes
from .errors import InvalidArgumentError, StoreCorruptedError, StoreMismatchError
from .module import install
from .offload import unit_sizes
from .plain import plain_bytes, plain_cpu
from .progress import bytes_bar
from .runtime import Runtime
from .sources import StoreSource
from .speculative import attach_draft, check_draft
from .units import analyse, with_candidates


def _skeleton(
    path: str, auto_class, dtype: Optional[torch.dtype], trust_remote_code: bool = False
) -> nn.Module:
    """The model with its parameters on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    _refuse_quantized(path, hf_config)
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    saved = _saved_class(hf_config) if auto_class is None else None
    with init_empty_weights(include_buffers=False):
        if auto_class is not None:
            model = auto_class.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
        elif saved is not None:  # the class that saved the checkpoint, built as auto classes build it
            model = saved._from_config(hf_config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(
                hf_config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied parameters are one object, so one unit streams them
    return model.eval()


def _refuse_quantized(path: str, hf_config) -> None:
    """A checkpoint saved quantized (its config names a ``quantization_config``) is refused:
    its tensors are the quantizer's packed forms, which would be streamed as plain weights of
    the unquantized architecture (converted, or refused later for their shapes), never the
    quantized model transformers loads."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    method = getattr(method, "value", method)
    raise InvalidArgumentError(
        f"{path} is a quantized checkpoint (quant_method={method!r}): TensorStream does not stream quantized "
        "checkpoints yet. Load it with transformers, or stream the unquantized checkpoint."
    )


def _saved_class(hf_config):
    """The transformers class named by the config's `architectures` (what saved it), if any."""
    import transformers

    for name in getattr(hf_config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return None


def _map_units_to_checkpoint(model, units, found: dict) -> None:
    """Point each streamed parameter at the recipe that makes it from checkpoint tensors."""
    names = {id(m): n for n, m in model.named_modules()}
    for u in units:
        for p in u.params:
            full = f"{names[id(p.module)]}.{p.attr}" if names.get(id(p.module)) else p.attr
            if full not in found:
                raise StoreMismatchError(f"checkpoint has no tensor for {full!r} (unit {u.name!r})")
            p.recipe = found[full]


def _mappable(model, candidates: list, found: dict) -> list:
    """The extra candidates whose every tensor the checkpoint holds (mapped in place); the
    others can only stay resident."""
    out = []
    for u in candidates:
        try:
            _map_units_to_checkpoint(model, [u], found)
        except StoreMismatchError:
            continue
        out.append(u)
    return out


def _load_resident(model: nn.Module, ckpt: Checkpoint, streamed: set, found: dict) -> None:
    """Materialise every parameter that is not streamed, from the checkpoint."""
    todo = []
    for mod_name, mod in model.named_modules():
        for attr, t in list(mod._parameters.items()):
            if t is None or id(t) in streamed or t.device.type != "meta":
                continue
            r = found.get(f"{mod_name}.{attr}" if mod_name else attr)
            if r is not None:
                todo.append((mod, attr, r, t))
    # Read file by file: each file is opened once.
    names = sorted({n for *_, r, _ in todo for n in r.sources}, key=lambda n: ckpt.tensors[n].file)
    loaded = {n: ckpt.get(n) for n in names}
    ckpt.close()
    for mod, attr, r, t in todo:
        value = r.value([loaded[n] for n in r.sources]).to(t.dtype)
        mod._parameters[attr] = nn.Parameter(value, value.is_floating_point())  # as transformers loads it
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in streamed]
    if still_meta:
        raise StoreMismatchError(
            f"checkpoint {ckpt.path} lacks {len(still_meta)} tensor(s) the model needs: {still_meta[:5]}"
        )


def from_pretrained(
    name_or_path: str,
    config: Config,
    *,
    auto_class=None,
    dtype: Optional[torch.dtype] = None,
    store: Optional[str] = None,
    device: Optional[str] = None,
    trust_remote_code: bool = False,
    draft: Optional[nn.Module] = None,
) -> nn.Module:
    """Load a Hugging Face checkpoint for streaming, never materialising the streamed layers.

    The model skeleton is built on the meta device (the class named by the checkpoint's
    ``config.architectures`` unless `auto_class` is given); only the modules that are not
    streamed (embeddings, norms, head) are read into memory. Checkpoint names map to
    parameters by transformers' own loading rules. The layers are streamed from the
    checkpoint's safetensors files where they lie (sharded or not) when each streamed
    parameter is one stored tensor in the dtype asked for. Otherwise (experts stored one by
    one that transformers fuses, another dtype, any other conversion) the checkpoint is
    converted once, tensor by tensor, into a store under `config.storage_path`, reused by
    later loads of the same files, and the layers stream from it: a slot then holds only the
    converted bytes. `store` names a store made by :func:`convert` to use instead; one
    converted from other checkpoint files raises :class:`~tensorstream.errors.StoreMismatchError`.

    `draft`: a draft model for speculative decoding, as for :func:`tensorstream.offload`.
    ``draft="int8"`` is refused here: it is built from the model's layer weights, which this
    function never loads; load the model with transformers and call ``offload()``.
    """
    path = resolve_checkpoint(name_or_path)
    if isinstance(draft, str):
        raise InvalidArgumentError(
            f"from_pretrained() cannot build draft={draft!r}: it is made from the model's layer weights, which "
            "from_pretrained() never loads. Load the model with transformers and call "
            f"tensorstream.offload(model, config, draft={draft!r}), or give a draft model"
        )
    model = _skeleton(path, auto_class, dtype, trust_remote_code)
    if draft is not None:
        check_draft(draft, model)
        attach_draft(model, draft)  # not a submodule: not in the model's state_dict
    units = analyse(model, config.units)
    if not units:
        raise InvalidArgumentError(
            f"found no streamable units in {type(model).__name__}; name them with Config(units=[...])"
        )
    ckpt = Checkpoint(path)
    found = recipes(model, ckpt.tensors)
    _map_units_to_checkpoint(model, units, found)
    candidates = with_candidates(model, units)[len(units) :]
    store_path = store or _find_store(config, model, ckpt, units)
    target = torch.device(device if device is not None else "cpu")
    if not store_path and not _in_place_fits(model, units, candidates, found, ckpt, config, target):
        store_path = _convert(
            path,
            _cache_path(config, model, ckpt, units),
            config,
            auto_class,
            dtype,
            config.progress,
            exact=True,
        )
    if store:
        _check_named_store(store, ckpt, path)
    if store_path:
        source = StoreSource(_core.Store(str(store_path)))
        for u in units + candidates:  # stores name tensors relative to their unit
            for p in u.params:
                p.store_name = _relative_name(model, u, p)
                p.recipe = None
    else:
        source = ckpt.source
        candidates = _mappable(model, candidates, found)
    units = streamed_subset(model, units, candidates, unit_sizes(units + candidates, source), config, target)
    streamed = {id(p.get()) for u in units for p in u.params}
    _load_resident(model, ckpt, streamed, found)
    # Streamed parameters leave the meta device for placeholders of their final shape; a tied
    # one gets the same placeholder in every module that registers it, so it stays tied.
    # requires_grad is what transformers' loading gives (whether the dtype is floating point):
    # some kernels choose their path by it (torch's matmul folds a batched product only for an
    # operand that does not require grad), so a frozen copy would differ in the last bit.
    placeholders = {
        id(p.get()): nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), p.dtype.is_floating_point)
        for u in units
        for p in u.params
    }
    for mod in model.modules():
        for attr, t in list(mod._parameters.items()):
            if t is not None and id(t) in placeholders:
                mod._parameters[attr] = placeholders[id(t)]
    install(model, Runtime(model, units, source, config, torch.device("cpu")))
    if device is not None:
        model.to(device)  # the draft moves with it
    return model


def _relative_name(model: nn.Module, unit, p) -> str:
    """The parameter's name inside its unit, as a store records it (from the model root
    for a unit made of several modules)."""
    if len(unit.modules) > 1:
        full = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        return f"{full[id(p.module)]}.{p.attr}"
    for sub_name, sub in unit.modules[0].named_modules():
        if sub is p.module:
            return f"{sub_name}.{p.attr}" if sub_name else p.attr
    return p.attr


def _checkpoint_id(ckpt: Checkpoint) -> str:
    """Identity of a checkpoint's files: names, sizes, safetensors headers, and which file
    it is and when its content last changed (device, inode, mtime): weights saved over a
    checkpoint with the same shapes change the last, not the others."""
    h = hashlib.sha256()
    for f in ckpt.files:
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}".encode())
        if ckpt.source:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(n, 100 << 20)))
    return h.hexdigest()[:32]


def _in_place_fits(
    model, units: list, candidates: list, found: dict, ckpt: Checkpoint, config: Config, device: torch.device
) -> bool:
    """Whether the layers can stream from the checkpoint where they lie: every streamed
    parameter is one safetensors tensor as stored, in its dtype, and the budget holds the
    units read in place (whole 4 KiB pages of the file, with what lies between a unit's
    tensors) or would not hold them in a store either."""
    if ckpt.source is None or not all(
        p.recipe.converter is None
        and len(p.recipe.sources) == 1
        and ckpt.tensors[p.recipe.sources[0]].dtype == TORCH_TO_ST[p.dtype]
        for u in units
        for p in u.params
    ):
        return False
    mappable = _mappable(model, candidates, found)
    in_place = unit_sizes(units + mappable, ckpt.source)
    if fits(
        model, streamed_subset(model, units, mappable, in_place, config, device), in_place, config, device
    ):
        return True
    stored = {u.name: _core.store_unit_buffer_len([_nbytes(p) for p in u.params]) for u in units + candidates}
    chosen = streamed_subset(model, units, candidates, stored, config, device)
    return not fits(model, chosen, stored, config, device)


def _nbytes(p) -> int:
    return math.prod(p.shape) * p.dtype.itemsize


def _cache_path(config: Config, model: nn.Module, ckpt: Checkpoint, units: list) -> Path:
    """Where from_pretrained converts a checkpoint it cannot stream in place: named by the
    checkpoint's identity, the units and the dtypes, so that one storage_path holds the
    stores of several checkpoints, unit choices and dtypes side by side."""
    if config.store_name:
        return Path(config.storage_path) / config.store_name
    dtypes = "-".join(sorted({TORCH_TO_ST[p.dtype] for u in units for p in u.params}))
    # The units too: the same checkpoint streamed with other Config.units has a store of its own.
    key = hashlib.sha256("|".join([_checkpoint_id(ckpt), *(u.name for u in units)]).encode()).hexdigest()
    return Path(config.storage_path) / f"{type(model).__name__}.{key[:16]}.{dtypes}.tstore"


def _check_named_store(store, ckpt: Checkpoint, path: str) -> None:
    """Refuse a store named with ``store=`` that was not converted from these checkpoint files:
    it would run another checkpoint's weights of the same shapes without a word. The store
    records the identity of the files it was converted from (``source_checkpoint_id``,
    :func:`_checkpoint_id`: their names, sizes, headers, inodes and modification times)."""
    meta = _core.Store(str(store)).metadata
    recorded = meta.get("source_checkpoint_id")
    ident = _checkpoint_id(ckpt)
    if recorded == ident:
        return
    origin = meta.get("source_checkpoint")
    if recorded is None:
        made = "records no source checkpoint (it was written by offload() or by an older version)"
    else:
        made = f"was converted from {origin or 'a checkpoint'} (identity {recorded})"
    raise StoreMismatchError(
        f"store {store} {made}, not from {path} (identity {ident}): it may hold other weights of the same "
        f"shapes. Convert this checkpoint with tensorstream.convert({str(path)!r}, STORE) and name that "
        "store, or leave store= out (from_pretrained streams the checkpoint or converts it once). The "
        "identity is of the files: a checkpoint copied, moved or saved over since the conversion is "
        "converted again"
    )


def _find_store(config: Config, model: nn.Module, ckpt: Checkpoint, units: list) -> Optional[str]:
    """A store under `config.storage_path` converted from this checkpoint (by `convert`, or
    by an earlier from_pretrained), holding these units, in the dtypes the model asks for (a
    store converted to another dtype holds rounded values: not a match)."""
    wanted = {TORCH_TO_ST[p.dtype] for u in units for p in u.params}
    ident = _checkpoint_id(ckpt)
    named = Path(config.storage_path) / (config.store_name or f"{type(model).__name__}.tstore")
    for cand in (named, _cache_path(config, model, ckpt, units)):
        if not cand.exists():
            continue
        try:
            st = _core.Store(str(cand))
        except StoreCorruptedError:
            continue
        if st.metadata.get("source_checkpoint_id") != ident or any(
            st.unit_index(u.name) is None for u in units
        ):
            continue
        stored = {t.dtype for i in range(len(st.units())) for t in st.layout(i).tensors}
        if stored == wanted:
            return str(cand)
    return None


def convert(
    checkpoint: str,
    store: str,
    *,
    config: Optional[Config] = None,
    auto_class=None,
    dtype: Optional[torch.dtype] = None,
    progress: Optional[bool] = None,
) -> str:
    """Write an aligned, checksummed store from a checkpoint (safetensors, or PyTorch
    ``pytorch_model.bin`` files, sharded or not), tensor by tensor (one file open at a time,
    mapped), atomically. `store` is a file path or a directory (then the file is
    ``<ModelClass>.tstore`` inside it). Returns the store's path. With
    ``config.compression_enabled`` the units are compressed losslessly at
    ``config.compression_level``. `progress`: a progress bar on stderr; ``None``:
    ``config.progress`` when a config is given, else when stderr is a terminal."""
    if progress is None and config is not None:
        progress = config.progress
    return _convert(
        resolve_checkpoint(checkpoint), Path(store), config, auto_class, dtype, progress, exact=False
    )


def _convert(path: str, out: Path, config, auto_class, dtype, progress: Optional[bool], exact: bool) -> str:
    """convert() into `out`: exactly that file when `exact`, else a file or a directory."""
    model = _skeleton(path, auto_class, dtype)
    units = with_candidates(model, analyse(model, config.units if config else None))
    ckpt = Checkpoint(path)
    _map_units_to_checkpoint(model, units, recipes(model, ckpt.tensors))
    if not exact and (out.is_dir() or not out.suffix):
        out.mkdir(parents=True, exist_ok=True)
        out = out / f"{type(model).__name__}.tstore"
    elif not exact and out.exists() and out.suffix != ".tstore":
        raise InvalidArgumentError(
            f"{out} exists and is not a store (*.tstore): convert does not overwrite it. "
            "Name a new file, a .tstore file or a directory."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(ckpt.tensors[n].nbytes for u in units for p in u.params for n in p.source_names)
    bar = bytes_bar(total, f"converting to {out.name}", progress)
    fp = hashlib.sha256()
    fp.update(f"tensorstream-v1|{type(model).__module__}.{type(model).__qualname__}".encode())
    writer = _core.StoreWriter(str(out), "pending")
    try:
        # Config(compression_enabled=True): units coded losslessly, at compression_level.
        compress = config is not None and config.compression_enabled
        writer.set_compression(config.compression_level if compress else None)
        for u in units:
            writer.begin_unit(u.name)
            fp.update(f"|unit:{u.name}".encode())
            for p in u.params:
                pieces = [ckpt.get(n) for n in p.source_names]
                rel = _relative_name(model, u, p)
                t = plain_cpu(p.recipe.value(pieces).to(p.dtype), rel)
                del pieces
                where = plain_bytes(t, rel)
                writer.add_tensor(rel, TORCH_TO_ST[t.dtype], list(t.shape), *where)
                digest = _core.checksum(*where)
                fp.update(f"|{rel}:{TORCH_TO_ST[t.dtype]}:{list(t.shape)}:{digest:016x}".encode())
                if bar is not None:
                    bar.update(sum(ckpt.tensors[n].nbytes for n in p.source_names))
                del t
            writer.end_unit()
        ckpt.close()
        writer.set_metadata("model_class", f"{type(model).__module__}.{type(model).__qualname__}")
        writer.set_metadata("source_checkpoint_id", _checkpoint_id(ckpt))
        writer.set_metadata("source_checkpoint", os.path.abspath(path))
        writer.set_metadata("writer", "tensorstream convert " + _core.__version__)
        writer.set_fingerprint(fp.hexdigest()[:32])
        result = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    return result


__all__ = ["from_pretrained", "convert", "resolve_checkpoint"]
