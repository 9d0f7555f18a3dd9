"""The scripts in examples/ run (each in its own process, as a user runs them), exit 0 and
print their key lines: every example checks its offloaded tokens against the model in memory
and exits non-zero when they differ."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

KEY_LINES = {
    "basic_usage.py": ["generated tokens identical to the model in memory: True", "layers kept resident:"],
    "advanced_configuration.py": [
        "generated tokens identical to the model in memory: True",
        "invalid value refused: Config.compression_level=12",
        "backend: asked auto, used ",
        "compression ratio 1.",
    ],
    "performance_tuning.py": [
        "| setting | tok/s | MB read/token | kept |",
        "| 50%, compression_enabled=True |",
        "every setting generated the tokens of the model in memory: True",
    ],
    "huggingface_integration.py": [
        "from_pretrained: 8 layers stream from the checkpoint's shards",
        "generate: tokens identical to the model in memory: True",
        "pipeline: tokens identical to the model in memory: True",
        "assisted generation: tokens identical to the model in memory: True",
    ],
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(KEY_LINES)


@pytest.mark.parametrize("script", sorted(KEY_LINES))
def test_example_runs_and_matches_the_model_in_memory(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    for line in KEY_LINES[script]:
        assert line in proc.stdout, f"{script}: {line!r} not in its output:\n{proc.stdout}"
