"""Bad input gets a clear TensorStreamError naming what to change, and loses nothing."""

from __future__ import annotations

import errno

import pytest
import torch
from conftest import input_ids, tiny_llama
from test_store import STORE, _flip_byte, _offloaded, _reference_logits

import tensorstream as ts
from tensorstream.cli import main


def test_a_budget_larger_than_any_machine_is_a_config_error():
    with pytest.raises(ts.ConfigError, match="vram_budget_gb=1e\\+30 is more memory"):
        ts.Config("/tmp/x", vram_budget_gb=1e30)


def test_storage_path_with_a_nul_byte_is_a_config_error():
    with pytest.raises(ts.ConfigError, match="storage_path.*NUL"):
        ts.Config("/tmp/a\x00b")


def test_storage_path_too_long_for_the_file_system_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ts.ConfigError, match="storage_path="):
        _offloaded(tmp_path / ("a" * 300))


def test_storage_path_that_is_a_file_is_a_config_error_naming_it(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a directory")
    with pytest.raises(ts.ConfigError, match="storage_path=.*a-file"):
        _offloaded(f)


def test_store_of_another_checkpoint_of_the_same_class_says_how_to_keep_both(tmp_path):
    _offloaded(tmp_path, seed=0)
    with pytest.raises(ts.StoreMismatchError, match="store_name"):
        _offloaded(tmp_path, seed=1)


def test_damaged_store_says_how_to_rebuild_and_overwrite_store_rebuilds_it(tmp_path, capsys):
    _offloaded(tmp_path)
    path = tmp_path / STORE
    _flip_byte(path, 40)  # inside the manifest
    with pytest.raises(ts.StoreCorruptedError, match="overwrite_store=True"):
        _offloaded(tmp_path)
    # inspect says what is wrong without a traceback
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "StoreCorruptedError" in err and "Traceback" not in err
    model = _offloaded(tmp_path, overwrite_store=True)
    ids = input_ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _reference_logits(ids))


def test_stream_io_error_carries_errno(tmp_path, fault_injection):
    model = tiny_llama(tied=False)
    model = _offloaded(tmp_path, backend="pread")
    model._tensorstream.engine.set_fault_plan(fail_from=1)
    with torch.no_grad(), pytest.raises(ts.StreamIOError) as info:
        model(input_ids())
    assert info.value.errno == errno.EIO == info.value.os_errno


def test_inspect_refuses_an_edited_manifest(tmp_path, capsys):
    from test_store import _edit_manifest, _swap

    _offloaded(tmp_path)
    path = tmp_path / STORE
    _edit_manifest(path, lambda m: _swap(m, b"self_attn.q_proj.weight", b"self_attn.o_proj.weight"))
    assert main(["inspect", "--no-verify", str(path)]) == 2
    assert "manifest describes other tensors" in capsys.readouterr().err


def test_checkpoint_metadata_that_is_not_a_string_is_refused_naming_the_file(tmp_path):
    """The safetensors format allows only strings in `__metadata__`."""
    import json
    import struct

    tiny_llama(tied=False).save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = {"format": 1}
    edited = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(data[:8] + edited.ljust(n) + data[8 + n :])
    with pytest.raises(ts.StoreCorruptedError, match="model.safetensors.*__metadata__ entry 'format' is 1"):
        ts.from_pretrained(str(tmp_path / "ck"), ts.Config(tmp_path / "st"))
