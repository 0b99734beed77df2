"""On a GPU: a context in a read-only shm segment, page-locked with CUDA, decodes exactly
like the engine's own copy. Needs no Ray (run on the device with -m gpu)."""

import os
import uuid

import pytest
import torch

from cluster import shm
from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.testing import random_model, tiny_config
from icecache.packing import pack_into, packed_size, unpack

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_registered_read_only_segment_decodes_like_the_original():
    device = torch.device("cuda")
    engine = Engine.from_model(random_model(tiny_config("llama"), device, torch.float32),
                               config=IceCacheConfig(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4,
                                                     dense_layers=1))
    ctx = engine.index(torch.randint(0, 500, (600,), generator=torch.Generator().manual_seed(0)).tolist())
    name = shm.segment_name(os.getpid(), uuid.uuid4().hex, 0)
    shm.create(name, packed_size(ctx))
    try:
        writer = shm.Mapping(name, writable=True)
        pack_into(ctx, writer.view)
        writer.close()
        reader = shm.Mapping(name)
        reader.register_cuda()
        mapped = unpack(reader.view)
        params = SamplingParams(max_tokens=12, temperature=0.0)
        assert engine.generate([5, 6, 7], params, context=mapped).token_ids == \
            engine.generate([5, 6, 7], params, context=ctx).token_ids
        page = mapped.sparse[1].pages.keys[:, :2]
        assert torch.equal(page.to(device, non_blocking=True).cpu(), ctx.sparse[1].pages.keys[:, :2].cpu())
        del mapped, page
        reader.close()
    finally:
        shm.unlink(name)
