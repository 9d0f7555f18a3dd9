"""Writing a store or converting a checkpoint shows a progress bar on stderr by
``Config.progress`` (default: when stderr is a terminal), and every Config field is documented
in ``help(Config)``."""

from __future__ import annotations

import dataclasses
import pydoc
import sys

import pytest
import torch
from conftest import budget_gb, input_ids, tiny_llama

import tensorstream as ts


def _offload_and_run(tmp_path, **kwargs):
    ref = tiny_llama(seed=6)
    ids = input_ids()
    with torch.no_grad():
        ref_logits = ref(ids).logits
    model = ts.offload(tiny_llama(seed=6), ts.Config(tmp_path, vram_budget_gb=budget_gb(ref, 2), **kwargs))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


def test_writing_a_store_shows_a_progress_bar_on_stderr_when_asked(tmp_path, capfd):
    _offload_and_run(tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert "writing Llama" in err and "100%" in err
    assert "writing" not in out


def test_progress_false_shows_nothing_even_on_a_terminal(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    _offload_and_run(tmp_path, progress=False)
    assert "writing" not in capfd.readouterr().err


def test_progress_by_default_follows_whether_stderr_is_a_terminal(tmp_path, capfd, monkeypatch):
    _offload_and_run(tmp_path / "a")  # stderr captured: not a terminal
    assert "writing" not in capfd.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert ts.Config(tmp_path).shows_progress
    _offload_and_run(tmp_path / "b")
    assert "writing Llama" in capfd.readouterr().err


def test_converting_a_checkpoint_shows_progress_by_config(tmp_path, capfd):
    pytest.importorskip("transformers")
    ck = tmp_path / "ckpt"
    tiny_llama(tied=False, seed=1, layers=3).save_pretrained(ck)
    ts.convert(str(ck), tmp_path / "quiet", config=ts.Config(tmp_path, progress=False))
    assert "converting" not in capfd.readouterr().err
    ts.convert(str(ck), tmp_path / "loud", config=ts.Config(tmp_path, progress=True))
    assert "converting to LlamaForCausalLM.tstore" in capfd.readouterr().err


def test_config_progress_is_validated(tmp_path):
    with pytest.raises(ts.ConfigError, match="progress"):
        ts.Config(tmp_path, progress="yes")


def test_every_config_field_is_documented_in_help(tmp_path):
    text = pydoc.render_doc(ts.Config, renderer=pydoc.plaintext)
    doc = ts.Config.__doc__
    for f in dataclasses.fields(ts.Config):
        assert f"``{f.name}``" in doc, f"Config.{f.name} is not in Config's docstring"
        assert f.name in text, f"Config.{f.name} is not in help(Config)"
