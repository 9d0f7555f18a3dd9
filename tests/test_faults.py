"""I/O faults in the middle of a forward (injected with the engine's fault plan, pread
backend): a clear StreamIOError naming the unit and the file, no leaked budget, and a model
that works again on the next call."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import ALL_STRATEGIES, budget_gb, input_ids, offload, tiny_llama

import tensorstream as ts

pytestmark = pytest.mark.usefixtures("fault_injection")
STORE = "LlamaForCausalLM.tstore"


@pytest.fixture(scope="module")
def expected():
    """Reference logits of the un-offloaded model for input_ids(seed=51)."""
    with torch.no_grad():
        return tiny_llama(tied=False, seed=0)(input_ids(seed=51)).logits


def _streaming_model(tmp_path, strategy: str = "none"):
    """Four layers, room for two (the minimum for next_layer/adaptive): every layer streams."""
    model = tiny_llama(tied=False, seed=0)
    model = offload(
        model, tmp_path, backend="pread", prefetch_strategy=strategy, vram_budget_gb=budget_gb(model, 2)
    )
    with torch.no_grad():
        model(input_ids(seed=51))  # warm: the accounting is at its steady state
    return model


def _held(model) -> tuple:
    rt = model._tensorstream
    return rt.planner.stats()["used"], rt.held_bytes()


def _assert_io_error_names_unit_and_file(err, tmp_path, units) -> None:
    assert isinstance(err, ts.StreamIOError)
    assert isinstance(err, OSError)
    assert err.unit in units
    assert f"'{err.unit}'" in str(err)
    assert err.path == str(tmp_path / STORE)
    assert str(tmp_path / STORE) in str(err)


@pytest.mark.parametrize(
    ("plan", "failing_unit"),
    [
        ({"fail_read": 1}, "model.layers.0"),
        ({"fail_read": 3}, "model.layers.2"),
        ({"short_read": 2}, "model.layers.1"),
    ],
)
@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_read_fault_raises_stream_io_error_naming_unit_and_file_then_next_forward_is_identical(
    tmp_path, expected, strategy, plan, failing_unit
):
    model = _streaming_model(tmp_path, strategy)
    rt = model._tensorstream
    units = [u.name for u in rt.units]
    before = _held(model)
    ids = input_ids(seed=51)

    rt.engine.set_fault_plan(**plan)
    with pytest.raises(ts.StreamIOError) as info, torch.no_grad():
        model(ids)
    _assert_io_error_names_unit_and_file(info.value, tmp_path, units)
    assert info.value.unit == failing_unit
    if "short_read" in plan:
        assert "file ended" in str(info.value)
    else:
        assert info.value.os_errno == 5  # EIO
    used, held = _held(model)
    assert used <= rt.planner.budget and held <= rt.planner.budget

    rt.engine.set_fault_plan()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert _held(model) == before  # nothing leaked
    s = ts.get_model_statistics(model)
    assert s["errors"] == 1
    assert s["engine"]["failed"] >= 1
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def test_persistent_fault_fails_every_forward_until_cleared_without_prefetch(tmp_path, expected):
    model = _streaming_model(tmp_path, "none")
    rt = model._tensorstream
    before = _held(model)
    ids = input_ids(seed=51)
    rt.engine.set_fault_plan(fail_from=1)
    for _ in range(2):
        with pytest.raises(ts.StreamIOError, match="model.layers.0"), torch.no_grad():
            model(ids)
    rt.engine.set_fault_plan()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
    assert _held(model) == before


@pytest.mark.parametrize("strategy", ["next_layer", "adaptive"])
def test_persistent_fault_with_prefetch_leaves_model_usable_once_cleared(tmp_path, expected, strategy):
    model = _streaming_model(tmp_path, strategy)
    rt = model._tensorstream
    ids = input_ids(seed=51)
    rt.engine.set_fault_plan(fail_from=1)  # the demand read and the prefetch both fail
    with pytest.raises(ts.StreamIOError), torch.no_grad():
        model(ids)
    rt.engine.set_fault_plan()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def _forward_in_thread(model, ids, timeout: float):
    """Run a forward on another thread; fail (instead of hanging the suite) if it stalls."""
    result: dict = {}

    def run():
        try:
            with torch.no_grad():
                result["logits"] = model(ids).logits
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    start = time.perf_counter()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"forward did not finish within {timeout} s"
    if "error" in result:
        raise result["error"]
    return result["logits"], time.perf_counter() - start


@pytest.mark.parametrize("strategy", ALL_STRATEGIES)
def test_slow_reads_finish_in_bounded_time_with_identical_outputs(tmp_path, expected, strategy):
    model = _streaming_model(tmp_path, strategy)
    rt = model._tensorstream
    rt.engine.set_fault_plan(delay_ms=25)
    stall_before = ts.get_model_statistics(model)["stall_seconds"]
    logits, elapsed = _forward_in_thread(model, input_ids(seed=51), timeout=60)
    assert torch.equal(logits, expected)
    assert elapsed >= 0.025  # at least one read was slowed
    assert ts.get_model_statistics(model)["stall_seconds"] > stall_before
    rt.engine.set_fault_plan()
    logits, _ = _forward_in_thread(model, input_ids(seed=51), timeout=60)
    assert torch.equal(logits, expected)


def test_fault_during_generate_raises_and_generate_works_again_after(tmp_path):
    ids = input_ids(seed=52)
    with torch.no_grad():
        ref_tokens = tiny_llama(tied=False, seed=0).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    model = _streaming_model(tmp_path, "none")
    rt = model._tensorstream
    rt.engine.set_fault_plan(fail_read=9)  # in the third decode step
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    with pytest.raises(ts.StreamIOError), torch.no_grad():
        model.generate(ids, **kwargs)
    rt.engine.set_fault_plan()
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kwargs), ref_tokens)
