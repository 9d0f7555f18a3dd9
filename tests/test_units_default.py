"""Default units: the repeated blocks of every large ModuleList or Sequential, so models with
two towers (CLIP; T5, BART and Whisper; a vision-language model) stream both. With them, a
budget of half the model gives outputs identical to the model in memory and is never
exceeded; and from_pretrained accepts the budgets offload() accepts for the same checkpoint.

Every model is a tiny config with seeded random weights, built locally (no downloads)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import PAGE, GiB
from torch import nn

import tensorstream as ts

transformers = pytest.importorskip("transformers")


def _build(cls, cfg, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cls(cfg).eval()


def tiny_clip(seed: int = 0) -> nn.Module:
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
        projection_dim=16,
    )
    return _build(transformers.CLIPModel, cfg, seed)


def tiny_t5(seed: int = 0) -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return _build(transformers.T5ForConditionalGeneration, cfg, seed)


def tiny_bart(seed: int = 0) -> nn.Module:
    cfg = transformers.BartConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
    )
    return _build(transformers.BartForConditionalGeneration, cfg, seed)


def tiny_whisper(seed: int = 0) -> nn.Module:
    cfg = transformers.WhisperConfig(
        vocab_size=99,
        d_model=32,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=32,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    return _build(transformers.WhisperForConditionalGeneration, cfg, seed)


LLAVA_IMAGE_TOKEN = 127


def tiny_llava(seed: int = 0) -> nn.Module:
    cfg = transformers.LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
            projection_dim=16,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        ),
        image_token_index=LLAVA_IMAGE_TOKEN,
        vision_feature_layer=-1,
    )
    return _build(transformers.LlavaForConditionalGeneration, cfg, seed)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def _text_ids() -> torch.Tensor:
    return torch.randint(3, 99, (2, 7), generator=_gen())


def _pixels() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=_gen())


@torch.no_grad()
def _greedy(model: nn.Module, *args, **kwargs) -> torch.Tensor:
    return model.generate(*args, max_new_tokens=4, min_new_tokens=4, do_sample=False, **kwargs)


@torch.no_grad()
def _clip_outputs(model: nn.Module) -> list:
    out = model(input_ids=_text_ids(), pixel_values=_pixels())
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


@torch.no_grad()
def _seq2seq_outputs(model: nn.Module) -> list:
    ids = _text_ids()
    logits = model(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
    return [logits, _greedy(model, ids, attention_mask=torch.ones_like(ids))]


@torch.no_grad()
def _whisper_outputs(model: nn.Module) -> list:
    features = torch.randn(2, 8, 32, generator=_gen())  # mel bins x (2 x max_source_positions) frames
    logits = model(input_features=features, decoder_input_ids=torch.tensor([[1, 5, 6, 7]] * 2)).logits
    return [logits, _greedy(model, features)]


@torch.no_grad()
def _llava_outputs(model: nn.Module) -> list:
    ids = torch.tensor([[1] + [LLAVA_IMAGE_TOKEN] * 16 + [5, 6, 7]] * 2)  # 16 patches of 4x4 in 16x16
    pixels = _pixels()
    logits = model(input_ids=ids, pixel_values=pixels).logits
    return [logits, _greedy(model, input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))]


# name: (builder, outputs, auto class for from_pretrained, the containers whose blocks are units)
MODELS = {
    "clip": (
        tiny_clip,
        _clip_outputs,
        "AutoModel",
        ["text_model.encoder.layers", "vision_model.encoder.layers"],
    ),
    "t5": (tiny_t5, _seq2seq_outputs, "AutoModelForSeq2SeqLM", ["encoder.block", "decoder.block"]),
    "bart": (
        tiny_bart,
        _seq2seq_outputs,
        "AutoModelForSeq2SeqLM",
        ["model.encoder.layers", "model.decoder.layers"],
    ),
    "whisper": (
        tiny_whisper,
        _whisper_outputs,
        "AutoModelForSpeechSeq2Seq",
        ["model.encoder.layers", "model.decoder.layers"],
    ),
    "llava": (
        tiny_llava,
        _llava_outputs,
        "AutoModelForImageTextToText",
        ["model.vision_tower.encoder.layers", "model.language_model.layers"],
    ),
}


def _budget_gb(nbytes: int) -> float:
    return nbytes / GiB  # exact: Config.budget_bytes gives back `nbytes`


@pytest.mark.parametrize("kind", list(MODELS))
def test_default_units_are_the_blocks_of_both_towers_in_model_order(tmp_path, kind):
    build, _, _, containers = MODELS[kind]
    model = build()
    mods = dict(model.named_modules())
    expected = [f"{c}.{i}" for c in containers for i in range(len(mods[c]))]
    model = ts.offload(
        model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(ts.estimate_model_memory(model) // 2))
    )
    units = model._tensorstream.units
    names = [u.name for u in units]
    # Every block of every tower is a unit, numbered in model order; embeddings, norms and
    # heads may follow as extra units, never before or between the blocks.
    assert names[: len(expected)] == expected, names
    for u, name in zip(units, expected):
        assert u.modules == [mods[name]]
        assert u.index == names.index(name)


@pytest.mark.parametrize("kind", list(MODELS))
def test_half_the_model_as_budget_gives_identical_outputs_within_the_budget(tmp_path, kind):
    build, outputs, _, _ = MODELS[kind]
    expected = outputs(build())
    model = build()
    budget = ts.estimate_model_memory(model) // 2
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(budget)))
    for _ in range(2):  # the second time with the order the planner learned
        got = outputs(model)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    s = ts.get_model_statistics(model)
    assert s["budget_bytes"] == budget
    assert s["peak_usage_bytes"] <= s["budget_bytes"]
    assert s["resident_layers"] < s["units"]  # the budget forced streaming
    assert s["bytes_read"] > sum(s["unit_bytes"])


# ------------------------------------------------------------ the rule, on plain modules


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Towers(nn.Module):
    """A large stack, a smaller tower (a fifth of its bytes), a tiny tower (under 1%) and
    lists that are not blocks: two norms, two linear heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stack = nn.ModuleList(Block(64) for _ in range(4))
        self.tower = nn.ModuleList(Block(32) for _ in range(3))
        self.tiny = nn.ModuleList(Block(2) for _ in range(2))
        self.norms = nn.ModuleList(nn.LayerNorm(64) for _ in range(2))
        self.heads = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))
        self.down = nn.Linear(64, 32)
        self.scale = nn.Parameter(torch.ones(()))  # held by the model itself, beside children

    def forward(self, x):
        for b in self.stack:
            x = b(x)
        y = self.down(self.norms[0](x))
        for b in self.tower:
            y = b(y)
        z = x[..., :2]
        for b in self.tiny:
            z = b(z)
        return self.scale * (self.heads[0](self.norms[1](x)) + self.heads[1](x)), y, z


def test_small_towers_norm_lists_and_head_lists_are_not_default_units(tmp_path):
    ref, model = Towers().eval(), Towers().eval()
    x = torch.randn(3, 64, generator=_gen())
    with torch.no_grad():
        expected = ref(x)
    model = ts.offload(
        model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(ts.estimate_model_memory(model) // 2))
    )
    names = [u.name for u in model._tensorstream.units]
    blocks = [n for n in names if n.split(".")[0] in ("stack", "tower", "tiny")]
    assert blocks == [f"stack.{i}" for i in range(4)] + [f"tower.{i}" for i in range(3)], names
    # Only bare layers are extra units: the model's own parameter stays resident.
    assert "" not in names and not any(n.startswith(("stack", "tower")) for n in names[7:]), names
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x), expected))


def test_a_plain_sequential_of_layers_still_streams_its_layers(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    model = ts.offload(model, ts.Config(tmp_path))
    assert [u.name for u in model._tensorstream.units] == ["0", "2", "4"]


# ------------------------------------------------------------ from_pretrained's budgets


def _minimum(offload_budget_error: ts.BudgetError) -> int:
    """The smallest budget, from a BudgetError: "Raise vram_budget_gb to at least X (N bytes)"."""
    return int(re.search(r"at least \S+ \((\d+) bytes\)", str(offload_budget_error)).group(1))


def _from_pretrained(path, storage, budget: int, auto_class: str):
    return ts.from_pretrained(
        str(path),
        ts.Config(storage, vram_budget_gb=_budget_gb(budget)),
        auto_class=getattr(transformers, auto_class),
        dtype=torch.float32,
    )


@pytest.mark.parametrize("kind", list(MODELS))
def test_from_pretrained_accepts_the_budgets_offload_accepts(tmp_path, kind):
    build, outputs, auto_class, _ = MODELS[kind]
    model = build()
    total = ts.estimate_model_memory(model)
    model.save_pretrained(tmp_path / "ck")
    expected = outputs(build())

    with pytest.raises(ts.BudgetError) as info:
        ts.offload(build(), ts.Config(tmp_path / "tiny", vram_budget_gb=_budget_gb(PAGE)))
    least = _minimum(info.value)
    with pytest.raises(ts.BudgetError):
        ts.offload(build(), ts.Config(tmp_path / "o", vram_budget_gb=_budget_gb(least - 1)))
    ts.offload(build(), ts.Config(tmp_path / "o", vram_budget_gb=_budget_gb(least)))

    # Half and 70% of the model: T5's tied embedding, streamed as one unit, made these fail.
    for budget in (total // 2, total * 7 // 10):
        ts.offload(build(), ts.Config(tmp_path / "o", vram_budget_gb=_budget_gb(budget)))
        streamed = _from_pretrained(tmp_path / "ck", tmp_path / "f", budget, auto_class)
        assert all(torch.equal(a, b) for a, b in zip(outputs(streamed), expected))
        s = ts.get_model_statistics(streamed)
        assert s["peak_usage_bytes"] <= s["budget_bytes"] == budget

    # Read in place, a unit spans whole 4 KiB pages of the file (safetensors offsets are
    # unaligned): at offload's own minimum that may not fit, and from_pretrained then converts
    # the checkpoint into a store, whose units have offload()'s sizes. Below it, it refuses
    # without converting.
    with pytest.raises(ts.BudgetError):
        _from_pretrained(tmp_path / "ck", tmp_path / "below", least - 1, auto_class)
    assert not list((tmp_path / "below").glob("*.tstore")), "converted for a budget no store fits"
    streamed = _from_pretrained(tmp_path / "ck", tmp_path / "least", least, auto_class)
    assert all(torch.equal(a, b) for a, b in zip(outputs(streamed), expected))
    s = ts.get_model_statistics(streamed)
    assert s["peak_usage_bytes"] <= s["budget_bytes"] == least


# ------------------------------------------------------------ what ADAPTIVE learns


@pytest.mark.parametrize("kind", ["t5", "llava"])
def test_adaptive_learns_the_decoding_pass_when_generate_runs_a_tower_outside_the_forward(tmp_path, kind):
    # generate() runs T5's encoder, and Llava's vision tower on the prompt, outside the
    # model's forward and before its first pass: learned as the order every pass repeats,
    # they were kept resident while the decoding passes streamed everything else.
    build, outputs, _, containers = MODELS[kind]
    expected = outputs(build())
    model = build()
    budget = ts.estimate_model_memory(model) * 85 // 100
    model = ts.offload(model, ts.Config(tmp_path, vram_budget_gb=_budget_gb(budget)))
    assert all(torch.equal(a, b) for a, b in zip(outputs(model), expected))
    rt = model._tensorstream
    first_tower = {u.index for u in rt.units if u.name.startswith(containers[0] + ".")}
    decoding = {u.index for u in rt.units if u.name.startswith(containers[1] + ".")}
    learned = rt.planner.learned_order()
    assert learned is not None and decoding <= set(learned), (learned, decoding)
    assert not first_tower & set(learned), learned
    assert not first_tower & set(rt.planner.kept())
    if kind == "t5":  # the budget keeps a decoder block beside the window
        assert rt.planner.kept() and set(rt.planner.kept()) <= decoding
