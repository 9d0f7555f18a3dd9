"""The `tensorstream` command line: help for everything, a version, stores listed, and a user's
error is one line on stderr with exit status 2, never a traceback (through `main` and through
the installed `tensorstream` executable)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama

import tensorstream as ts
from tensorstream import cli

EXE = Path(sys.executable).with_name("tensorstream")


def _store(directory: Path, name: str | None = None, seed: int = 0, **kwargs) -> Path:
    cfg = ts.Config(directory, store_name=name, **kwargs)
    ts.offload(tiny_llama(tied=False, seed=seed), cfg)
    return directory / (name or "LlamaForCausalLM.tstore")


def _checkpoint(directory: Path) -> Path:
    tiny_llama(tied=False).save_pretrained(directory, max_shard_size="200KB")
    return directory


def _damaged_store(directory: Path) -> Path:
    path = _store(directory)
    with open(path, "r+b") as f:
        f.truncate(5000)
    return path


# Each a command line that must fail with one line on stderr and status 2. {file}: a text
# file; {empty}: an empty directory; {ck}: a directory with a config.json; {tmp}: the test's
# directory.
USER_ERRORS = {
    "no command": [],
    "unknown command": ["bogus"],
    "unknown option": ["inspect", "--bogus", "{file}"],
    "inspect a missing file": ["inspect", "{tmp}/missing.tstore"],
    "inspect a file that is not a store": ["inspect", "{file}"],
    "inspect a directory without stores": ["inspect", "{empty}"],
    "convert a file as the checkpoint": ["convert", "{file}", "{tmp}/out"],
    "convert a directory without config.json": ["convert", "{empty}", "{tmp}/out"],
    "convert a missing checkpoint": ["convert", "{tmp}/missing", "{tmp}/out"],
    "convert a damaged config.json": ["convert", "{ck}", "{tmp}/out"],
    "convert onto a file that is not a store": ["convert", "{ck}", "{file}"],
    "convert into a missing directory": ["convert", "{ck}", "{tmp}/missing/x.tstore"],
    "convert with --dtype bogus": ["convert", "{ck}", "{tmp}/out", "--dtype", "bogus"],
    "demo with a file as its store": ["demo", "--store", "{file}"],
    "demo with --tokens 0": ["demo", "--tokens", "0"],
    "demo with --budget-fraction nan": ["demo", "--budget-fraction", "nan"],
}


def _argv(case: str, tmp_path: Path) -> list:
    paths = {"file": tmp_path / "a-file.txt", "empty": tmp_path / "empty", "ck": tmp_path / "ck"}
    if not paths["file"].exists():
        paths["file"].write_text("not a store")
        paths["empty"].mkdir()
        paths["ck"].mkdir()
        (paths["ck"] / "config.json").write_text("{ not json")
    names = {k: str(v) for k, v in paths.items()}
    return [a.format(tmp=tmp_path, **names) for a in USER_ERRORS[case]]


def _assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tensorstream"), err


@pytest.mark.parametrize("case", list(USER_ERRORS), ids=lambda c: c.replace(" ", "-"))
def test_user_error_is_one_line_on_stderr_with_status_2(tmp_path, capsys, case):
    argv = _argv(case, tmp_path)
    rc = cli.main(argv)
    captured = capsys.readouterr()
    _assert_one_line_error(rc, captured.err)
    assert captured.out == ""


def test_a_damaged_store_is_one_line_with_status_2(tmp_path, capsys):
    path = _damaged_store(tmp_path)
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(2, err)
    assert "StoreCorruptedError" in err and str(path) in err


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(EXE), *argv], capture_output=True, text=True, timeout=300, env=env)


def test_the_installed_executable_reports_user_errors_without_a_traceback(tmp_path):
    assert EXE.exists(), f"the console script is not installed at {EXE}"
    damaged = _damaged_store(tmp_path / "d")
    for argv in (
        _argv("inspect a missing file", tmp_path),
        _argv("convert with --dtype bogus", tmp_path),
        _argv("convert a file as the checkpoint", tmp_path),
        _argv("convert a damaged config.json", tmp_path),
        ["inspect", str(damaged)],
    ):
        proc = _run(*argv)
        _assert_one_line_error(proc.returncode, proc.stderr)


def test_the_installed_executable_prints_help_and_version():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "convert", "inspect"):
        assert command in proc.stdout
    assert "_demo-run" not in proc.stdout and "SUPPRESS" not in proc.stdout
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tensorstream {ts.__version__}"


def test_help_lists_the_public_commands_and_hides_the_demo_child(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: tensorstream" in out
    for command in ("demo", "convert", "inspect"):
        assert command in out
    assert "_demo-run" not in out and "SUPPRESS" not in out


def test_version_is_the_package_version(capsys):
    assert ts.__version__ == ts._core.__version__
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"tensorstream {ts.__version__}\n"


def _parsers() -> dict:
    """Every parser of the command line: the top level, each command, the demo's child role."""
    top = cli.build_parser()
    found = {"tensorstream": top, "tensorstream _demo-run": cli._demo_run_parser()}
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, parser in action.choices.items():
                found[f"tensorstream {name}"] = parser
            assert {c.dest for c in action._choices_actions} == {"demo", "convert", "inspect"}
            assert all(c.help for c in action._choices_actions)
    return found


def test_every_command_and_option_has_help():
    parsers = _parsers()
    assert set(parsers) >= {"tensorstream demo", "tensorstream convert", "tensorstream inspect"}
    for prog, parser in parsers.items():
        assert parser.description, prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and action.help != argparse.SUPPRESS, f"{prog} {name} has no help"
            assert len(action.help) > 8, f"{prog} {name}: {action.help!r}"


@pytest.mark.parametrize("command", ["demo", "convert", "inspect"])
def test_each_command_prints_its_help(capsys, command):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: tensorstream {command}" in out
    for action in _parsers()[f"tensorstream {command}"]._actions:
        for option in action.option_strings:
            assert option in out


def test_the_demo_child_role_still_parses_its_command_line():
    args = cli._demo_run_parser().parse_args(["offload", "--store", "/tmp/x", "--tokens", "4"])
    assert (args.role, args.store, args.tokens, args.cmd) == ("offload", "/tmp/x", 4, "_demo-run")


def test_inspect_a_directory_lists_each_store_on_one_line(tmp_path, capsys):
    _store(tmp_path)
    _store(tmp_path, name="Compressed.tstore", seed=1, compression_enabled=True)
    (tmp_path / "notes.txt").write_text("not a store")
    assert cli.main(["inspect", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["store", "model", "class", "units", "size", "dtypes", "compression"]
    assert len(lines) == 3
    by_name = {line.split()[0]: line.split() for line in lines[1:]}
    plain, coded = by_name["LlamaForCausalLM.tstore"], by_name["Compressed.tstore"]
    # 4 layers, and the embeddings+head and the final norm (units that may be streamed)
    assert plain[1:7] == ["LlamaForCausalLM", "7", plain[3], "MB", "F32", "none"]
    assert coded[1:3] == ["LlamaForCausalLM", "7"] and coded[6:8] == ["ratio", coded[7]]
    assert float(coded[7]) > 1.0
    size = os.path.getsize(tmp_path / "LlamaForCausalLM.tstore")
    assert plain[3] == f"{size / 1e6:.2f}"


def test_inspect_a_directory_names_a_damaged_store_and_exits_1(tmp_path, capsys):
    _store(tmp_path, name="Good.tstore")
    _damaged_store(tmp_path)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    good = [line for line in out.splitlines() if line.startswith("Good.tstore")]
    bad = [line for line in out.splitlines() if line.startswith("LlamaForCausalLM.tstore")]
    assert len(good) == 1 and "DAMAGED" not in good[0]
    assert len(bad) == 1 and "DAMAGED: StoreCorruptedError" in bad[0]


def test_inspect_a_file_shows_its_units_and_checksums(tmp_path, capsys):
    path = _store(tmp_path)
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"store {path}" in out
    assert "| unit | offset | bytes |" in out
    assert out.count("| ok (") == 7 and "CORRUPTED" not in out
    assert cli.main(["inspect", "--no-verify", str(path)]) == 0
    assert capsys.readouterr().out.count("not verified") == 7


def test_convert_writes_a_store_that_inspect_verifies(tmp_path, capsys):
    ck = _checkpoint(tmp_path / "ck")
    assert cli.main(["convert", str(ck), str(tmp_path / "out"), "--dtype", "bfloat16", "--quiet"]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written == tmp_path / "out" / "LlamaForCausalLM.tstore"
    assert cli.main(["inspect", str(written)]) == 0
    out = capsys.readouterr().out
    assert "BF16" in out and "CORRUPTED" not in out
