"""The engine's parts that tools (benchmarks, profilers) drive directly, below the public
API (`from icecache import Engine, IceCacheConfig, SamplingParams`): a request's KV state,
the static decoder, a context built from given KV and the layout a context is indexed
for, one page query, one sparse attention kernel. They may change between releases; a
tool imports them from here, never from the modules behind them (tests/test_layering.py
checks the benchmarks do)."""

from __future__ import annotations

from icecache.cache import RequestKV, StepBatch
from icecache.context import build_context, layout_of
from icecache.index.select import select_pages
from icecache.static_decode import StaticDecoder

__all__ = ["RequestKV", "StaticDecoder", "StepBatch", "build_context", "layout_of", "select_pages", "sparse_attention"]


def __getattr__(name: str):
    if name == "sparse_attention":  # a Triton kernel: imported (and triton with it) only when asked for
        from icecache.kernels.attention import sparse_attention
        return sparse_attention
    raise AttributeError(f"module 'icecache.internals' has no attribute {name!r}")
