"""Attention backends: exact chunked prefill and sparse decode over [sinks, pages, window]."""

from icecache.attention.torch_backend import (Spans, attend_parts, attention_lse, attention_merged, decode_attention,
                                             merge_attention, packed_causal_lse, prefill_attention,
                                             prefill_attention_parts, unselected_part)

__all__ = ["Spans", "attend_parts", "attention_lse", "attention_merged", "decode_attention", "merge_attention",
           "packed_causal_lse", "prefill_attention", "prefill_attention_parts", "unselected_part"]
