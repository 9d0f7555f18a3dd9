"""Advanced configuration: every field of `tensorstream.Config`, what it does, and what the
run actually used (the backend after any fallback, the compression, the layers kept).

The model is a small Llama built locally from a config with seeded random weights (no
download). It runs on CPU, or on CUDA when a GPU is present.

    python examples/advanced_configuration.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tensorstream
from tensorstream import BackendType, MemoryPressureMode, PrefetchStrategy


def build_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main() -> int:
    torch.set_num_threads(1)  # a model this small gains nothing from more threads (leave out for real models)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    generate = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    reference = build_model().to(device)
    with torch.no_grad():
        expected = reference.generate(prompt, **generate)
    size = tensorstream.estimate_model_memory(reference)
    del reference

    with tempfile.TemporaryDirectory() as storage:
        defaults = tensorstream.create_default_config(storage)  # every field at its default
        print(
            f"defaults: backend={defaults.backend.value}, prefetch_strategy={defaults.prefetch_strategy.value}, "
            f"memory_pressure_mode={defaults.memory_pressure_mode.value}, num_io_threads={defaults.num_io_threads}"
        )
        try:
            tensorstream.Config(storage, compression_level=12)
        except tensorstream.ConfigError as error:  # a ValueError naming the field and what is allowed
            print(f"invalid value refused: {error}")

        config = tensorstream.Config(
            storage_path=storage,  # directory of the store (written on the first offload, then reused)
            vram_budget_gb=0.4
            * size
            / 2**30,  # GiB of weights on the device; None: a default from free memory
            backend=BackendType.AUTO,  # auto, cuda, gpudirect, mmap or pread (strings work too)
            prefetch_strategy=PrefetchStrategy.ADAPTIVE,  # none, next_layer, or adaptive (learns the order)
            compression_enabled=True,  # store the layers losslessly compressed (outputs stay identical)
            compression_level=3,  # 1 to 9: higher tries harder where zstd is used
            num_io_threads=4,  # I/O worker threads reading (and decoding) layers
            memory_pressure_mode=MemoryPressureMode.AGGRESSIVE,  # conservative, balanced, or aggressive (2 ahead)
            debug_mode=False,  # True: log every layer access at DEBUG level (logger "tensorstream")
            progress=None,  # progress bar on stderr while the store is written; None: when stderr is a terminal
            host_cache_gb=None,  # CUDA: pinned host RAM keeping layers off the disk; None: 40% of free RAM
            units=[
                "LlamaDecoderLayer"
            ],  # what is streamed, by class or module name; None: the largest ModuleList
            overwrite_store=True,  # replace a store written for other weights instead of raising
            store_name="tiny-llama.tstore",  # file name under storage_path; None: the model's class name
            chunk_mb=8,  # size of each read request in MiB (a multiple of 4)
        )
        events = []
        tensorstream.set_memory_pressure_callback(events.append)  # called when a load must evict
        model = tensorstream.offload(build_model(), config).to(device)
        with torch.no_grad():
            tokens = model.generate(prompt, **generate)
        tensorstream.set_memory_pressure_callback(None)

        s = tensorstream.get_model_statistics(model)
        print(f"backend: asked {s['requested_backend']}, used {s['backend']}")
        print(f"fallbacks: {s['fallbacks'] or 'none'}")
        print(f"prefetch: {s['prefetch_strategy']}, memory pressure mode: {s['memory_pressure_mode']}")
        print(f"store: {s['store_path'].rsplit('/', 1)[-1]}, compression ratio {s['compression_ratio']:.2f}")
        print(f"budget {s['budget_bytes'] / 1e6:.1f} MB, peak held {s['peak_usage_bytes'] / 1e6:.1f} MB")
        print(f"layers kept resident: {s['kept_layers']} of {s['units']}")
        print(f"memory pressure events: {len(events)}" + (f", the first: {events[0]}" if events else ""))

    same = torch.equal(tokens, expected)
    print(f"generated tokens identical to the model in memory: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
