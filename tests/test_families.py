"""from_pretrained of every family transformers loads, through transformers' own loading rules:
for each family a tiny model is built from a config with seeded weights and saved sharded with
`save_pretrained` (which writes the checkpoint's own names: GPT-NeoX's `embed_out`, experts
stored one by one); `tensorstream.from_pretrained` at half the model's size as budget must give
outputs `torch.equal` to transformers' `from_pretrained` of the same checkpoint."""

from __future__ import annotations

import pytest
import torch

import tensorstream as ts

transformers = pytest.importorskip("transformers")

H, V = 64, 128  # hidden size, vocabulary
DEC = dict(
    hidden_size=H, intermediate_size=128, num_attention_heads=4, vocab_size=V, max_position_embeddings=64
)
MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def _causal(cfg_cls, layers=6, **kw):
    return cfg_cls, dict(DEC, num_hidden_layers=layers, **kw), "causal"


# name -> (config class name, config kwargs, kind)
FAMILIES = {
    "llama": _causal("LlamaConfig", num_key_value_heads=2),
    "mistral": _causal("MistralConfig", num_key_value_heads=2),
    "mixtral": _causal("MixtralConfig", num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
    "qwen2": _causal("Qwen2Config", num_key_value_heads=2),
    "qwen2_moe": _causal("Qwen2MoeConfig", shared_expert_intermediate_size=64, num_key_value_heads=2, **MOE),
    "qwen3_moe": _causal("Qwen3MoeConfig", num_key_value_heads=2, head_dim=16, **MOE),
    "deepseek_v3": _causal(
        "DeepseekV3Config",
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    "gpt_neox": _causal("GPTNeoXConfig", tie_word_embeddings=False),
    "gemma2": _causal("Gemma2Config", num_key_value_heads=2, head_dim=16),
    "gemma3": _causal("Gemma3TextConfig", num_key_value_heads=2, head_dim=16),
    "phi3": _causal("Phi3Config", num_key_value_heads=2, pad_token_id=0),
    "falcon": _causal("FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    "starcoder2": _causal("Starcoder2Config", num_key_value_heads=2),
    "stablelm": _causal("StableLmConfig", num_key_value_heads=2),
    "olmoe": _causal("OlmoeConfig", num_experts=8, num_experts_per_tok=2, num_key_value_heads=2),
    "qwen3": _causal("Qwen3Config", num_key_value_heads=2, head_dim=16),
    "granite": _causal("GraniteConfig", num_key_value_heads=2),
    "cohere": _causal("CohereConfig", num_key_value_heads=2),
    "olmo2": _causal("Olmo2Config", num_key_value_heads=2),
    "phi": _causal("PhiConfig"),
    "phimoe": _causal("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2),
    "granitemoe": _causal(
        "GraniteMoeConfig", num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2
    ),
    "jamba": _causal(
        "JambaConfig",
        num_experts=4,
        num_experts_per_tok=2,
        num_key_value_heads=2,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=8,
        use_mamba_kernels=False,
    ),
    "gpt2": ("GPT2Config", dict(n_embd=H, n_layer=6, n_head=4, vocab_size=V, n_positions=64), "causal"),
    "gptj": (
        "GPTJConfig",
        dict(n_embd=H, n_layer=6, n_head=4, vocab_size=V, n_positions=64, rotary_dim=8),
        "causal",
    ),
    "bloom": ("BloomConfig", dict(hidden_size=H, n_layer=6, n_head=4, vocab_size=V), "causal"),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=H,
            ffn_dim=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            vocab_size=V,
            max_position_embeddings=64,
            word_embed_proj_dim=H,
        ),
        "causal",
    ),
    "mamba": ("MambaConfig", dict(hidden_size=H, state_size=8, num_hidden_layers=6, vocab_size=V), "causal"),
    "t5": (
        "T5Config",
        dict(
            d_model=H,
            d_ff=128,
            d_kv=16,
            num_heads=4,
            num_layers=4,
            num_decoder_layers=4,
            vocab_size=V,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    "bart": (
        "BartConfig",
        dict(
            d_model=H,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            vocab_size=V,
            max_position_embeddings=64,
        ),
        "seq2seq",
    ),
    "whisper": (
        "WhisperConfig",
        dict(
            d_model=H,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_layers=4,
            decoder_layers=4,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            vocab_size=V,
            num_mel_bins=16,
            max_source_positions=32,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
        ),
        "speech",
    ),
    "bert": (
        "BertConfig",
        dict(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            vocab_size=V,
            max_position_embeddings=64,
        ),
        "encoder",
    ),
    "roberta": (
        "RobertaConfig",
        dict(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            vocab_size=V,
            max_position_embeddings=64,
        ),
        "encoder",
    ),
    "vit": (
        "ViTConfig",
        dict(
            hidden_size=H,
            intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        "image",
    ),
    "clip": (
        "CLIPConfig",
        dict(
            text_config=dict(
                hidden_size=H,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                vocab_size=V,
                max_position_embeddings=16,
            ),
            vision_config=dict(
                hidden_size=H,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        ),
        "clip",
    ),
    "llava": (
        "LlavaConfig",
        dict(
            text_config=dict(model_type="llama", **DEC, num_hidden_layers=6, num_key_value_heads=2),
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=H,
                intermediate_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            ),
            image_token_id=V - 1,
        ),
        "vlm",
    ),
}

AUTO = {
    "causal": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "speech": "AutoModelForSpeechSeq2Seq",
    "encoder": "AutoModelForMaskedLM",
    "image": "AutoModelForImageClassification",
    "clip": "AutoModel",
    "vlm": "AutoModelForImageTextToText",
}


def _build(name: str):
    cfg_name, kw, kind = FAMILIES[name]
    cfg = getattr(transformers, cfg_name)(**kw)
    torch.manual_seed(0)
    return seeded(getattr(transformers, AUTO[kind]).from_config(cfg).eval()), kind


def seeded(model):
    """`model` with seeded random values everywhere (some families initialise norms and
    biases to constants)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(model, kind: str) -> dict:
    g = torch.Generator().manual_seed(2)
    if kind in ("causal", "encoder"):
        return {"input_ids": torch.randint(3, V, (2, 7), generator=g)}
    if kind == "seq2seq":
        return {
            "input_ids": torch.randint(3, V, (2, 7), generator=g),
            "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g),
        }
    if kind == "speech":
        c = model.config
        return {
            "input_features": torch.randn(2, c.num_mel_bins, 2 * c.max_source_positions, generator=g),
            "decoder_input_ids": torch.randint(3, V, (2, 5), generator=g),
        }
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    if kind == "clip":
        return {"input_ids": torch.randint(3, V, (2, 7), generator=g), "pixel_values": pixels}
    # vlm: each image becomes 16 patch tokens (32 / 8 squared) at the image token's place
    text = torch.randint(3, V - 1, (2, 6), generator=g)
    image = torch.full((2, 16), model.config.image_token_id)
    return {"input_ids": torch.cat([text[:, :2], image, text[:, 2:]], 1), "pixel_values": pixels}


def _outputs(model, kind: str, inputs: dict) -> list:
    with torch.no_grad():
        out = model(**inputs)
        res = [out.logits_per_image, out.text_embeds, out.image_embeds] if kind == "clip" else [out.logits]
        if kind in ("causal", "seq2seq", "speech", "vlm"):
            gen = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
            res.append(model.generate(**gen, max_new_tokens=4, do_sample=False))
    return res


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_from_pretrained_is_bit_identical_at_half_budget(tmp_path, name):
    model, kind = _build(name)
    ck = tmp_path / "ckpt"
    model.save_pretrained(ck, max_shard_size="200KB")
    size = ts.estimate_model_memory(model)
    del model
    ref = type(_build(name)[0]).from_pretrained(ck).eval()
    inputs = _inputs(ref, kind)
    want = _outputs(ref, kind, inputs)
    streamed = ts.from_pretrained(str(ck), ts.Config(tmp_path / "st", vram_budget_gb=0.5 * size / 2**30))
    assert type(streamed) is type(ref)
    # as transformers gives them: some kernels choose their path by requires_grad
    assert [p.requires_grad for p in streamed.parameters()] == [p.requires_grad for p in ref.parameters()]
    got = _outputs(streamed, kind, inputs)
    for w, g in zip(want, got):
        assert torch.equal(w, g), (name, (w.float() - g.float()).abs().max())
    s = ts.get_model_statistics(streamed)
    assert s["bytes_read"] > 0 and s["peak_usage_bytes"] <= s["budget_bytes"]
