"""from_pretrained and convert: bit-identical to transformers on sharded local checkpoints,
streamed in place or through a converted store, for Llama, Qwen2, GPT-2 and Mixtral."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, tiny_mixtral, tiny_qwen2

import tensorstream as ts
from tensorstream.errors import InvalidArgumentError

transformers = pytest.importorskip("transformers")


# Each builds the model from a config with weights seeded by `seed` (3 layers, 2 for
# Mixtral, hidden 64, vocab 256).
BUILDERS = {
    "llama-tied": lambda seed: tiny_llama(tied=True, seed=seed, layers=3),
    "llama": lambda seed: tiny_llama(tied=False, seed=seed, layers=3),
    "qwen2": lambda seed: tiny_qwen2(seed=seed),
    "gpt2": lambda seed: tiny_gpt2(seed=seed, layers=3),
    "mixtral": lambda seed: tiny_mixtral(seed=seed),
}


def _checkpoint(tmp_path, kind: str, seed: int = 0) -> str:
    model = BUILDERS[kind](seed)
    path = tmp_path / f"ckpt-{kind}"
    model.save_pretrained(path, max_shard_size="150KB")
    return str(path)


def _reference(path: str, ids: torch.Tensor, dtype=torch.float32):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        logits = ref(ids).logits
        tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    return logits, tokens


def _run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    return logits, tokens


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_from_pretrained_streams_sharded_checkpoint_bit_identical(tmp_path, kind):
    ck = _checkpoint(tmp_path, kind)
    assert len([f for f in os.listdir(ck) if f.endswith(".safetensors")]) > 1, "checkpoint should be sharded"
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_tokens = _reference(ck, ids)
    model = ts.from_pretrained(ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32)
    logits, tokens = _run(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    # Mixtral's experts are stored one by one and fused by transformers on load: converted
    # once into a store under storage_path, then streamed from it.
    assert s["source"] == ("store" if kind == "mixtral" else "safetensors")
    assert s["bytes_read"] > 0
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_from_pretrained_through_converted_store_bit_identical(tmp_path, kind):
    ck = _checkpoint(tmp_path, kind)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    ref_logits, ref_tokens = _reference(ck, ids)
    store = ts.convert(ck, tmp_path / "converted", dtype=torch.float32, progress=False)
    assert os.path.isfile(store) and store.endswith(".tstore")
    model = ts.from_pretrained(
        ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32, store=store
    )
    logits, tokens = _run(model, ids)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    assert ts.get_model_statistics(model)["source"] == "store"


def test_from_pretrained_finds_converted_store_under_storage_path(tmp_path):
    ck = _checkpoint(tmp_path, "llama")
    store = ts.convert(ck, tmp_path / "st", dtype=torch.float32, progress=False)
    model = ts.from_pretrained(ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32)
    stats = ts.get_model_statistics(model)
    assert stats["source"] == "store" and stats["store_path"] == store


def test_converted_store_is_reused_by_offload_of_the_same_weights(tmp_path):
    ck = _checkpoint(tmp_path, "llama")
    store = ts.convert(ck, tmp_path / "st", dtype=torch.float32, progress=False)
    before = os.stat(store).st_mtime_ns
    model = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ts.offload(model, ts.Config(tmp_path / "st", vram_budget_gb=0.004))
    assert os.stat(store).st_mtime_ns == before


def test_checkpoint_dtype_converted_on_the_fly_matches_transformers(tmp_path):
    ck = _checkpoint(tmp_path, "llama")  # saved in float32
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_tokens = _reference(ck, ids, dtype=torch.bfloat16)
    model = ts.from_pretrained(ck, ts.Config(tmp_path / "st", vram_budget_gb=0.002), dtype=torch.bfloat16)
    logits, tokens = _run(model, ids)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"]


def _word_tokenizer():
    """A local word-level tokenizer over the words t0..t255 (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", eos_token="t1", pad_token="t0"
    )
    return fast


def test_pipeline_text_generation_works_on_streamed_model(tmp_path):
    ck = _checkpoint(tmp_path, "llama")
    tok = _word_tokenizer()
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    model = ts.from_pretrained(ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32)
    prompt = "t5 t17 t33 t2 t90"
    kwargs = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    expected = transformers.pipeline("text-generation", model=ref, tokenizer=tok)(prompt, **kwargs)
    got = transformers.pipeline("text-generation", model=model, tokenizer=tok)(prompt, **kwargs)
    assert got == expected
    assert got[0]["generated_text"].strip()


def test_from_pretrained_without_local_checkpoint_says_no_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(InvalidArgumentError, match="never downloads"):
        ts.from_pretrained("some-org/some-model-that-is-not-cached", ts.Config(tmp_path / "st"))


def test_convert_interrupted_leaves_no_store(tmp_path, monkeypatch):
    ck = _checkpoint(tmp_path, "llama")
    out = tmp_path / "conv"
    import tensorstream.hf as hf

    real_writer = ts._core.StoreWriter

    class Interrupted(RuntimeError):
        pass

    class FailingWriter:
        """Fails on the fifth tensor, as a crash or Ctrl-C mid-conversion would."""

        def __init__(self, *a):
            self.w = real_writer(*a)
            self.n = 0

        def add_tensor(self, *a):
            self.n += 1
            if self.n == 5:
                raise Interrupted("interrupted")
            return self.w.add_tensor(*a)

        def __getattr__(self, name):
            return getattr(self.w, name)

    monkeypatch.setattr(hf._core, "StoreWriter", FailingWriter)
    with pytest.raises(Interrupted):
        ts.convert(ck, out, dtype=torch.float32, progress=False)
    leftovers = list(out.iterdir()) if out.exists() else []
    assert leftovers == [], leftovers


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_store_converted_to_another_dtype_is_not_picked_and_converts_right_when_named(tmp_path, backend):
    ck = _checkpoint(tmp_path, "llama")  # saved in float32
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    store = ts.convert(ck, tmp_path / "st", dtype=torch.bfloat16, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    # Found under storage_path, the bf16 store would give bf16-rounded weights: it is not used.
    model = ts.from_pretrained(
        ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004, backend=backend), dtype=torch.float32
    )
    assert ts.get_model_statistics(model)["source"] == "safetensors"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # Named explicitly, it is converted back to float32 on load, on every path.
    named = ts.from_pretrained(
        ck,
        ts.Config(tmp_path / "st", vram_budget_gb=0.004, backend=backend),
        dtype=torch.float32,
        store=store,
    )
    rounded = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in rounded.model.layers:  # the streamed layers hold what the store holds
            for p in layer.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
        assert torch.equal(named(ids).logits, rounded(ids).logits)
    assert ts.get_model_statistics(named)["mode"] == "cpu-pread"


def test_weights_saved_over_a_converted_checkpoint_are_not_served_from_the_old_store(tmp_path):
    ck = _checkpoint(tmp_path, "llama", seed=0)
    ts.convert(ck, tmp_path / "st", dtype=torch.float32, progress=False)
    # Fine-tuned weights of the same shapes saved over the checkpoint.
    BUILDERS["llama"](7).save_pretrained(ck, max_shard_size="150KB")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    ref_logits, _ = _reference(ck, ids)
    model = ts.from_pretrained(ck, ts.Config(tmp_path / "st", vram_budget_gb=0.004), dtype=torch.float32)
    assert ts.get_model_statistics(model)["source"] == "safetensors"
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


def test_resident_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama(tied=False, seed=0, layers=3)
    model.save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:32].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ts.StoreMismatchError, match=r"model\.norm\.weight.*\(32,\).*\(64,\)"):
        ts.from_pretrained(str(tmp_path / "ck"), ts.Config(tmp_path / "st", vram_budget_gb=0.004))


def test_dtype_on_load_needs_only_the_converted_bytes(tmp_path):
    """bf16 from an fp32 checkpoint is accepted at the smallest budget offload() accepts for
    the bf16 model: a slot holds the bf16 bytes only, not the fp32 read beside them."""
    import re

    ck = _checkpoint(tmp_path, "llama")
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.bfloat16).eval()
    with pytest.raises(ts.BudgetError) as info:
        ts.offload(bf16, ts.Config(tmp_path / "o", vram_budget_gb=1e-6))
    least = int(re.search(r"at least \S+ \((\d+) bytes\)", str(info.value)).group(1))
    model = ts.from_pretrained(
        ck, ts.Config(tmp_path / "st", vram_budget_gb=least / 2**30), dtype=torch.bfloat16
    )
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_tokens = _reference(ck, ids, dtype=torch.bfloat16)
    logits, tokens = _run(model, ids)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    s = ts.get_model_statistics(model)
    assert s["peak_usage_bytes"] <= s["budget_bytes"] == least


def test_a_checkpoint_that_needs_conversion_is_converted_once_and_stores_of_two_checkpoints_coexist(tmp_path):
    cfg = ts.Config(tmp_path / "cache", vram_budget_gb=0.004)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(6))
    ck = _checkpoint(tmp_path / "a", "mixtral", seed=0)
    first = ts.from_pretrained(ck, cfg)
    path = ts.get_model_statistics(first)["store_path"]
    written = os.stat(path).st_mtime_ns
    again = ts.from_pretrained(ck, cfg)
    assert ts.get_model_statistics(again)["store_path"] == path
    assert os.stat(path).st_mtime_ns == written, "the store was written again"
    # Another checkpoint of the same class: its own store beside the first; both stay right.
    other_ck = _checkpoint(tmp_path / "b", "mixtral", seed=1)
    other = ts.from_pretrained(other_ck, cfg)
    assert ts.get_model_statistics(other)["store_path"] != path
    assert len(list((tmp_path / "cache").glob("*.tstore"))) == 2
    # The same checkpoint with other units: a store of its own, not the first one refused.
    blocks = ts.from_pretrained(
        ck, ts.Config(tmp_path / "cache", vram_budget_gb=0.004, units=["MixtralSparseMoeBlock"])
    )
    assert ts.get_model_statistics(blocks)["store_path"] not in (
        path,
        ts.get_model_statistics(other)["store_path"],
    )
    for model, path in ((again, ck), (other, other_ck), (blocks, ck)):
        want, _ = _reference(path, ids)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoint_is_converted_and_bit_identical(tmp_path, sharded):
    """Checkpoints of PyTorch pickles (`pytorch_model.bin`, with an index when sharded), as
    older transformers saved them: converted into a store shard by shard, then streamed."""
    from safetensors.torch import load_file

    st = tmp_path / "st-ckpt"
    BUILDERS["llama"](0).save_pretrained(st, max_shard_size="150KB")
    ck = tmp_path / "bin-ckpt"
    ck.mkdir()
    (ck / "config.json").write_text((st / "config.json").read_text())
    tensors = {}
    for f in sorted(st.glob("*.safetensors")):
        tensors.update(load_file(f))
    if sharded:
        names = sorted(tensors)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        weight_map = {}
        for k, part in enumerate(halves):
            file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
            torch.save({n: tensors[n] for n in part}, ck / file)
            weight_map.update({n: file for n in part})
        (ck / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    else:
        torch.save(tensors, ck / "pytorch_model.bin")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(7))
    ref_logits, ref_tokens = _reference(str(ck), ids)
    model = ts.from_pretrained(str(ck), ts.Config(tmp_path / "cache", vram_budget_gb=0.004))
    logits, tokens = _run(model, ids)
    assert torch.equal(logits, ref_logits) and torch.equal(tokens, ref_tokens)
    assert ts.get_model_statistics(model)["source"] == "store"


def test_a_directory_without_weights_says_what_it_lacks(tmp_path):
    BUILDERS["llama"](0).config.save_pretrained(tmp_path / "empty")
    with pytest.raises(InvalidArgumentError, match="pytorch_model.bin"):
        ts.from_pretrained(str(tmp_path / "empty"), ts.Config(tmp_path / "cache"))


def test_convert_does_not_overwrite_a_file_that_is_not_a_store(tmp_path):
    ck = _checkpoint(tmp_path, "llama")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(InvalidArgumentError, match="not a store"):
        ts.convert(ck, notes, progress=False)
    assert notes.read_text() == "precious"


def test_a_bin_checkpoint_that_cannot_be_read_weights_only_says_what_to_do(tmp_path):
    ck = tmp_path / "bin-ckpt"
    BUILDERS["llama"](0).config.save_pretrained(ck)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "note": object()}, ck / "pytorch_model.bin")
    with pytest.raises(InvalidArgumentError, match="save_pretrained"):
        ts.from_pretrained(str(ck), ts.Config(tmp_path / "cache"))
