"""A long-lived Python subprocess that runs test commands sent as JSON lines, so tests can
use separate processes without paying torch's import for each one."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Zygote:
    """Runs `python SCRIPT --zygote` and exchanges one JSON line per command with it."""

    def __init__(self, script: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        self.p = subprocess.Popen(
            [sys.executable, str(script), "--zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(HERE),
            env=env,
        )
        self.lock = threading.Lock()

    def run(self, timeout: float = 120, **cmd) -> dict:
        with self.lock:
            self.p.stdin.write(json.dumps(cmd) + "\n")
            self.p.stdin.flush()
            ready, _, _ = select.select([self.p.stdout], [], [], timeout)
            assert ready, f"zygote gave no answer within {timeout} s to {cmd}"
            line = self.p.stdout.readline()
            assert line, f"zygote died (rc {self.p.poll()})"
            return json.loads(line)

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"op": "exit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(10)
        except Exception:  # noqa: BLE001
            self.p.kill()
            self.p.wait()
