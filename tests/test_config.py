"""Config validation: every invalid value raises a ValueError (ConfigError) that names the
field; enum fields accept members and plain strings alike."""

from __future__ import annotations

import pytest

import tensorstream as ts
from tensorstream.errors import ConfigError, TensorStreamError


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", "nvme"),
        ("backend", 3),
        ("backend", None),
        ("vram_budget_gb", -1.0),
        ("vram_budget_gb", 0),
        ("vram_budget_gb", float("inf")),
        ("vram_budget_gb", float("nan")),
        ("vram_budget_gb", "4"),
        ("vram_budget_gb", True),
        ("compression_level", 0),
        ("compression_level", 10),
        ("compression_level", 3.0),
        ("compression_level", True),
        ("num_io_threads", 0),
        ("num_io_threads", -2),
        ("num_io_threads", False),
        ("prefetch_strategy", "next_two_layers"),
        ("prefetch_strategy", ts.BackendType.MMAP),
        ("memory_pressure_mode", "extreme"),
        ("compression_enabled", 1),
        ("debug_mode", "yes"),
        ("overwrite_store", 0),
        ("host_cache_gb", -1),
        ("host_cache_gb", False),
        ("memory_headroom_gb", -0.5),
        ("memory_headroom_gb", "1"),
        ("memory_headroom_gb", float("inf")),
        ("units", "model.layers.0"),
        ("units", ["model.layers.0", ""]),
        ("units", [3]),
        ("chunk_mb", 6),
        ("chunk_mb", 0),
        ("store_name", "a/b.tstore"),
        ("store_name", ""),
    ],
)
def test_invalid_config_value_raises_value_error_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        ts.Config(tmp_path, **{field: value})
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, TensorStreamError)


@pytest.mark.parametrize("path", ["", None, 3])
def test_invalid_storage_path_raises_value_error_naming_the_field(path):
    with pytest.raises(ValueError, match="storage_path"):
        ts.Config(path)


@pytest.mark.parametrize(
    ("field", "enum_cls"),
    [
        ("backend", ts.BackendType),
        ("prefetch_strategy", ts.PrefetchStrategy),
        ("memory_pressure_mode", ts.MemoryPressureMode),
    ],
)
def test_enum_fields_accept_members_and_plain_strings_and_normalise_to_members(tmp_path, field, enum_cls):
    for member in enum_cls:
        for given in (member, member.value, member.value.upper(), member.name, f" {member.value} "):
            cfg = ts.Config(tmp_path, **{field: given})
            value = getattr(cfg, field)
            assert value is member, (given, value)
            assert isinstance(value, enum_cls)
            assert value == member.value  # str enums compare equal to their value


def test_enums_import_from_config_module_and_are_the_public_ones():
    from tensorstream.config import BackendType, MemoryPressureMode, PrefetchStrategy

    assert BackendType is ts.BackendType
    assert PrefetchStrategy is ts.PrefetchStrategy
    assert MemoryPressureMode is ts.MemoryPressureMode
    assert {b.value for b in BackendType} >= {"auto", "mmap", "pread", "cuda", "gpudirect"}
    assert {s.value for s in PrefetchStrategy} == {"none", "next_layer", "adaptive"}
    assert {m.value for m in MemoryPressureMode} == {"conservative", "balanced", "aggressive"}


def test_valid_numbers_are_kept_and_budget_bytes_is_in_gib(tmp_path):
    cfg = ts.Config(
        tmp_path,
        vram_budget_gb=1.5,
        compression_level=9,
        num_io_threads=1,
        host_cache_gb=0,
        units=("model.layers.0", "LlamaDecoderLayer"),
        chunk_mb=4,
    )
    assert cfg.budget_bytes == 3 << 29
    assert cfg.compression_level == 9
    assert cfg.num_io_threads == 1
    assert cfg.units == ["model.layers.0", "LlamaDecoderLayer"]
    assert ts.Config(tmp_path, vram_budget_gb=2).budget_bytes == 2 << 30


def test_create_default_config_has_auto_backend_adaptive_prefetch_and_no_budget(tmp_path):
    cfg = ts.create_default_config(tmp_path)
    assert isinstance(cfg, ts.Config)
    assert str(cfg.storage_path) == str(tmp_path)
    assert cfg.backend is ts.BackendType.AUTO
    assert cfg.prefetch_strategy is ts.PrefetchStrategy.ADAPTIVE
    assert cfg.memory_pressure_mode is ts.MemoryPressureMode.BALANCED
    assert cfg.vram_budget_gb is None
    assert cfg.budget_bytes is None
    assert cfg.overwrite_store is False
    assert cfg.units is None


def test_create_default_config_accepts_a_string_path():
    cfg = ts.create_default_config("/tmp/tensorstream-test-store")
    assert cfg.storage_path == "/tmp/tensorstream-test-store"


def test_offload_rejects_a_non_module_and_a_non_config(tmp_path):
    from torch import nn

    with pytest.raises(ts.InvalidArgumentError):
        ts.offload("not a model", ts.Config(tmp_path))
    with pytest.raises(ts.InvalidArgumentError):
        ts.offload(nn.Linear(2, 2), {"storage_path": str(tmp_path)})


def test_unknown_unit_name_raises_config_error_naming_it(tmp_path):
    from conftest import tiny_llama

    with pytest.raises(ConfigError, match="no_such_block"):
        ts.offload(tiny_llama(layers=2), ts.Config(tmp_path, units=["no_such_block"]))
