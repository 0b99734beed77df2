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


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The built-in SmolLM2-135M-Instruct, real weights, IceCache at a 256-token budget."""
    return Engine.from_pretrained(config=IceCacheConfig(token_budget=256), device="cpu")


@pytest.fixture(scope="session")
def full_engine(engine) -> Engine:
    return engine.with_config(IceCacheConfig(mode="full"))
