"""Concurrent use of one store.

- Two processes that stream one store at the same moment (released together by a barrier,
  their forwards overlapping in time) both give outputs identical to the un-offloaded model.
- A store being written by one process (slowed down) is never seen half-written by
  another: the target path holds nothing or the complete store, and another process that
  offloads the same model meanwhile neither reads nor removes the writer's temporary file;
  both finish with identical outputs and one valid store.
- One process with two models that share a store (same weights, same storage_path) works,
  sequentially and from two threads at once.
- A store replaced underneath a model (another model overwrote it), or checkpoint shards
  replaced under a model streamed by from_pretrained, give that model's own outputs (the
  runtime holds the files it validated), never another model's weights.

The processes are forked from a zygote that imported torch once (see test_crash_safety).
Run directly (``python tests/test_concurrency.py --zygote``) this file is that zygote.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_crash_safety import STORE, net, sample, temp_files, verify_store
from zygote import Zygote

import tensorstream as ts
from tensorstream import _core
from tensorstream.errors import StoreCorruptedError, TensorStreamError

HERE = Path(__file__).resolve().parent
GiB = 1 << 30


def streaming_budget_gb(model, units: int = 2) -> float:
    """Room for the resident modules plus `units` blocks (at their padded store size)."""
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.blocks)
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) - sum(
        p.numel() * p.element_size() for b in model.blocks for p in b.parameters()
    )
    padded = -(-(block + 4096) // 4096) * 4096
    return (resident + units * padded + 4096) / GiB


def config(d, backend: str, strategy: str = "next_layer", **kw) -> ts.Config:
    return ts.Config(
        d, backend=backend, prefetch_strategy=strategy, vram_budget_gb=streaming_budget_gb(net(1)), **kw
    )


# ---------------------------------------------------------------------------------- zygote


def _zygote_main() -> None:  # pragma: no cover - runs in the subprocess
    torch.set_num_threads(1)  # no OpenMP pool before fork()
    import test_crash_safety as crash

    models: dict = {}

    def model(seed):
        if seed not in models:
            models[seed] = crash.net(seed)
        return models[seed]

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        if cmd["op"] == "read":
            out = _read_together(cmd, model(cmd["seed"]))
        elif cmd["op"] == "slow_offload":
            out = _slow_offload(cmd, model(cmd["seed"]))
        else:
            out = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(out), flush=True)


def _child(fn) -> int:  # pragma: no cover
    pid = os.fork()
    if pid == 0:
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _read_together(cmd: dict, model) -> dict:  # pragma: no cover
    """Fork `n` readers; each offloads `model` from the store, waits at a barrier, then runs
    `forwards` forwards and saves the outputs."""
    n = cmd["n"]
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pids = []
    for k in range(n):

        def run(k=k):
            info = {"k": k}
            try:
                m = ts.offload(model, config(cmd["dir"], cmd["backend"]))
                os.write(ready_w, b"R")
                os.read(go_r, 1)
                info["start"] = time.monotonic()
                outs = []
                with torch.no_grad():
                    for _ in range(cmd["forwards"]):
                        outs.append(m(sample()))
                info["end"] = time.monotonic()
                torch.save(outs, os.path.join(cmd["out"], f"out{k}.pt"))
                s = ts.get_model_statistics(m)
                info["bytes_read"] = s["engine"]["bytes_read"] if "engine" in s else None
            except BaseException as e:  # noqa: BLE001
                info["error"] = f"{type(e).__name__}: {e}"
                os.write(ready_w, b"R")
            os.write(res_w, (json.dumps(info) + "\n").encode())

        pids.append(_child(run))
    for _ in range(n):
        os.read(ready_r, 1)
    os.write(go_w, b"G" * n)
    for p in pids:
        os.waitpid(p, 0)
    os.close(res_w)
    data = b""
    while chunk := os.read(res_r, 65536):
        data += chunk
    for fd in (ready_r, ready_w, go_r, go_w, res_r):
        os.close(fd)
    return {"readers": [json.loads(x) for x in data.decode().splitlines()]}


def _slow_offload(cmd: dict, model) -> dict:  # pragma: no cover
    """Offload in a child whose StoreWriter sleeps after every unit."""
    r, w = os.pipe()

    def run():
        real = _core.StoreWriter

        class SlowWriter:
            def __init__(self, *a):
                self.w = real(*a)

            def end_unit(self):
                self.w.end_unit()
                time.sleep(cmd["sleep"])

            def __getattr__(self, name):
                return getattr(self.w, name)

        _core.StoreWriter = SlowWriter  # units.write_store looks it up at call time
        info = {}
        try:
            m = ts.offload(model, ts.Config(cmd["dir"], backend="pread"))
            with torch.no_grad():
                torch.save(m(sample()), cmd["out"])
        except BaseException as e:  # noqa: BLE001
            info["error"] = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(info).encode())

    pid = _child(run)
    os.close(w)
    os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    return json.loads(data or b"{}") | {"pid": pid}


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(Path(__file__).resolve())
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference():
    with torch.no_grad():
        return {seed: net(seed)(sample()) for seed in (1, 2)}


# ------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("backend", ["pread", "mmap"])
def test_two_processes_streaming_one_store_at_once_give_identical_outputs(
    tmp_path, zygote, reference, backend
):
    d, out = tmp_path / "store", tmp_path / "out"
    out.mkdir()
    ts.offload(net(1), ts.Config(d, backend="pread"))  # the store exists before the readers start
    before = (d / STORE).stat()
    res = zygote.run(op="read", seed=1, n=2, dir=str(d), backend=backend, forwards=6, out=str(out))
    readers = res["readers"]
    assert len(readers) == 2 and all("error" not in r for r in readers), readers
    # Released by one barrier, each streaming the whole model 6 times: they overlap.
    a, b = readers
    assert a["start"] < b["end"] and b["start"] < a["end"], readers
    for k in range(2):
        outs = torch.load(out / f"out{k}.pt")
        assert len(outs) == 6
        for o in outs:
            assert torch.equal(o, reference[1])
    after = (d / STORE).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), (
        "a reader rewrote the store"
    )
    assert temp_files(d) == []


def test_store_being_written_is_never_seen_incomplete_nor_used_by_another_process(
    tmp_path, zygote, reference
):
    d = tmp_path / "store"
    d.mkdir()
    path = d / STORE
    result: dict = {}
    writer = threading.Thread(
        target=lambda: result.update(
            zygote.run(op="slow_offload", seed=1, dir=str(d), sleep=0.15, out=str(tmp_path / "writer.pt"))
        ),
        daemon=True,
    )
    writer.start()
    seen = {"absent_while_writing": 0, "complete": 0}
    reader_model = None
    deadline = time.monotonic() + 90
    while writer.is_alive() and time.monotonic() < deadline:
        temps = temp_files(d)
        if path.exists():
            # Atomic rename: once the name exists, the store is whole.
            verify_store(path)
            seen["complete"] += 1
        elif temps:
            seen["absent_while_writing"] += 1
            with pytest.raises(OSError):
                _core.Store(str(path))
            if reader_model is None and seen["absent_while_writing"] >= 3:
                # Another process offloads the same model while the write is in progress:
                # it must not pick up the temporary file nor remove it (the writer is alive).
                reader_model = net(1)
                ts.offload(reader_model, config(d, "pread"))
                assert any(t in temp_files(d) for t in temps), "the live writer's temp file was removed"
                with torch.no_grad():
                    assert torch.equal(reader_model(sample()), reference[1])
        time.sleep(0.01)
    writer.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not writer.is_alive(), "the slowed writer did not finish"
    assert "error" not in result, result
    assert seen["absent_while_writing"] >= 3, f"never saw the write in progress: {seen}"
    assert reader_model is not None
    # Both finished; one valid store and no temporary file remain; everyone's outputs agree.
    assert temp_files(d) == []
    verify_store(path)
    assert torch.equal(torch.load(tmp_path / "writer.pt"), reference[1])
    with torch.no_grad():
        assert torch.equal(reader_model(sample()), reference[1])
    late = net(1)
    ts.offload(late, config(d, "mmap"))
    with torch.no_grad():
        assert torch.equal(late(sample()), reference[1])


@pytest.mark.parametrize("backends", [("pread", "pread"), ("mmap", "mmap"), ("mmap", "pread")])
def test_one_process_two_models_sharing_a_store(tmp_path, reference, backends):
    d = tmp_path / "shared"
    m1 = ts.offload(net(1), config(d, backends[0], "adaptive"))
    st = (d / STORE).stat()
    m2 = ts.offload(net(1), config(d, backends[1], "next_layer"))
    st2 = (d / STORE).stat()
    assert (st.st_ino, st.st_mtime_ns) == (st2.st_ino, st2.st_mtime_ns), "the second model rewrote the store"
    with torch.no_grad():
        for _ in range(3):  # interleaved forwards
            assert torch.equal(m1(sample()), reference[1])
            assert torch.equal(m2(sample()), reference[1])
    for m in (m1, m2):
        s = ts.get_model_statistics(m)
        assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_two_models_sharing_a_store_run_from_two_threads_at_once(tmp_path, reference):
    d = tmp_path / "shared"
    models = [ts.offload(net(1), config(d, b)) for b in ("pread", "mmap")]
    barrier = threading.Barrier(2)
    errors, outs = [], [[], []]

    def run(k):
        try:
            barrier.wait(10)
            with torch.no_grad():
                for _ in range(5):
                    outs[k].append(models[k](sample()))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a forward did not finish within 60 s"
    assert errors == []
    for o in outs:
        assert len(o) == 5 and all(torch.equal(x, reference[1]) for x in o)


@pytest.mark.parametrize("backend", ["pread", "mmap"])
@pytest.mark.parametrize("used_before", [False, True])
def test_store_replaced_by_another_models_gives_own_outputs(tmp_path, reference, backend, used_before):
    d = tmp_path / "shared"
    a = ts.offload(net(1), config(d, backend))
    if used_before:
        with torch.no_grad():
            assert torch.equal(a(sample()), reference[1])
    b = ts.offload(net(2), config(d, "pread", overwrite_store=True))  # renamed over a's store
    with torch.no_grad():
        assert torch.equal(b(sample()), reference[2])
        try:
            got = a(sample())
        except StoreCorruptedError as e:
            assert STORE in str(e)
            outcome = "StoreCorruptedError"
        else:
            assert torch.equal(got, reference[1]), "the model ran with another model's weights"
            outcome = "own outputs"
    # The runtime holds the file it validated (opened or mapped at offload): the old store
    # stays readable through it. Never the other model's weights; a clear error would be
    # the only acceptable alternative.
    assert outcome == "own outputs", f"{backend}, used before: {used_before}: {outcome}"


def test_model_offloaded_with_pread_keeps_reading_its_own_store_after_it_is_replaced(tmp_path, reference):
    d = tmp_path / "shared"
    a = ts.offload(net(1), config(d, "pread"))
    ts.offload(net(2), config(d, "pread", overwrite_store=True))
    with torch.no_grad():
        assert torch.equal(a(sample()), reference[1])


def test_checkpoint_shard_replaced_after_from_pretrained_is_not_streamed_silently(tmp_path):
    from conftest import input_ids, tiny_llama

    ck1, ck2 = tmp_path / "ck1", tmp_path / "ck2"
    ref = tiny_llama(tied=False, seed=11)
    ref.save_pretrained(ck1, max_shard_size="150KB")
    tiny_llama(tied=False, seed=12).save_pretrained(ck2, max_shard_size="150KB")
    ids = input_ids(seed=64)
    with torch.no_grad():
        expected = ref(ids).logits
    model = ts.from_pretrained(str(ck1), ts.Config(tmp_path / "st", backend="pread"), dtype=torch.float32)
    for shard in sorted(ck1.glob("*.safetensors")):  # same names and layout, other weights
        os.replace(ck2 / shard.name, shard)
    with torch.no_grad():
        try:
            got = model(ids).logits
        except TensorStreamError:
            return  # refused: acceptable
    assert torch.equal(got, expected), "streamed the replaced shards' weights silently"


def test_checkpoint_shard_replaced_then_device_move_is_not_streamed_silently(tmp_path):
    from conftest import input_ids, tiny_llama

    ck1, ck2 = tmp_path / "ck1", tmp_path / "ck2"
    ref = tiny_llama(tied=False, seed=11)
    ref.save_pretrained(ck1, max_shard_size="150KB")
    tiny_llama(tied=False, seed=12).save_pretrained(ck2, max_shard_size="150KB")
    ids = input_ids(seed=64)
    with torch.no_grad():
        expected = ref(ids).logits
    model = ts.from_pretrained(str(ck1), ts.Config(tmp_path / "st", backend="pread"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    for shard in sorted(ck1.glob("*.safetensors")):
        os.replace(ck2 / shard.name, shard)
    model.to("cpu")
    with torch.no_grad():
        try:
            got = model(ids).logits
        except TensorStreamError:
            return  # refused: acceptable
    assert torch.equal(got, expected), "streamed the replaced shards' weights silently after a device move"


if __name__ == "__main__" and "--zygote" in sys.argv:
    _zygote_main()
