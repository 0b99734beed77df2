"""Attention backends: exact chunked prefill and sparse decode over [sinks, pages, window]."""

from icecache.attention.torch_backend import decode_attention, prefill_attention, prefill_attention_parts

__all__ = ["decode_attention", "prefill_attention", "prefill_attention_parts"]
