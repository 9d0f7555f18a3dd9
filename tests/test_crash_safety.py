"""Crash-safe store writes.

A process writing a store through ``offload()`` is killed with SIGKILL at spread, jittered
points of the write. Afterwards the store path holds either nothing (or, when a store was
there before, that old store, byte for byte) or the complete new store, byte for byte
identical to a reference written without interruption and verifying unit by unit. Never a
store that opens with wrong bytes. The next ``offload()`` rebuilds or reuses it and gives
outputs identical to the un-offloaded model, and leaves no temporary file behind.

A full disk (a 2 MiB tmpfs, and one a few pages short of the store) and a file size limit
(RLIMIT_FSIZE, which needs no privileges) give a clear ``StreamIOError`` (an ``OSError``) with
the errno, leave nothing in the directory, and leave the model usable.

The writers are forked from a "zygote" subprocess that imported torch once and holds the
models, so each kill costs a fork rather than a Python start. Run directly
(``python tests/test_crash_safety.py --zygote``) this file is that zygote.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from zygote import Zygote

import tensorstream as ts
from tensorstream import _core
from tensorstream.errors import StoreCorruptedError, StreamIOError
from tensorstream.memory import aligned_empty

HERE = Path(__file__).resolve().parent
WIDTH = 512
BLOCKS = 8  # 8 blocks of 4.2 MB: a 33.6 MB store
STORE = "Net.tstore"
KILLS = 16


class Net(nn.Module):
    """A residual MLP: the blocks are the streamed units. Torch only (the subprocesses that
    run it need not import transformers)."""

    def __init__(self, width: int = WIDTH, blocks: int = BLOCKS):
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(blocks)
        )
        self.out = nn.Linear(width, 16)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def sample(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(seed))


def verify_store(path: Path) -> None:
    """Open the store and read every unit through the engine, verifying its checksum (as
    ``tensorstream inspect`` does). Raises StoreCorruptedError on any mismatch."""
    store = _core.Store(str(path))
    engine = _core.Engine("pread", 2)
    for i in range(len(store.units())):
        lay = store.layout(i)
        buf = aligned_empty(lay.buffer_len)
        engine.wait(engine.submit(lay, buf.data_ptr(), lay.buffer_len, True, buf))


def temp_files(d: Path) -> list:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(f".{STORE}.tmp-"))


# ---------------------------------------------------------------------------------- zygote


def _zygote_main() -> None:  # pragma: no cover - runs in the subprocess
    import resource

    torch.set_num_threads(1)  # no OpenMP pool before fork()
    import test_crash_safety as mod  # the class as pytest imports it: same fingerprint

    models: dict = {}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        seed = cmd["seed"]
        if seed not in models:
            models[seed] = mod.net(seed)
        model = models[seed]
        r, w = os.pipe()
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                os.write(w, f"S {time.monotonic()}\n".encode())
                if cmd["op"] == "fsize":
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
                    resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["limit"], cmd["limit"]))
                cfg = ts.Config(cmd["dir"], backend="pread", overwrite_store=cmd.get("overwrite", False))
                ts.offload(model, cfg)
                os.write(w, f"E {time.monotonic()}\n".encode())
            except BaseException as e:  # noqa: BLE001 - reported to the test
                err = {
                    "type": type(e).__name__,
                    "is_oserror": isinstance(e, OSError),
                    "errno": getattr(e, "errno", None),  # what users read, as on any OSError
                    "msg": str(e),
                }
                os.write(w, ("X " + json.dumps(err) + "\n").encode())
            finally:
                os._exit(0)
        os.close(w)
        delay = cmd.get("kill_after")
        if delay is not None:
            time.sleep(max(0.0, delay))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        chunks = []
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(r)
        out = {"pid": pid, "killed": os.WIFSIGNALED(status), "start": None, "end": None, "error": None}
        for ln in b"".join(chunks).decode().splitlines():
            tag, _, rest = ln.partition(" ")
            if tag == "S":
                out["start"] = float(rest) - t0
            elif tag == "E":
                out["end"] = float(rest) - t0
            elif tag == "X":
                out["error"] = json.loads(rest)
        print(json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(Path(__file__).resolve())
    yield z
    z.close()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Reference stores (written uninterrupted in this process) and reference outputs."""
    d = tmp_path_factory.mktemp("refs")
    out = {}
    for seed in (1, 2):
        m = net(seed)
        with torch.no_grad():
            out[f"logits{seed}"] = m(sample())
        ts.offload(m, ts.Config(d / f"s{seed}", backend="pread"))
        out[f"bytes{seed}"] = (d / f"s{seed}" / STORE).read_bytes()
    return out


def _recover_and_check(d: Path, refs: dict) -> None:
    """The next offload() reuses or rebuilds the store; outputs identical; no temp left."""
    m = net(1)
    ts.offload(m, ts.Config(d, backend="pread", overwrite_store=True))
    with torch.no_grad():
        assert torch.equal(m(sample()), refs["logits1"])
    assert temp_files(d) == [], "the stale temporary file of the killed writer was not removed"
    assert (d / STORE).read_bytes() == refs["bytes1"]
    del m


# ------------------------------------------------------------------------------- the tests


def test_sigkill_during_offload_leaves_old_or_complete_store_never_a_wrong_one(tmp_path, zygote, refs):
    # Calibrate: the second uninterrupted write (the first one warms the caches) gives the
    # time from fork() to the start and the end of offload().
    for k in range(2):
        calib = zygote.run(op="offload", dir=str(tmp_path / f"calib{k}"), seed=1)
        assert calib["error"] is None and calib["end"] is not None, calib
        assert (tmp_path / f"calib{k}" / STORE).read_bytes() == refs["bytes1"], (
            "the zygote writes the reference bytes"
        )
    t_start, t_end = calib["start"], calib["end"]
    rng = random.Random(1234)
    outcomes = []
    for i in range(KILLS + 8):
        if i >= KILLS and any(n for _, _, n, _ in outcomes):
            break  # a machine much slower than at calibration: up to 8 more kills, later
        d = tmp_path / f"run{i}"
        d.mkdir()
        replacing = i % 2 == 1  # a store of another model is there, and is overwritten
        if replacing:
            (d / STORE).write_bytes(refs["bytes2"])
        # Kill points spread from before the write starts to after it ends, jittered.
        frac = -0.05 + 1.2 * (i + rng.random()) / KILLS if i < KILLS else 1 + 2 * rng.random()
        kill_after = t_start + frac * (t_end - t_start)
        res = zygote.run(op="offload", dir=str(d), seed=1, overwrite=replacing, kill_after=kill_after)
        assert res["error"] is None, res
        names = sorted(os.listdir(d))
        temps = temp_files(d)
        assert set(names) - set(temps) <= {STORE}, f"unexpected files {names}"
        for t in temps:
            assert t.rsplit("-", 1)[1] == str(res["pid"]), f"temp file {t} is not the killed writer's"
        path = d / STORE
        if path.exists():
            data = path.read_bytes()
            if data == refs["bytes1"]:
                state = "new"
            elif replacing and data == refs["bytes2"]:
                state = "old"
            else:
                # Whatever is there must at least be refused; it must never open and verify.
                with pytest.raises(StoreCorruptedError):
                    verify_store(path)
                pytest.fail(
                    f"kill {i} at {kill_after:.3f} s left a store with other bytes ({len(data)} bytes)"
                )
            verify_store(path)
        else:
            assert not replacing, "the old store vanished before the new one replaced it"
            state = "none"
        outcomes.append((round(kill_after, 3), state, len(temps), res["killed"]))
        _recover_and_check(d, refs)
        shutil.rmtree(d)
    print("kill outcomes (kill_after_s, state, temp files, killed):", outcomes)
    # The per-kill checks above are the guarantee; this checks the test did its job: some
    # kill landed in the middle of a write (a temporary file was left).
    assert any(n for _, _, n, _ in outcomes), f"no kill landed during a write: {outcomes}"


def _mount_tmpfs(d: Path, size: int) -> None:
    d.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {r.stderr.strip()}")


@pytest.mark.parametrize("short_by", ["most", "a_few_pages"])
def test_full_disk_gives_clear_error_and_leaves_nothing(tmp_path, refs, short_by):
    store_len = len(refs["bytes1"])
    size = 2 << 20 if short_by == "most" else (store_len // 4096 - 3) * 4096
    d = tmp_path / "small"
    _mount_tmpfs(d, size)
    try:
        m = net(1)
        with pytest.raises(StreamIOError) as info:
            ts.offload(m, ts.Config(d, backend="pread"))
        e = info.value
        assert isinstance(e, OSError)
        assert e.errno == e.os_errno == errno.ENOSPC, (e.errno, str(e))
        assert STORE in str(e) and STORE in e.path
        assert sorted(os.listdir(d)) == [], "a partial store or temporary file was left behind"
        # The failed offload left the model intact and un-offloaded: it runs, and can be
        # offloaded elsewhere.
        assert getattr(m, "_tensorstream", None) is None
        with torch.no_grad():
            assert torch.equal(m(sample()), refs["logits1"])
        ts.offload(m, ts.Config(tmp_path / "roomy", backend="pread"))
        with torch.no_grad():
            assert torch.equal(m(sample()), refs["logits1"])
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_file_size_limit_gives_clear_error_and_leaves_nothing(tmp_path, zygote):
    """RLIMIT_FSIZE stands in for a full disk where mounting is not allowed: writes past
    the limit fail with EFBIG."""
    d = tmp_path / "limited"
    d.mkdir()
    res = zygote.run(op="fsize", dir=str(d), seed=1, limit=1 << 20)
    err = res["error"]
    assert err is not None, f"the write past the file size limit succeeded: {res}"
    assert err["type"] == "StreamIOError" and err["is_oserror"], err
    assert err["errno"] == errno.EFBIG, err
    assert STORE in err["msg"], err
    assert sorted(os.listdir(d)) == [], "a partial store or temporary file was left behind"


def _in_new_pid_namespace() -> list:
    """The command prefix that runs a process in a PID namespace of its own (as a writer in
    another container sharing the volume runs), or skip where unshare is not allowed."""
    try:
        ok = (
            subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=10).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("unshare --pid is not allowed here")
    return ["unshare", "--pid", "--fork", "--kill-child"]


@pytest.mark.parametrize("namespace", ["same", "new"])
def test_stale_temp_of_a_dead_writer_is_removed_but_a_live_writers_is_kept(tmp_path, refs, namespace):
    """The next offload() removes temporary files whose writer is gone, never one whose
    writer is alive (it may be another process writing right now). A live writer holds an
    exclusive flock on its temporary file; the PID in the name proves nothing (a writer in
    another PID namespace sharing the folder has a PID this process cannot see: `new` runs
    the writer in one)."""
    prefix = _in_new_pid_namespace() if namespace == "new" else []
    d = tmp_path / "s"
    d.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = d / f".{STORE}.tmp-0-{dead.pid}"
    stale.write_bytes(b"\0" * 8192)
    live = d / f".{STORE}.tmp-0-{os.getpid()}"  # a live PID, but no writer holds it
    live.write_bytes(b"\0" * 8192)
    other_ns = d / f".{STORE}.tmp-1-{dead.pid}"  # a dead PID here, but a writer holds it
    other_ns.write_bytes(b"\0" * 8192)
    writer = subprocess.Popen([*prefix, "flock", "--exclusive", str(other_ns), "sleep", "30"])
    try:
        deadline = time.time() + 10
        while time.time() < deadline:  # wait until the lock is taken
            if subprocess.run(["flock", "--nonblock", str(other_ns), "true"]).returncode != 0:
                break
            time.sleep(0.05)
        m = net(1)
        ts.offload(m, ts.Config(d, backend="pread"))
        with torch.no_grad():
            assert torch.equal(m(sample()), refs["logits1"])
        assert not stale.exists() and not live.exists()
        assert other_ns.exists()
        assert (d / STORE).read_bytes() == refs["bytes1"]
    finally:
        writer.kill()
        writer.wait()


if __name__ == "__main__" and "--zygote" in sys.argv:
    _zygote_main()
