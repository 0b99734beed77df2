"""kernels.attention.prefix_attention_lse against attention.attention_lse (the prefill's
attention over earlier keys, with log-sum-exp)."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.attention import attention_lse, merge_attention  # noqa: E402
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
