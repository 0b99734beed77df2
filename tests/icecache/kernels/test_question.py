"""kernels/question.py against index.select.question_mass and question_pages."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.index.select import question_mass, question_pages  # noqa: E402
from icecache.kernels.question import question_pages as fused  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("follow", [0, 5])
def test_fused_question_pages_equal_the_torch_reference(dtype, follow):
    """Three requests with 5, 16 and 1 question rows (more than a tile, fewer, one) taken
    from a pack of 30 tokens in its own layout ([T, Hq, D] memory, as the model gives it), 3
    query heads per KV head, 300 context tokens read from the middle of a longer context (a
    strided slice, not a whole number of token blocks) whose positions are shuffled over
    pages of 16 as a tree lays them out (a page holds tokens of similar keys, not
    neighbours), some pages part-full: the same pages, in the same order, as the torch
    reference picks from the same mass, and the mass moved `follow` positions along."""
    gen = torch.Generator().manual_seed(follow)
    H, g, D, n, T, P, sinks = 2, 3, 32, 300, 30, 16, 12
    owner = torch.tensor([0] * 5 + [1] * 16 + [2])
    rows = torch.cat([torch.arange(2, 7), torch.arange(8, 24), torch.tensor([29])])  # each request's last rows
    context = (torch.randn(H, sinks + n + 20, D, generator=gen) * 2).to(dtype)
    keys = context[:, sinks:sinks + n]
    q = (torch.randn(T, H * g, D, generator=gen) * 2).to(dtype).transpose(0, 1)  # [Hq, T, D] of [T, Hq, D] memory
    scores = torch.einsum("hwd,hnd->hwn", q.float().reshape(H, g * T, D), context.float()) * D ** -0.5
    lse = torch.logsumexp(scores, dim=-1).view(H * g, T)  # each row's softmax over the whole context
    # positions sinks .. sinks + n - 1 over 20 pages, shuffled; pages 3 and 19 hold 7 and 5 tokens
    sizes = [P] * 3 + [7] + [P] * 15 + [5]
    page_of = torch.stack([torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))] * H)
    position = torch.stack([sinks + torch.randperm(n, generator=gen) for _ in range(H)])
    num_tokens = sinks + n + 20
    want_mass = question_mass(q[:, rows], lse[:, rows], owner, 3, keys, D ** -0.5)
    want = question_pages(want_mass, page_of, position, num_tokens, len(sizes), 8, follow)
    start = torch.tensor([0, 5, 21, 22], dtype=torch.int32)
    got = fused(*(t.to(DEVICE) for t in (q, lse, rows, start, keys, page_of, position)), num_tokens, len(sizes), 8,
                follow, D ** -0.5)
    assert got.shape == want.shape == (3, H, 8) and (want >= 0).all()
    assert torch.equal(got.cpu(), want)


def test_pages_without_mass_are_not_picked():
    """A context where a request's rows give no mass to most tokens (exp underflows to 0):
    the pages past those with mass are -1, as the reference has them."""
    H, D, n = 1, 16, 64
    keys = torch.zeros(H, n, D)
    keys[0, :16, 0] = 1.0  # page 0 alone scores
    q = torch.zeros(1, 1, D)
    q[0, 0, 0] = 400.0
    lse = torch.logsumexp(torch.einsum("hwd,hnd->hwn", q, keys), dim=-1)  # scaling 1
    page_of = torch.arange(4).repeat_interleave(16)[None]
    position = torch.arange(n)[None]
    got = fused(q.to(DEVICE), lse.to(DEVICE), torch.tensor([0], device=DEVICE),
                torch.tensor([0, 1], dtype=torch.int32, device=DEVICE), keys.to(DEVICE), page_of.to(DEVICE),
                position.to(DEVICE), n, 4, 3, 0, 1.0)
    want = question_pages(question_mass(q, lse, torch.tensor([0]), 1, keys, 1.0), page_of, position, n, 4, 3, 0)
    assert got.tolist() == want.tolist() == [[[0, -1, -1]]]
