"""Memory pressure: the budget is a ceiling that yields when free memory falls and grows back
when it recovers, the callback hears every change of level, several models yield to one
signal, and an out-of-memory error inside a unit is retried once where a retry gives the
un-offloaded model's answer. Tokens stay identical to the un-offloaded model throughout.

The device's free memory comes from a simulated probe (``tensorstream.set_memory_probe``):
a device of fixed capacity where something else takes memory on a schedule, and what the
offloaded models hold counts as used (except a mapping's pages, which are page cache)."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import (
    CPU_BACKENDS,
    GiB,
    blocks_of,
    budget_gb,
    input_ids,
    isolate_from_other_models,
    logits_and_tokens,
    offload,
    padded_unit_bytes,
    param_bytes,
    tiny_llama,
)

import tensorstream as ts
from tensorstream import memory, oom, pressure

LAYERS = 6
NEW_TOKENS = 16


@pytest.fixture(autouse=True)
def probe_every_unit(monkeypatch):
    monkeypatch.setattr(pressure, "PROBE_INTERVAL", 0)
    # Out-of-memory errors are simulated on the CPU here (only CUDA raises them for real).
    monkeypatch.setattr(oom, "RETRY_DEVICES", {"cuda", "cpu"})
    isolate_from_other_models()


def unit_bytes(model) -> int:
    return padded_unit_bytes(max(param_bytes(b) for b in blocks_of(model)))


class Device:
    """A simulated device of `capacity` bytes. `other` bytes are taken by something else;
    the offloaded models' resident modules and buffers count as used. `check` runs at every
    probe (a unit boundary) to look at the runtimes' accounting."""

    def __init__(self, capacity: int, check=None):
        self.capacity = capacity
        self.other = 0
        self.runtimes: list = []
        self.check = check

    def used(self) -> int:
        n = self.other
        for rt in self.runtimes:
            n += rt.budget_plan.resident if rt.budget_plan else 0
            if rt.transfer is not None and not rt.transfer.zero_copy:
                n += rt.held_bytes()
        return n

    def free(self) -> int:
        return max(self.capacity - self.used(), 0)

    def __call__(self, device):
        if self.check:
            self.check(self)
        return ts.MemoryReading(free=self.free(), capacity=self.capacity)


def _generate(model, ids, new_tokens=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_budget_yields_when_free_memory_falls_mid_generation_and_grows_back(tmp_path, backend):
    ids = input_ids()
    want = _generate(tiny_llama(tied=False, seed=5, layers=LAYERS), ids)
    model = tiny_llama(tied=False, seed=5, layers=LAYERS)
    unit = unit_bytes(model)
    room = 2 * unit  # the headroom
    model = offload(
        model,
        tmp_path,
        vram_budget_gb=budget_gb(model, LAYERS),
        backend=backend,
        memory_headroom_gb=room / GiB,
    )
    rt = model._tensorstream
    events = []
    ts.set_memory_pressure_callback(events.append)
    seen = {"ceilings": [], "kept_before": None}

    def check(dev):
        p = rt.counters.passes
        if rt.planner is None:
            return
        # The engine's accounting never exceeds the ceiling the planner has now.
        used = rt.planner.stats()["used"]
        assert used <= rt.planner.budget
        assert rt.held_bytes() <= rt.planner.budget
        seen["ceilings"].append(rt.planner.budget)
        if p == 4 and seen["kept_before"] is None:
            seen["kept_before"] = len(rt.planner.kept())
            dev.other = dev.free() - room // 2  # something takes all but half a headroom
        elif p == 8 and dev.other < dev.capacity:
            dev.other = dev.capacity  # ... then everything
        elif p == 12:
            dev.other = 0  # and gives it back

    dev = Device(rt.budget_plan.resident + rt.budget_plan.units + 3 * room, check)
    dev.runtimes.append(rt)
    ts.set_memory_probe(dev)

    assert torch.equal(_generate(model, ids), want)

    plan = rt.budget_plan.units
    assert min(seen["ceilings"]) == max(rt.sizes), "down to one unit while everything was taken"
    levels = [(ev.previous, ev.level) for ev in events]
    assert levels[0][0] == "none" and "critical" in [lv for _, lv in levels]
    if backend == "pread":
        # Its buffers are memory the probe counts as used: giving up two units frees enough.
        assert any(unit < c < plan for c in seen["ceilings"]), "a partial yield first"
        assert levels[0][1] in ("low", "high")
    else:
        # A mapping's pages are page cache, which the probe counts as free already: less
        # than a headroom free means the kernel is reclaiming them, so it goes to one unit.
        assert levels[0][1] == "critical"
    assert levels[-1][1] == "none"
    for ev in events:
        assert isinstance(ev, ts.MemoryPressureEvent)
        assert ev.model == "LlamaForCausalLM" and ev.mode == "balanced" and ev.device == "cpu"
        assert ev.budget_bytes <= ev.requested_budget_bytes == rt.budget_plan.budget
        assert set(ev.evicted) <= {u.name for u in rt.units}
        assert ev.level in str(ev)
    assert any(ev.evicted for ev in events), "yielding evicted units"
    # Recovered: the budget as set, the kept set back.
    s = ts.get_model_statistics(model)
    assert s["pressure_level"] == "none"
    assert rt.planner.budget == plan
    assert s["effective_budget_bytes"] == s["budget_bytes"]
    assert [h["level"] for h in s["pressure_history"]] == [ev.level for ev in events]
    _generate(model, ids, 2)
    assert len(rt.planner.kept()) == seen["kept_before"] > 0


def test_the_budget_never_goes_above_what_the_user_set(tmp_path):
    model = tiny_llama(tied=False, seed=5)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 3), backend="pread")
    rt = model._tensorstream
    ts.set_memory_probe(lambda device: ts.MemoryReading(free=1 << 40, capacity=1 << 41))
    events = []
    ts.set_memory_pressure_callback(events.append)
    _generate(model, input_ids(), 4)
    s = ts.get_model_statistics(model)
    assert s["effective_budget_bytes"] == s["budget_bytes"]
    assert rt.planner.budget == rt.budget_plan.units
    assert s["pressure_level"] == "none" and not events
    assert s["memory_free_bytes"] == 1 << 40


def test_demand_evictions_under_a_small_budget_are_not_pressure(tmp_path):
    """Streaming through a budget smaller than the model evicts on every access; with free
    memory to spare that is the budget working, not memory pressure."""
    events = []
    ts.set_memory_pressure_callback(events.append)
    model = tiny_llama(tied=False, seed=4)
    model = offload(model, tmp_path, vram_budget_gb=budget_gb(model, 1), prefetch_strategy="none")
    with torch.no_grad():
        model(input_ids())
    assert ts.get_model_statistics(model)["planner"]["pressure_events"] > 0
    assert events == []


def test_several_models_yield_to_one_signal(tmp_path):
    ids = input_ids()
    refs = [logits_and_tokens(tiny_llama(tied=False, seed=s, layers=LAYERS), ids) for s in (6, 7)]
    models = []
    for s in (6, 7):
        m = tiny_llama(tied=False, seed=s, layers=LAYERS)
        models.append(offload(m, tmp_path / str(s), vram_budget_gb=budget_gb(m, LAYERS), backend="pread"))
    a, b = (m._tensorstream for m in models)
    room = 2 * unit_bytes(tiny_llama(tied=False, seed=6, layers=LAYERS))
    for rt in (a, b):
        rt.config.memory_headroom_gb = room / GiB
    for m, (logits, _) in zip(models, refs):
        with torch.no_grad():
            assert torch.equal(m(ids).logits, logits)
    dev = Device(
        a.budget_plan.resident + b.budget_plan.resident + a.budget_plan.units + b.budget_plan.units + 3 * room
    )
    dev.runtimes += [a, b]
    ts.set_memory_probe(dev)
    events = []
    ts.set_memory_pressure_callback(events.append)

    # Model b runs in another thread (it holds its lock) when the signal comes.
    holding, release = threading.Event(), threading.Event()

    def hold_b():
        with b.lock:
            holding.set()
            release.wait(10)

    t = threading.Thread(target=hold_b)
    t.start()
    holding.wait(10)
    dev.other = dev.free() - room // 2
    with torch.no_grad():
        assert torch.equal(models[0](ids).logits, refs[0][0])  # a's units probe
    assert a.planner.budget < a.budget_plan.units, "the model that probed yielded"
    assert b.pressure.pending is not None, "the running one got its ceiling for its next unit"
    release.set()
    t.join()
    with torch.no_grad():
        assert torch.equal(models[1](ids).logits, refs[1][0])
    assert b.planner.budget < b.budget_plan.units
    assert {ev.model for ev in events} == {"LlamaForCausalLM"} and len(events) >= 2
    assert a.held_bytes() + b.held_bytes() <= a.planner.budget + b.planner.budget
    # Both yield in proportion to their budgets, and the free memory is back above the headroom.
    assert dev.free() >= room
    for m, (logits, tokens) in zip(models, refs):
        got = logits_and_tokens(m, ids)
        assert torch.equal(got[0], logits) and torch.equal(got[1], tokens)

    # An idle model yields at once when another one probes.
    dev.other = dev.capacity
    with torch.no_grad():
        models[0](ids)
    assert b.pressure.level == "critical" and b.planner.budget == max(b.sizes)
    assert b.held_bytes() <= b.planner.budget


# ---------------------------------------------------------------- out of memory in a unit


def _oom_once(module, calls: list, fail_at: set):
    """Make `module.forward` raise torch.OutOfMemoryError on the calls numbered in `fail_at`."""
    forward = module.forward

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) in fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    module.forward = failing


def _reference_logits(ids):
    with torch.no_grad():
        return tiny_llama(tied=False, seed=8, layers=LAYERS)(ids, use_cache=False).logits


def _oom_model(tmp_path):
    model = tiny_llama(tied=False, seed=8, layers=LAYERS)
    return offload(model, tmp_path, vram_budget_gb=budget_gb(model, LAYERS), backend="pread")


def test_out_of_memory_in_a_unit_is_retried_after_releasing_every_unit(tmp_path):
    ids = input_ids()
    want = _reference_logits(ids)
    model = _oom_model(tmp_path)
    rt = model._tensorstream
    cap = 1 << 40  # free memory stays in the band where the ceiling neither shrinks nor grows
    ts.set_memory_probe(lambda device: ts.MemoryReading(free=int(cap * 0.05 * 1.5), capacity=cap))
    events = []
    ts.set_memory_pressure_callback(events.append)
    with torch.no_grad():
        model(ids, use_cache=False)
        held = rt.held_bytes()
        calls: list = []
        _oom_once(model.model.layers[3].mlp, calls, {1})
        assert torch.equal(model(ids, use_cache=False).logits, want)
        assert torch.equal(model(ids, use_cache=False).logits, want)
    s = ts.get_model_statistics(model)
    assert s["oom_retries"] == 1 and s["errors"] == 0
    assert [ev.level for ev in events] == ["oom"]
    assert events[0].evicted, "the retry released the units held"
    assert rt.planner.budget <= max(held // 2, max(rt.sizes)), "the ceiling came down"
    assert rt.held_bytes() <= rt.planner.budget


def test_out_of_memory_before_the_kv_cache_changed_is_retried_in_generate(tmp_path):
    ids = input_ids()
    want = _generate(tiny_llama(tied=False, seed=8, layers=LAYERS), ids)
    model = _oom_model(tmp_path)
    calls: list = []
    # input_layernorm runs before attention appends to the cache; its 5th call is a decode step.
    _oom_once(model.model.layers[2].input_layernorm, calls, {5})
    assert torch.equal(_generate(model, ids), want)
    assert ts.get_model_statistics(model)["oom_retries"] == 1


def test_out_of_memory_after_the_kv_cache_changed_is_refused_and_the_model_stays_usable(tmp_path):
    ids = input_ids()
    want = _generate(tiny_llama(tied=False, seed=8, layers=LAYERS), ids)
    model = _oom_model(tmp_path)
    calls: list = []
    _oom_once(model.model.layers[2].mlp, calls, {5})  # after attention appended to the cache
    with pytest.raises(ts.OutOfMemoryError, match="changed its inputs") as e:
        _generate(model, ids)
    assert isinstance(e.value, torch.OutOfMemoryError) and isinstance(e.value, ts.BudgetError)
    assert ts.get_model_statistics(model)["oom_retries"] == 0
    assert torch.equal(_generate(model, ids), want)


def test_out_of_memory_again_after_the_retry_raises_and_the_model_stays_usable(tmp_path):
    ids = input_ids()
    want = _reference_logits(ids)
    model = _oom_model(tmp_path)
    calls: list = []
    with torch.no_grad():
        model(ids, use_cache=False)
        _oom_once(model.model.layers[3].mlp, calls, {1, 2})
        with pytest.raises(ts.OutOfMemoryError, match="again after"):
            model(ids, use_cache=False)
        assert torch.equal(model(ids, use_cache=False).logits, want)
    assert ts.get_model_statistics(model)["errors"] == 1


# ---------------------------------------------------------------- the probe itself


def test_the_cpu_probe_reads_meminfo_and_the_cgroup_limit(monkeypatch):
    r = pressure.read_memory(torch.device("cpu"))
    assert 0 < r.free <= r.capacity
    files = {
        "/sys/fs/cgroup/memory.max": "1073741824\n",
        "/sys/fs/cgroup/memory.current": "805306368\n",
        "/sys/fs/cgroup/memory.stat": "anon 100\nfile 300\ninactive_file 67108864\n",
    }
    monkeypatch.setattr(memory, "_read", files.get)
    assert memory.cgroup_limit() == (1 << 30, (1 << 30) - 805306368 + 67108864)
    r = pressure.read_memory(torch.device("cpu"))
    assert r.capacity == 1 << 30 and r.free == (1 << 30) - 805306368 + 67108864
    files["/sys/fs/cgroup/memory.max"] = "max\n"
    assert memory.cgroup_limit() is None
    v1 = {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "2147483648\n",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes": "2147483648\n",
        "/sys/fs/cgroup/memory/memory.stat": "cache 5\ntotal_inactive_file 4096\n",
    }
    monkeypatch.setattr(memory, "_read", v1.get)
    assert memory.cgroup_limit() == (2 << 30, 4096)
    v1["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = "9223372036854771712\n"
    assert memory.cgroup_limit() is None


def test_the_headroom_follows_the_mode_unless_set(tmp_path):
    cap = 100 << 30
    shares = [
        pressure.headroom(ts.Config(tmp_path, memory_pressure_mode=m), cap) for m in pressure.HEADROOM_SHARE
    ]
    assert shares == sorted(shares, reverse=True), "conservative yields earliest, aggressive last"
    assert pressure.headroom(ts.Config(tmp_path, memory_headroom_gb=1.5), cap) == int(1.5 * GiB)
    with pytest.raises(ts.InvalidArgumentError):
        ts.set_memory_probe(3)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_long_generation_whose_kv_cache_would_overflow_a_fixed_budget_completes(tmp_path):
    """The process's GPU memory is capped so that the budget's weights plus the KV cache and
    activations of a long batched generation do not fit: the budget yields as the cache grows,
    and the tokens are those of the model fully on the GPU."""
    from conftest import small_llama_bf16

    ids = torch.randint(0, 1024, (16, 16), generator=torch.Generator().manual_seed(3)).cuda()
    new_tokens = 1000
    torch.cuda.empty_cache()
    ref = small_llama_bf16(seed=0).cuda()
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    want = _generate(ref, ids, new_tokens)
    growth = torch.cuda.max_memory_allocated() - weights  # the KV cache and activations at their peak
    del ref
    torch.cuda.empty_cache()

    model = small_llama_bf16(seed=0)
    budget = ts.estimate_model_memory(model) * 0.6
    model = ts.offload(
        model, ts.Config(tmp_path, vram_budget_gb=budget / GiB, backend="cuda", host_cache_gb=0)
    )
    model.to("cuda")
    free, total = torch.cuda.mem_get_info()
    base = torch.cuda.memory_allocated()
    cap = base + budget + growth * 0.8  # the fixed budget plus the cache would overflow it
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        events = []
        ts.set_memory_pressure_callback(events.append)
        got = _generate(model, ids, new_tokens)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert torch.equal(got, want)
    s = ts.get_model_statistics(model)
    assert events and s["effective_budget_bytes"] < s["budget_bytes"] or s["oom_retries"] > 0
