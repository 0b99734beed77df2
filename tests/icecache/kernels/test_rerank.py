"""kernels/rerank.py against index.select.rerank_pages."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_pages(gen: torch.Generator, rows: int, HS: int, G: int, D: int, P: int, N: int, M: int,
                 least_valid: int = 1) -> tuple[torch.Tensor, ...]:
    """A re-ranking case's queries [rows, G, D], shared pages [HS, N, P, D] (bf16, as a model's)
    with their valid counts, and each row's private pages [rows, M, P, D] with theirs."""
    q = torch.randn(rows, G, D, generator=gen)
    shared_k = torch.randn(HS, N, P, D, generator=gen).to(torch.bfloat16)
    shared_valid = torch.randint(least_valid, P + 1, (HS, N), generator=gen)
    priv_k = torch.randn(rows, M, P, D, generator=gen)
    priv_valid = torch.randint(0, P + 1, (rows, M), generator=gen)
    return q, shared_k, shared_valid, priv_k, priv_valid


@pytest.mark.parametrize("block", [2, 8])  # the GPU's candidates a program, and the interpreter's
@pytest.mark.parametrize("num_shared", [40, 0])
def test_fused_rerank_keeps_the_pages_the_torch_reference_keeps(num_shared, block):
    """kernels.rerank.rerank_pages = index.select.rerank_pages: same pages, same order, over
    shared and private candidates, with absent (-1) and empty candidates among them, however
    many candidates a program scores (PAGES_PER_PROGRAM: 2 on a GPU, 8 in the interpreter)."""
    from icecache.index.select import rerank_pages as reference
    from icecache.kernels.rerank import rerank_pages
    gen = torch.Generator().manual_seed(num_shared)
    B, HS, G, D, P, M, C, R = 2, 2, 3, 16, 16, 6, 12, 4
    rows = B * HS
    q, shared_k, shared_valid, priv_k, priv_valid = random_pages(gen, rows, HS, G, D, P, num_shared, M)
    if num_shared:
        shared_valid[:, 3] = 0  # an empty page among the candidates
    candidates = torch.stack([torch.randperm(num_shared + M, generator=gen)[:C] for _ in range(rows)]).to(torch.int32)
    candidates[:, -2:] = -1
    candidates[1, 4] = candidates[1, 1]  # a page named twice (a question's page the bounds picked too) counts once
    if num_shared:
        candidates[0, 0] = 3
    want = reference(q, candidates.long(), (shared_k, shared_valid), (priv_k, priv_valid), R, 0.25)
    got = rerank_pages(*(t.to(DEVICE) for t in (q, candidates, shared_k, shared_valid, priv_k, priv_valid)), R, 0.25,
                       block=block)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu().long(), want), (got, want)
    assert (got >= 0).sum() > 0


def test_fused_rerank_reads_the_question_pages_from_their_device_copy():
    """With copied_k, a shared page among a row's first Q candidates is scored by the keys of
    its copy, not the host page's (what SparseSlots hands it: the question's pages, copied
    once per request): the choice equals the reference's over pages holding those keys,
    and a page named again later in the row still counts once."""
    from icecache.index.select import rerank_pages as reference
    from icecache.kernels.rerank import rerank_pages
    gen = torch.Generator().manual_seed(7)
    B, HS, G, D, P, N, M, C, Q, R = 2, 2, 3, 16, 16, 40, 4, 14, 5, 4
    rows = B * HS
    q, shared_k, shared_valid, priv_k, priv_valid = random_pages(gen, rows, HS, G, D, P, N, M)
    # row r's question: pages r*Q... (no other row's), then the bounds' candidates: the other pages
    later = torch.stack([rows * Q + torch.randperm(N + M - rows * Q, generator=gen)[:C - Q] for _ in range(rows)])
    candidates = torch.cat([torch.arange(rows * Q).view(rows, Q), later], dim=1)
    candidates[0, Q + 2] = candidates[0, 1]  # a question page the bounds picked too
    candidates[2, Q - 1] = -1  # a question with fewer pages than columns
    # the copies hold other keys than the host pages (scaled up: they decide the choice)
    copied_k = (3 * torch.randn(rows, Q, P, D, generator=gen)).to(torch.bfloat16)
    changed = shared_k.clone()
    for r in range(rows):
        for j in range(Q):
            if candidates[r, j] >= 0:
                changed[r % HS, candidates[r, j]] = copied_k[r, j]
    want = reference(q, candidates, (changed, shared_valid), (priv_k, priv_valid), R, 0.25)
    unchanged = reference(q, candidates, (shared_k, shared_valid), (priv_k, priv_valid), R, 0.25)
    assert not torch.equal(want, unchanged), "the copies' keys must matter to this case"
    got = rerank_pages(*(t.to(DEVICE) for t in (q, candidates, shared_k, shared_valid, priv_k, priv_valid)), R,
                       0.25, copied_k.to(DEVICE))
    assert torch.equal(got.cpu(), want), (got, want)


def test_fused_rerank_reads_shared_pages_laid_out_as_token_rows():
    """Shared pages given as token rows (a context's flat KV on the device: sinks, then each
    page's valid tokens in page order, located by store.page_rows) choose what the same
    pages given as pages choose."""
    from icecache.kernels.rerank import rerank_pages
    from icecache.store import page_rows
    gen = torch.Generator().manual_seed(11)
    B, HS, G, D, P, N, M, C, R, SINKS = 2, 2, 3, 16, 16, 30, 4, 12, 4, 5
    rows = B * HS
    q, shared_k, shared_valid, priv_k, priv_valid = random_pages(gen, rows, HS, G, D, P, N, M, least_valid=0)
    candidates = torch.stack([torch.randperm(N + M, generator=gen)[:C] for _ in range(rows)]).to(torch.int32)
    # every head's rows: garbage sinks, its pages' valid tokens, garbage up to the longest head's length
    tokens = [torch.cat([shared_k[h, p, :int(shared_valid[h, p])] for p in range(N)]) for h in range(HS)]
    length = SINKS + max(len(t) for t in tokens) + 3
    flat = torch.randn(HS, length, D, generator=gen).to(torch.bfloat16)
    for h, t in enumerate(tokens):
        flat[h, SINKS:SINKS + len(t)] = t
    at = page_rows(shared_valid, SINKS)
    args = [t.to(DEVICE) for t in (q, candidates)]
    want = rerank_pages(*args, *(t.to(DEVICE) for t in (shared_k, shared_valid, priv_k, priv_valid)), R, 0.25)
    got = rerank_pages(*args, *(t.to(DEVICE) for t in (flat, shared_valid, priv_k, priv_valid)), R, 0.25,
                       shared_at=at.to(DEVICE))
    assert torch.equal(got, want), (got, want)
    assert (got >= 0).sum() > rows  # shared and private pages were chosen


@pytest.mark.parametrize("HS,G,C,R", [(2, 3, 12, 4), (2, 3, 12, 1), (8, 4, 96, 12)])  # the last: an 8B model's
def test_fused_split_by_share_keeps_the_pages_the_torch_reference_keeps(HS, G, C, R):
    """head_pages="share": kernels.rerank.rerank_pages with the sinks and window rings = the
    torch reference with their log-mass (index.select.fixed_log_mass), over requests whose
    windows are partly filled, a head looking at its sinks, absent and repeated candidates."""
    from icecache.index.select import LEAST_HEAD_PAGES, fixed_log_mass, rerank_pages as reference
    from icecache.kernels.rerank import rerank_pages
    gen = torch.Generator().manual_seed(11 + R)
    B, D, P, M, S, W = 3, 16, 16, 6, 4, 8
    N = C + 18
    rows = B * HS
    q, shared_k, shared_valid, priv_k, priv_valid = random_pages(gen, rows, HS, G, D, P, N, M)
    sinks = torch.randn(HS, S, D, generator=gen).to(torch.bfloat16)
    windows = torch.randn(rows, W, D, generator=gen).to(torch.bfloat16)
    counts = torch.tensor([[2, 0], [W + 5, 0], [W - 1, 0]])  # a ring with 3 tokens, full, full
    q[0] = sinks[0, 1].float() * 3  # request 0's first head looks at a sink
    candidates = torch.stack([torch.randperm(N + M, generator=gen)[:C] for _ in range(rows)]).to(torch.int32)
    candidates[1, -3:] = -1
    candidates[2, 5] = candidates[2, 2]
    filled = torch.arange(W) < (counts[:, :1] + 1).clamp(max=W)  # [B, W]
    keys = torch.cat([sinks.repeat(B, 1, 1), windows], dim=1)
    mask = torch.cat([torch.ones(B, S, dtype=torch.bool), filled], dim=1).repeat_interleave(HS, dim=0)
    want = reference(q, candidates.long(), (shared_k, shared_valid), (priv_k, priv_valid), R, 0.25,
                     fixed_log_mass(q, keys, mask, 0.25))
    dev = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    got = rerank_pages(*dev(q, candidates, shared_k, shared_valid, priv_k, priv_valid), R, 0.25,
                       fixed=tuple(dev(sinks, windows, counts)))
    assert got.shape == want.shape == (rows, 2 * R)
    assert torch.equal(got.cpu().long(), want), (got, want)
    kept = (want >= 0).sum(1).view(B, HS)
    assert (kept.sum(1) == HS * R).all() and kept.min() >= LEAST_HEAD_PAGES
    if R > 2:
        assert kept[0, 0] < R < kept[0].max()  # the head on its sink gave pages to another
