import importlib.util
import inspect
import os
import shutil

# No GPU here: the Triton kernels run in Triton's interpreter, which has to be chosen
# before torch (which imports triton) is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from icecache import Engine, IceCacheConfig

torch.set_num_threads(max(1, torch.get_num_threads()))


def _patch_triton_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language (an inspect.getmembers over its modules)
    at every launch, which is needed, and again at every call of a @triton.jit helper inside
    the launch, where the launch's patch is already in place: a third of the interpreted
    decode-step tests' time (25 of 77 s in one). A helper whose language modules are all
    patched now runs under the launch's patch; the launch still patches, and restores, as
    before. Where the interpreter's internals differ (another Triton), nothing changes."""
    from triton.runtime import interpreter
    import triton.language as tl
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope")):
        return
    patch = interpreter._patch_lang

    def patch_unless_patched(fn):
        langs = [value for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(getattr(lang, "load", None)) for lang in langs):
            return interpreter._LangPatchScope()  # inside a launch: nothing to patch, nothing to restore
        return patch(fn)
    interpreter._patch_lang = patch_unless_patched


if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    _patch_triton_language_once_per_launch()


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The built-in SmolLM2-135M-Instruct, real weights, IceCache at a 256-token budget."""
    return Engine.from_pretrained(config=IceCacheConfig(token_budget=256), device="cpu")


@pytest.fixture(scope="session")
def full_engine(engine) -> Engine:
    return engine.with_config(IceCacheConfig(mode="full"))
