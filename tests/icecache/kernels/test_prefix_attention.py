"""kernels.attention.prefix_attention_lse against attention.attention_lse (the prefill's
attention over earlier keys, with log-sum-exp)."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.attention import attention_lse, merge_attention, packed_causal_lse  # noqa: E402
from icecache.kernels.attention import prefix_attention_lse  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("tokens,keys", [(5, 300), (1, 37), (23, 1000)])
def test_split_key_attention_equals_flash_attention_with_its_log_sum_exp(dtype, tokens, keys):
    """A question's rows over a context (3 query heads per KV head, fewer and more rows than
    a row tile, keys not a whole number of blocks, a strided slice of a longer context as
    the prefill passes it) give flash attention's outputs and log-sum-exps, so a part
    merges with the others exactly."""
    gen = torch.Generator().manual_seed(tokens)
    H, g, D = 2, 3, 32
    context = (torch.randn(H, keys + 9, D, generator=gen) * 2).to(dtype)
    values = torch.randn(H, keys + 9, D, generator=gen).to(dtype)
    k, v = context[:, 4:4 + keys], values[:, 4:4 + keys]
    q = (torch.randn(H * g, tokens, D, generator=gen) * 2).to(dtype)
    want_out, want_lse = attention_lse(q.float(), k.float(), v.float(), False, D ** -0.5)
    out, lse = prefix_attention_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), D ** -0.5)
    assert out.shape == (H * g, tokens, D) and out.dtype == dtype and lse.shape == (H * g, tokens)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=tol, rtol=tol)
    # merged with a second part (the question over itself), as the prefill does
    own_k, own_v = torch.randn(H, tokens, D, generator=gen), torch.randn(H, tokens, D, generator=gen)
    own = attention_lse(q.float(), own_k, own_v, True, D ** -0.5)
    merged = merge_attention([(out.float().cpu(), lse.cpu()), own])
    torch.testing.assert_close(merged, merge_attention([(want_out, want_lse), own]), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("folded", [0, 1, 2])
def test_other_parts_fold_into_the_context_part_as_merge_attention_does(dtype, folded):
    """Parts of the same rows over other keys (the question over itself as the varlen kernel
    lays it out, [T, Hq, D] transposed; its earlier chunk's) fold into the context's part in
    the merge kernel: the output is merge_attention's over them all, the log-sum-exp still
    the context's alone, and a part with no keys (lse -inf, as _no_attention fills rows no
    chunk had) weighs nothing."""
    gen = torch.Generator().manual_seed(folded)
    H, g, D, T, n = 2, 3, 32, 7, 200
    k, v = (torch.randn(H, n, D, generator=gen) * 2).to(dtype), torch.randn(H, n, D, generator=gen).to(dtype)
    q = (torch.randn(H * g, T, D, generator=gen) * 2).to(dtype)
    own_k, own_v = torch.randn(H, T, D, generator=gen).to(dtype), torch.randn(H, T, D, generator=gen).to(dtype)
    causal_out, causal_lse = attention_lse(q.float(), own_k.float(), own_v.float(), True, D ** -0.5)
    causal = (causal_out.to(dtype).transpose(0, 1).contiguous().transpose(0, 1), causal_lse)  # strides of [T, Hq, D]
    earlier_k = torch.randn(H, 11, D, generator=gen).to(dtype)
    earlier_v = torch.randn(H, 11, D, generator=gen).to(dtype)
    earlier_out, earlier_lse = attention_lse(q.float(), earlier_k.float(), earlier_v.float(), False, D ** -0.5)
    earlier_lse[:, 2] = float("-inf")  # a row no earlier chunk covers
    earlier_out[:, 2] = 0
    others = [causal, (earlier_out.to(dtype), earlier_lse)][:folded]
    context = attention_lse(q.float(), k.float(), v.float(), False, D ** -0.5)
    want = merge_attention([(o.float(), lse) for o, lse in others] + [context])
    out, lse = prefix_attention_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), D ** -0.5,
                                    [(o.to(DEVICE), lse.to(DEVICE)) for o, lse in others])
    assert out.shape == (H * g, T, D) and out.dtype == dtype and out.transpose(0, 1).is_contiguous()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), context[1], atol=tol, rtol=tol)


def test_more_than_two_other_parts_are_refused():
    q, k = torch.randn(2, 3, 32), torch.randn(1, 40, 32)
    part = attention_lse(q, k, k, False, 0.2)
    with pytest.raises(ValueError, match="at most two other parts"):
        prefix_attention_lse(q.to(DEVICE), k.to(DEVICE), k.to(DEVICE), 0.2, [part] * 3)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_a_packs_own_spans_fold_in_causally(dtype):
    """A pack of three questions (5, 70 and 1 tokens: more own keys than a block, one) whose
    own keys come as the model lays them out ([T, H, D] memory), each row attending causally
    to its own question's tokens only, plus an earlier chunk's part: merge_attention of the
    packed causal part, that part and the context's; the log-sum-exp the context's alone."""
    gen = torch.Generator().manual_seed(7)
    H, g, D, n = 2, 3, 32, 150
    lengths = [5, 70, 1]
    T = sum(lengths)
    k, v = (torch.randn(H, n, D, generator=gen) * 2).to(dtype), torch.randn(H, n, D, generator=gen).to(dtype)
    q = (torch.randn(T, H * g, D, generator=gen) * 2).to(dtype).transpose(0, 1)
    own_k = torch.randn(T, H, D, generator=gen).to(dtype).transpose(0, 1)
    own_v = torch.randn(T, H, D, generator=gen).to(dtype).transpose(0, 1)
    earlier_k, earlier_v = torch.randn(H, 9, D, generator=gen).to(dtype), torch.randn(H, 9, D, generator=gen).to(dtype)
    earlier = attention_lse(q.float(), earlier_k.float(), earlier_v.float(), False, D ** -0.5)
    causal = packed_causal_lse(q.float(), own_k.float(), own_v.float(), lengths, D ** -0.5)
    context = attention_lse(q.float(), k.float(), v.float(), False, D ** -0.5)
    want = merge_attention([causal, earlier, context])
    start = torch.tensor([0] * 5 + [5] * 70 + [75], dtype=torch.int32)
    out, lse = prefix_attention_lse(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), D ** -0.5,
                                    [(earlier[0].to(dtype).to(DEVICE), earlier[1].to(DEVICE))],
                                    (own_k.to(DEVICE), own_v.to(DEVICE), start.to(DEVICE)))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu(), context[1], atol=tol, rtol=tol)


@pytest.mark.gpu
def test_after_precompile_other_packs_compile_no_merge():
    """After one question's merge and precompile(), a pack continuing an earlier chunk, rows
    over several documents (no own keys) and questions of other lengths (1, 16, 37 tokens)
    build no new merge kernel on a request's path."""
    from icecache.kernels import attention, common
    gen = torch.Generator().manual_seed(0)
    H, g, D = 2, 4, 64
    k = torch.randn(H, 300, D, generator=gen).to(DEVICE, torch.bfloat16)

    def merge(T: int, earlier: bool, own: bool) -> None:
        q = torch.randn(T, H * g, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)
        own_k = torch.randn(T, H, D, generator=gen).to(DEVICE, torch.bfloat16).transpose(0, 1)
        others = [attention_lse(q, k[:, :20], k[:, :20], False, 0.1)] if earlier else []
        spans = (own_k, own_k, torch.zeros(T, dtype=torch.int32, device=DEVICE)) if own else None
        prefix_attention_lse(q, k, k, 0.1, others, spans)

    def compiled() -> int:
        return sum(len(cache[0]) for cache in attention._prefix_merge.device_caches.values())

    merge(7, False, True)
    common.precompile(8)
    before = compiled()
    for T, earlier, own in ((16, True, True), (1, False, False), (37, False, True), (16, False, False)):
        merge(T, earlier, own)
    assert compiled() == before
