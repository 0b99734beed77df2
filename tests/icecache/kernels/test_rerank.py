"""kernels/rerank.py against index.select.rerank_pages."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("num_shared", [40, 0])
def test_fused_rerank_keeps_the_pages_the_torch_reference_keeps(num_shared):
    """kernels.rerank.rerank_pages = index.select.rerank_pages: same pages, same order, over
    shared and private candidates, with absent (-1) and empty candidates among them."""
    from icecache.index.select import rerank_pages as reference
    from icecache.kernels.rerank import rerank_pages
    gen = torch.Generator().manual_seed(num_shared)
    B, HS, G, D, P, M, C, R = 2, 2, 3, 16, 16, 6, 12, 4
    rows = B * HS
    q = torch.randn(rows, G, D, generator=gen)
    shared_k = torch.randn(HS, num_shared, P, D, generator=gen).to(torch.bfloat16)
    shared_valid = torch.randint(1, P + 1, (HS, num_shared), generator=gen)
    if num_shared:
        shared_valid[:, 3] = 0  # an empty page among the candidates
    priv_k = torch.randn(rows, M, P, D, generator=gen)
    priv_valid = torch.randint(0, P + 1, (rows, M), generator=gen)
    candidates = torch.stack([torch.randperm(num_shared + M, generator=gen)[:C] for _ in range(rows)]).to(torch.int32)
    candidates[:, -2:] = -1
    candidates[1, 4] = candidates[1, 1]  # a page named twice (a question's page the bounds picked too) counts once
    if num_shared:
        candidates[0, 0] = 3
    want = reference(q, candidates.long(), (shared_k, shared_valid), (priv_k, priv_valid), R, 0.25)
    got = rerank_pages(*(t.to(DEVICE) for t in (q, candidates, shared_k, shared_valid, priv_k, priv_valid)), R, 0.25)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu().long(), want), (got, want)
    assert (got >= 0).sum() > 0
