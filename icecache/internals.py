"""The engine's parts that tools (benchmarks, profilers) drive directly, below the public
API (`from icecache import Engine, IceCacheConfig, SamplingParams`): a request's KV state,
the static decoder (and its joint step over several contexts), a context built from given
KV and the layout a context is indexed for, one page query, one sparse attention kernel,
the decode step's page choice kernels (the tree walk and the ranking by key moments), the
prefill's attention over earlier keys (its split-key kernel, and a switch back to cuDNN for
every shape). They may change between releases; a tool imports them from here, never from
the modules behind them (tests/test_layering.py checks the benchmarks do)."""

from __future__ import annotations

from icecache.attention.torch_backend import attention_lse, cudnn_for_every_shape
from icecache.cache import RequestKV, StepBatch
from icecache.context import build_context, layout_of
from icecache.index.select import select_pages
from icecache.static_decode import JointStep, StaticDecoder

__all__ = ["JointStep", "RequestKV", "StaticDecoder", "StepBatch", "attention_lse", "build_context",
           "cudnn_for_every_shape", "layout_of", "prefix_attention_lse", "rank_pages", "select_pages",
           "sparse_attention", "walk_tree"]


def __getattr__(name: str):
    if name in ("sparse_attention", "prefix_attention_lse"):  # Triton kernels: imported (and triton with them)
        from icecache.kernels import attention  # only when asked for
        return getattr(attention, name)
    if name in ("walk_tree", "rank_pages"):
        from icecache.kernels import walk
        return getattr(walk, name)
    raise AttributeError(f"module 'icecache.internals' has no attribute {name!r}")
