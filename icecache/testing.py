"""Random-weight models of the supported architectures, for tests and benchmarks (timing
and memory do not depend on weight values; nothing is downloaded). The one surface of
the library made for tools rather than for serving."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from icecache.models import default_dtype, prepare


def tiny_config(arch: str, vocab_size: int = 512, **overrides):
    """A small config of one of the supported architectures."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if arch not in classes:
        raise ValueError(f"arch: unknown {arch!r}, expected one of {sorted(classes)}")
    values = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                  rope_theta=10000.0, tie_word_embeddings=False)
    if arch == "mistral":
        values["sliding_window"] = None
    values.update(overrides)
    return classes[arch](**values)


def random_model(config, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0):
    """A randomly initialised model from a config (seeded), ready for the engine."""
    torch.manual_seed(seed)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype or default_dtype(device))
    return prepare(hf_model, device)
