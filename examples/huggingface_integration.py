"""Hugging Face integration: `tensorstream.from_pretrained` on a sharded checkpoint, then
`generate`, a `transformers.pipeline("text-generation")` and assisted generation, each
compared token for token with the model loaded by transformers into memory.

Everything is made locally, nothing is downloaded: a word-level tokenizer trained on a few
sentences, and a small Llama with seeded random weights saved in shards with
`save_pretrained(..., max_shard_size=...)`. The layers then stream from those safetensors
shards where they lie. Runs on CPU, or on CUDA when a GPU is present.

    python examples/huggingface_integration.py
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    pipeline,
)

import tensorstream

TEXT = [
    "the model streams its layers from the disk",
    "each layer is read just in time and the output stays the same",
    "a budget keeps the memory small while the tokens are generated",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on TEXT: no download, a vocabulary of a few dozen words."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def build_model(tokenizer, layers: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def report(what: str, offloaded, in_memory) -> bool:
    same = torch.equal(torch.as_tensor(offloaded), torch.as_tensor(in_memory))
    print(f"{what}: tokens identical to the model in memory: {same}")
    return same


def main() -> int:
    torch.set_num_threads(1)  # a model this small gains nothing from more threads (leave out for real models)
    transformers.logging.set_verbosity_error()  # keep the output short: no progress bars or notices
    transformers.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory() as work:
        checkpoint = os.path.join(work, "tiny-llama")
        build_model(tokenizer, layers=8, seed=0).save_pretrained(checkpoint, max_shard_size="2MB")
        tokenizer.save_pretrained(checkpoint)
        shards = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
        print(f"checkpoint: {len(shards)} safetensors shards, tokenizer of {len(tokenizer)} words")

        in_memory = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
        size = tensorstream.estimate_model_memory(in_memory)
        config = tensorstream.Config(os.path.join(work, "store"), vram_budget_gb=0.5 * size / 2**30)
        model = tensorstream.from_pretrained(checkpoint, config, dtype=torch.float32).to(device)
        s = tensorstream.get_model_statistics(model)
        where = "the checkpoint's shards" if s["source"] == "safetensors" else "a store"
        print(
            f"from_pretrained: {s['units']} layers stream from {where}, budget {s['budget_bytes'] / 1e6:.1f} MB"
        )

        ids = tokenizer("the model streams each layer", return_tensors="pt").input_ids.to(device)
        options = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        same = []
        with torch.no_grad():
            out = model.generate(ids, **options)
            same.append(report("generate", out, in_memory.generate(ids, **options)))
            print(f"  {tokenizer.decode(out[0])!r} (random weights: arbitrary words)")

            generated = {}
            for name, m in (("offloaded", model), ("in memory", in_memory)):
                pipe = pipeline("text-generation", model=m, tokenizer=tokenizer)
                result = pipe("a budget keeps", max_new_tokens=12, do_sample=False, return_tensors=True)
                generated[name] = result[0]["generated_token_ids"]
            same.append(report("pipeline", generated["offloaded"], generated["in memory"]))
            print(f"  {tokenizer.decode(generated['offloaded'])!r}")

            assistant = build_model(tokenizer, layers=1, seed=1).to(device)  # a small draft model
            out = model.generate(ids, assistant_model=assistant, **options)
            same.append(
                report(
                    "assisted generation", out, in_memory.generate(ids, assistant_model=assistant, **options)
                )
            )

        s = tensorstream.get_model_statistics(model)
        print(
            f"read from the checkpoint: {s['bytes_read'] / 1e6:.1f} MB; peak weights held {s['peak_usage_bytes'] / 1e6:.1f} MB"
        )

    return 0 if all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
