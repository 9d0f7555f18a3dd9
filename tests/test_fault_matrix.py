"""I/O faults at every read of a forward (test_faults.py covers chosen reads; this file
sweeps all of them), for every prefetch strategy, for one and four I/O threads, for units
read in several chunks, and for checkpoints streamed in place by ``from_pretrained``.

For each read index N of a forward, read N fails with EIO (or comes back short). Then:

- a forward raises ``StreamIOError`` (an ``OSError``) naming the unit and the file it read;
- with one I/O thread (reads in a fixed order) the faults over all N name every streamed unit;
- once the fault is cleared, the next forward gives outputs identical to the reference;
- the budget accounting (planner bytes and held buffer bytes) is back to its level before
  the fault: no buffer leaks;
- every forward finishes within a time bound (run on a watchdog thread): nothing deadlocks.

A fault on a prefetch issued at the end of a forward (ADAPTIVE prefetches across the pass
boundary) surfaces in the forward that needs that unit: the plan stays armed for at most
two forwards, and exactly one of them must raise.
"""

from __future__ import annotations

import errno
import threading
import time

import pytest
import torch
from conftest import ALL_STRATEGIES, budget_gb, input_ids, tiny_llama

import tensorstream as ts

pytestmark = pytest.mark.usefixtures("fault_injection")
STORE = "LlamaForCausalLM.tstore"
FORWARD_TIMEOUT = 30.0


def _forward(model, ids):
    """One forward on a watchdog thread: returns (logits or None, exception or None)."""
    box: dict = {}

    def run():
        try:
            with torch.no_grad():
                box["out"] = model(ids).logits
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(FORWARD_TIMEOUT)
    assert not t.is_alive(), f"a forward did not finish within {FORWARD_TIMEOUT} s (deadlock?)"
    return box.get("out"), box.get("err")


def _held(model) -> tuple:
    rt = model._tensorstream
    return rt.planner.stats()["used"], rt.held_bytes()


def _reads_per_forward(model, ids) -> int:
    """Reads a forward makes, counted over two: the first units of a pass may be prefetched
    at the end of the one before (Runtime._end_pass), and done before it is counted."""
    eng = model._tensorstream.engine
    before = eng.stats()["chunks"]
    for _ in range(2):
        out, err = _forward(model, ids)
        assert err is None
    return -(-(eng.stats()["chunks"] - before) // 2)


def _sweep(model, ids, expected, kind: str, files: list) -> list:
    """Fail each read of a forward in turn; return the units named, in read order."""
    rt = model._tensorstream
    units = [u.name for u in rt.units]
    for _ in range(2):  # warm: ADAPTIVE learns its order on the first pass
        out, err = _forward(model, ids)
        assert err is None and torch.equal(out, expected)
    before = _held(model)
    reads = _reads_per_forward(model, ids)
    assert reads >= len(units), f"{reads} reads for {len(units)} streamed units"
    errors_before = ts.get_model_statistics(model)["errors"]
    named = []
    for n in range(1, reads + 1):
        rt.engine.set_fault_plan(**{kind: n})
        results = [_forward(model, ids)]
        if results[0][1] is None:
            results.append(_forward(model, ids))  # a failed prefetch for the next pass
        raised = [e for _, e in results if e is not None]
        assert len(raised) == 1, f"read {n}: {len(raised)} forwards raised"
        for out, e in results:
            if e is None:
                assert torch.equal(out, expected), f"read {n}: a forward without the fault differs"
        e = raised[0]
        assert isinstance(e, ts.StreamIOError) and isinstance(e, OSError), (
            f"read {n}: {type(e).__name__}: {e}"
        )
        assert e.unit in units and f"'{e.unit}'" in str(e), f"read {n}: unit not named: {e}"
        assert e.path in files and e.path in str(e), f"read {n}: file not named: {e}"
        if kind == "fail_read":
            assert e.os_errno == errno.EIO
        else:
            assert "file ended" in str(e)
        named.append(e.unit)
        rt.engine.set_fault_plan()
        out, err = _forward(model, ids)
        assert err is None, f"read {n}: the forward after the fault failed: {err}"
        assert torch.equal(out, expected), f"read {n}: the forward after the fault differs"
        assert _held(model) == before, f"read {n}: accounting {_held(model)} != {before} before the fault"
        s = ts.get_model_statistics(model)
        assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert ts.get_model_statistics(model)["errors"] - errors_before == reads
    return named


@pytest.fixture(scope="module")
def expected():
    with torch.no_grad():
        return tiny_llama(tied=False, seed=0)(input_ids(seed=61)).logits


@pytest.mark.parametrize("kind", ["fail_read", "short_read"])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_fault_at_every_read_of_a_forward_names_unit_and_file_and_leaves_model_clean(
    tmp_path, expected, strategy, threads, kind
):
    model = tiny_llama(tied=False, seed=0)
    cfg = ts.Config(
        tmp_path,
        backend="pread",
        prefetch_strategy=strategy,
        num_io_threads=threads,
        vram_budget_gb=budget_gb(model, 2),  # room for two of four layers: all stream
    )
    model = ts.offload(model, cfg)
    units = [u.name for u in model._tensorstream.units]
    named = _sweep(model, input_ids(seed=61), expected, kind, [str(tmp_path / STORE)])
    if threads == 1:
        assert set(named) == set(units), f"faults named {named}, streamed units are {units}"
        if strategy == "none":
            assert named == units  # one demand read per unit, in model order


def test_fault_in_any_chunk_of_a_multi_chunk_unit(tmp_path):
    """Layers of 7 MB read in 4 MiB chunks: a fault in the second chunk of a unit names
    that unit; the chunk that succeeded does not leak its buffer."""
    model = tiny_llama(tied=False, seed=3, layers=3, hidden=256, intermediate=2048, heads=4, kv_heads=2)
    ids = input_ids(seed=62)
    with torch.no_grad():
        expected = model(ids).logits
    cfg = ts.Config(
        tmp_path,
        backend="pread",
        prefetch_strategy="none",
        num_io_threads=1,
        chunk_mb=4,
        vram_budget_gb=budget_gb(model, 1),
    )
    model = ts.offload(model, cfg)
    units = [u.name for u in model._tensorstream.units]
    named = _sweep(model, ids, expected, "fail_read", [str(tmp_path / STORE)])
    assert len(named) >= 2 * len(units), "the units should be read in at least two chunks each"
    assert set(named) == set(units)
    assert named == sorted(named, key=units.index), "chunks of one unit are read together, in model order"


def test_slow_failing_reads_finish_in_bounded_time(tmp_path, expected):
    model = tiny_llama(tied=False, seed=0)
    model = ts.offload(
        model,
        ts.Config(
            tmp_path, backend="pread", prefetch_strategy="next_layer", vram_budget_gb=budget_gb(model, 2)
        ),
    )
    ids = input_ids(seed=61)
    out, err = _forward(model, ids)
    assert err is None
    before = _held(model)
    rt = model._tensorstream
    rt.engine.set_fault_plan(fail_from=3, delay_ms=30)
    t0 = time.perf_counter()
    out, err = _forward(model, ids)
    assert isinstance(err, ts.StreamIOError), err
    assert time.perf_counter() - t0 < FORWARD_TIMEOUT
    rt.engine.set_fault_plan()
    out, err = _forward(model, ids)  # the failed prefetches were dropped with the demand read
    assert err is None and torch.equal(out, expected)
    assert _held(model) == before


@pytest.mark.parametrize("strategy", ["none", "next_layer"])
def test_fault_streaming_a_checkpoint_in_place_names_unit_and_shard(tmp_path, strategy):
    """from_pretrained streams the layers from the safetensors shards where they lie: a
    fault names the unit and the shard file it was reading."""
    ref = tiny_llama(tied=False, seed=5)
    ck = tmp_path / "ckpt"
    ref.save_pretrained(ck, max_shard_size="150KB")
    ids = input_ids(seed=63)
    with torch.no_grad():
        expected = ref(ids).logits
    cfg = ts.Config(
        tmp_path / "st",
        backend="pread",
        prefetch_strategy=strategy,
        num_io_threads=1,
        vram_budget_gb=budget_gb(ref, 2),
    )
    model = ts.from_pretrained(str(ck), cfg, dtype=torch.float32)
    assert ts.get_model_statistics(model)["source"] == "safetensors"
    shards = [str(p) for p in sorted(ck.glob("*.safetensors"))]
    assert len(shards) > 1
    named = _sweep(model, ids, expected, "fail_read", shards)
    assert set(named) == {u.name for u in model._tensorstream.units}
