"""kernels/question.py against index.select.question_mass."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.index.select import question_mass as reference  # noqa: E402
from icecache.kernels.question import question_mass  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_fused_question_mass_equals_the_torch_reference(dtype):
    """Three requests with 5, 16 and 1 rows (more rows than a tile, fewer, one), 3 query heads
    per KV head, 150 context tokens read from the middle of a longer context (a strided
    slice, as the prefill passes it: not a whole number of token blocks)."""
    gen = torch.Generator().manual_seed(0)
    H, g, D, n = 2, 3, 32, 150
    owner = torch.tensor([0] * 5 + [1] * 16 + [2])
    W = len(owner)
    context = (torch.randn(H, n + 20, D, generator=gen) * 2).to(dtype)
    keys = context[:, 12:12 + n]  # sinks before, a tail after
    q = (torch.randn(H * g, W, D, generator=gen) * 2).to(dtype)
    scores = torch.einsum("hwd,hnd->hwn", q.float().view(H, g * W, D), context.float()) * D ** -0.5
    lse = torch.logsumexp(scores, dim=-1).view(H * g, W)  # each row's softmax over the whole context
    want = reference(q, lse, owner, 3, keys, D ** -0.5)
    got = question_mass(q.to(DEVICE), lse.to(DEVICE), owner.to(DEVICE), 3, keys.to(DEVICE), D ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (3, H, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    assert (want.sum(-1) < torch.tensor([5, 16, 1]).view(3, 1) * g).all()  # a share of the rows' whole mass
