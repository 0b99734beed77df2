"""Attention in plain torch: runs on any device, and is the reference the GPU kernels
are checked against."""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def prefill_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of a chunk over everything before it plus itself (causal).

    q: [Hq, T, D]; past_k/v: [H, N, D]; k/v: [H, T, D] -> [T, Hq, D].
    The score matrix is [Hq, T, N + T]: bounded by the chunk, not the document.
    """
    T, N = q.shape[1], past_k.shape[1]
    keys = torch.cat([past_k, k], dim=1)[None]  # [1, H, N + T, D]
    values = torch.cat([past_v, v], dim=1)[None]
    causal = torch.ones(T, N + T, dtype=torch.bool, device=q.device).tril(diagonal=N)
    out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=causal, scale=scaling,
                                         enable_gqa=True)  # [1, Hq, T, D]
    return out[0].transpose(0, 1)


_CUDNN_REFUSED: set[tuple] = set()  # (shape, dtype, causal) cases cuDNN's attention rejected here
# A KV head's rows (query heads x tokens) up to which a prefill's attention over earlier keys
# runs as the split-key Triton kernel (kernels.attention.prefix_attention_lse), no per-shape plan
KERNEL_ROWS = 1024
SMALL_CAUSAL = 1024  # tokens up to which a pack's causal part runs as the variable-length flash kernel
_KERNEL_REFUSED: list[str] = []  # why the kernel could not build or run in this process, if it could not


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with its log-sum-exp: q [1, H, T, D], k/v [1, H, S, D] (as many
    heads) -> (out [1, H, T, D], lse [1, H, T] fp32). causal: top-left (S == T).

    On a CUDA GPU in 16-bit, cuDNN's fused attention first: on an H200 it runs these
    shapes 1.8-1.9x faster than the flash kernel torch ships (FlashAttention-2), as fast
    as flashinfer's FA3 (benchmarks/RESULTS.md), and it is what transformers' own SDPA
    prefill uses there. A case cuDNN rejects falls back to the flash kernel from then on."""
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            case = (q.shape, k.shape, q.dtype, causal)
            if case not in _CUDNN_REFUSED:
                try:
                    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                             scale=scaling)
                    return out[0], out[1].reshape(q.shape[:3])  # cuDNN's lse is [1, H, T, 1]
                except RuntimeError:
                    _CUDNN_REFUSED.add(case)
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
        else:
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scaling)
        return out[0], out[1][..., :q.shape[2]]  # the efficient kernel pads lse to a block of rows
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scaling)
    return out[0], out[1]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention of q over one KV part, with its log-sum-exp (for merge_attention).

    q: [Hq, T, D]; k/v: [H, S, D] on q's device, Hq a multiple of H (GQA) -> (out [Hq, T, D]
    in q's dtype, lse [Hq, T] fp32). causal: top-left, S == T (a chunk over itself). Not
    causal: a KV head's g query heads attend as g * T rows of one head, so the part is
    never repeated per query head."""
    Hq, T, D = q.shape
    H = k.shape[0]
    g = Hq // H
    if causal:
        out, lse = _attention_lse(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None], True,
                                  scaling)
        return out[0], lse[0]
    split_keys = _split_key_attention(q, k, v, scaling, ())
    if split_keys is not None:
        return split_keys
    out, lse = _attention_lse(q.reshape(H, g * T, D)[None], k[None], v[None], False, scaling)
    return out[0].reshape(Hq, T, D), lse[0].reshape(Hq, T)


class Spans(NamedTuple):
    """A pack's own keys for its causal part: each span of `lengths` rows attends causally to
    itself. k/v [H, T, D]; offsets: the spans' starts and end (packed_causal_lse's); start:
    each row's span start [T] int32 (the split-key kernel's), both on the device."""
    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int]
    offsets: torch.Tensor
    start: torch.Tensor


def attention_merged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                     others: list[tuple[torch.Tensor, torch.Tensor]],
                     spans: Spans | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' attention over k/v (not causal) merged with `others`, parts of the same rows
    over other keys as attention_lse gives them (at most two), and with the rows' causal
    part over their own spans' keys if given: (out [Hq, T, D] over all the keys, lse [Hq, T]
    over k/v alone). merge_attention([packed_causal_lse(spans), *others, attention_lse(q, k,
    v)]) with that part's lse, but where the split-key kernel takes the rows (a question's
    few, on CUDA) in two launches instead of ~30: a question's prefill is bound by its
    launches."""
    split_keys = _split_key_attention(q, k, v, scaling, others, spans)
    if split_keys is not None:
        return split_keys
    if spans is not None:
        others = [packed_causal_lse(q, spans.k, spans.v, spans.lengths, scaling, spans.offsets), *others]
    part = attention_lse(q, k, v, False, scaling)
    return merge_attention([*others, part]), part[1]


def _split_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, others,
                         spans: Spans | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kernels.attention.prefix_attention_lse where it takes q (a KV head's rows up to
    KERNEL_ROWS, 16-bit on CUDA, a head dim its tiles take, over some keys), else None."""
    Hq, T, _ = q.shape
    if Hq // k.shape[0] * T > KERNEL_ROWS or not k.shape[1] or not _kernel_takes(q):
        return None
    from triton.errors import TritonError

    from icecache.kernels.attention import prefix_attention_lse
    try:
        own = None if spans is None else (spans.k, spans.v, spans.start)
        return prefix_attention_lse(q, k, v, scaling, others, own)
    except (TritonError, RuntimeError) as e:
        _KERNEL_REFUSED.append(repr(e))
        log.warning("prefill attention: the split-key kernel cannot run here (%r); cuDNN or flash from now on", e)
    return None


@contextlib.contextmanager
def cudnn_for_every_shape():
    """Within it, prefill attention runs as it did before the split-key kernel and the lone
    varlen span (cuDNN's fused attention for every shape): a benchmark's baseline."""
    global KERNEL_ROWS, SMALL_CAUSAL
    saved = KERNEL_ROWS, SMALL_CAUSAL
    KERNEL_ROWS = SMALL_CAUSAL = 0
    try:
        yield
    finally:
        KERNEL_ROWS, SMALL_CAUSAL = saved


def _kernel_takes(q: torch.Tensor) -> bool:
    """Whether attention_lse's few-rows case runs as the Triton kernel: 16-bit on CUDA, a head
    dim its tiles take, unless it failed here before. cuDNN's fused attention (the other way)
    plans every new shape (~36 ms on an H200, paid by every question of a new length)."""
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16) or _KERNEL_REFUSED:
        return False
    from icecache.kernels.common import is_tile
    return is_tile(q.shape[-1])


_VARLEN_REFUSED: set[str] = set()  # why the variable-length kernel cannot run here, once seen


def packed_causal_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                      scaling: float, offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each span of a pack over itself only (spans of `lengths`, in
    order), with its log-sum-exp: q [Hq, T, D], k/v [H, T, D] -> (out [Hq, T, D], lse
    [Hq, T] fp32). On a CUDA GPU in 16-bit, one variable-length flash call for the whole
    pack (FlashAttention-2's varlen kernel, which torch ships), a lone span too up to
    SMALL_CAUSAL tokens (a question: no cuDNN plan for its length); elsewhere, or where that
    kernel refuses, one attention_lse per span. offsets: the spans' starts and end [len + 1]
    int32 on q's device, where the caller has them (a pass's layers share them: made from the
    lengths here, they are a copy from pageable memory, which waits for the GPU)."""
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) \
            and (len(lengths) > 1 or q.shape[1] <= SMALL_CAUSAL) and not _VARLEN_REFUSED:
        Hq, T, _ = q.shape
        g = Hq // k.shape[0]
        cu = offsets
        if cu is None:
            cu = torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)
        longest = max(lengths)
        try:
            out, lse = torch.ops.aten._flash_attention_forward(
                q.transpose(0, 1).contiguous(), k.repeat_interleave(g, 0).transpose(0, 1).contiguous(),
                v.repeat_interleave(g, 0).transpose(0, 1).contiguous(), cu, cu, longest, longest, 0.0, True, False,
                scale=scaling)[:2]
            if lse.shape == (Hq, T):
                return out.transpose(0, 1), lse
            _VARLEN_REFUSED.add(f"log-sum-exp of shape {tuple(lse.shape)}")
        except (RuntimeError, TypeError) as e:
            _VARLEN_REFUSED.add(repr(e))
        log.warning("packed prefill: the varlen flash kernel cannot run here (%s); one call per question",
                    next(iter(_VARLEN_REFUSED)))
    ends = torch.tensor(lengths).cumsum(0).tolist()
    parts = [attention_lse(q[:, e - n:e], k[:, e - n:e], v[:, e - n:e], True, scaling) for e, n in zip(ends, lengths)]
    return torch.cat([o for o, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=1)


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of KV parts from each part's (out [Hq, T, D], lse [Hq, T]):
    the outputs weighted by their share of the softmax mass. -> [Hq, T, D] in out's dtype."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.stack([l.float() for _, l in parts])  # [n, Hq, T]
    w = torch.exp(lse - lse.amax(0))
    out = sum(o.float() * w[i][..., None] for i, (o, _) in enumerate(parts)) / w.sum(0)[..., None]
    return out.to(parts[0][0].dtype)


def prefill_attention_parts(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, scaling: float) -> torch.Tensor:
    """prefill_attention without joining past and chunk or building a [T, N + T] mask: the
    chunk's causal attention over itself and its attention over the past, merged by their
    log-sum-exps.

    q: [Hq, T, D]; past_k/v: [H, N, D] (on q's device); k/v: [H, T, D] -> [T, Hq, D]."""
    parts = [attention_lse(q, k, v, True, scaling)]
    if past_k.shape[1]:
        parts.append(attention_lse(q, past_k, past_v, False, scaling))
    return merge_attention(parts).transpose(0, 1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per head over a gathered key set.

    q: [H, g, D] (g query heads share KV head h); keys/values: [H, N, D]; mask: [H, N]
    (True = attend); bias: [H, N] added to the scores (a key standing for several, see
    unselected_part) -> [H, g, D].
    """
    s = torch.einsum("hgd,hnd->hgn", q.float(), keys.float()) * scaling  # [H, g, N]
    if bias is not None:
        s = s + bias[:, None, :]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hgn,hnd->hgd", p, values.float()).to(q.dtype)


def attend_parts(q: torch.Tensor, parts: list[tuple[torch.Tensor, ...]], scaling: float) -> torch.Tensor:
    """Decode attention over several KV parts without concatenating them first when
    there is only one; q: [H, g, D], parts of ([H, n, D], [H, n, D], mask [H, n] | None[,
    bias [H, n]])."""
    parts = [p for p in parts if p[0].shape[1]]
    if len(parts) == 1 and len(parts[0]) == 3:
        return decode_attention(q, *parts[0], scaling)
    keys = torch.cat([p[0] for p in parts], dim=1)
    values = torch.cat([p[1] for p in parts], dim=1)
    masks = [p[2] if p[2] is not None else torch.ones(p[0].shape[:2], dtype=torch.bool, device=p[0].device)
             for p in parts]
    bias = None
    if any(len(p) > 3 for p in parts):
        bias = torch.cat([p[3] if len(p) > 3 else torch.zeros(p[0].shape[:2], device=p[0].device)
                          for p in parts], dim=1)
    return decode_attention(q, keys, values, torch.cat(masks, dim=1), scaling, bias)


def unselected_part(key_mean: torch.Tensor, value_mean: torch.Tensor, valid: torch.Tensor,
                    page_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared pages that page_ids [H, R] (-1 = none, >= N: not a shared page) does not
    name, each as one key: its keys' mean key_mean [H, N, D], carrying its values' mean, with
    log(its tokens) added to its score, so that it weighs n e^(s q.mean): a lower bound (Jensen)
    of the page's attention mass. -> (keys, values, mask [H, N], bias [H, N]) for decode_attention."""
    H, N = valid.shape
    named = torch.zeros(H, N + 1, dtype=torch.bool, device=valid.device)
    named.scatter_(1, torch.where((page_ids >= 0) & (page_ids < N), page_ids, N), True)
    return key_mean, value_mean, (valid > 0) & ~named[:, :N], valid.clamp_min(1).float().log()
