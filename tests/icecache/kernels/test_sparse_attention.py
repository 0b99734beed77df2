"""kernels.attention.sparse_attention with the pages a row leaves out folded in by their means
(IceCacheConfig.unselected="means") against attention.unselected_part, its torch reference,
and against exact attention where the means are exact."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.attention import decode_attention, unselected_part  # noqa: E402
from icecache.index.tree import page_means  # noqa: E402
from icecache.kernels import attention, common  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def shared_pages(HS: int, N: int, P: int, D: int, gen: torch.Generator, one_key: bool):
    """Shared pages, some part-full, one empty; one_key: each page's tokens share a key
    (values differ), so its mean key is each of its keys and its means stand for it exactly."""
    keys = torch.randn(HS, N, 1 if one_key else P, D, generator=gen) * 1.5
    keys = keys.expand(HS, N, P, D).contiguous()
    values = torch.randn(HS, N, P, D, generator=gen)
    valid = torch.randint(1, P + 1, (HS, N), generator=gen)
    valid[:, N // 2] = 0
    slot_ok = torch.arange(P) < valid[..., None]
    return keys * slot_ok[..., None], values * slot_ok[..., None], valid, slot_ok


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("N,R,programs,B", [(70, 5, 256, 2), (200, 12, 256, 2), (200, 12, 2, 3), (3, 3, 256, 2)])
@pytest.mark.parametrize("one_key", [True, False])
def test_pages_left_out_join_the_attention_by_their_means(monkeypatch, N, R, programs, B, one_key, dtype):
    """Sinks + R retrieved pages (one -1, one private) + a window, with every
    other shared page folded in by its means: the kernel as the torch reference
    (attention.unselected_part) and, where each page's tokens share one key, exact attention
    over every shared token; the means spread over several programs or one program taking
    several chunks (programs=2), for two requests or three, in fp32 (exact products) or
    bf16 (on tensor cores, a GPU's); without the rest (rest=None) it is not that."""
    monkeypatch.setattr(attention, "REST_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(N + B)
    HS, G, P, D, S, W, M = 2, 3, 16, 32, 5, 16, 2
    keys, values, valid, slot_ok = shared_pages(HS, N, P, D, gen, one_key)
    rows = B * HS
    q = torch.randn(rows, G, D, generator=gen)
    sink_k, sink_v = torch.randn(HS, S, D, generator=gen), torch.randn(HS, S, D, generator=gen)
    ids = torch.stack([torch.randperm(N, generator=gen)[:R] for _ in range(rows)])
    ids[:, 0] = -1
    ids[:, -1] = N  # the row's first private page
    priv_k, priv_v = torch.randn(rows, M, P, D, generator=gen), torch.randn(rows, M, P, D, generator=gen)
    priv_valid = torch.full((rows, M), P)
    win_k, win_v = torch.randn(rows, W, D, generator=gen), torch.randn(rows, W, D, generator=gen)
    counts = torch.tensor([[W - 1, 0]] * B)  # a full ring after this step's push
    means = (page_means(keys, valid), page_means(values, valid))
    scaling = D ** -0.5

    want, ref = [], []
    for h in range(rows):
        hs = h % HS
        tokens = slot_ok[hs].reshape(-1)
        all_k = torch.cat([sink_k[hs], keys[hs].reshape(-1, D)[tokens], priv_k[h, 0], win_k[h]])
        all_v = torch.cat([sink_v[hs], values[hs].reshape(-1, D)[tokens], priv_v[h, 0], win_v[h]])
        want.append(decode_attention(q[h][None], all_k[None], all_v[None], None, scaling)[0])
        named = ids[h][(ids[h] >= 0) & (ids[h] < N)]
        sel_k = torch.cat([sink_k[hs], keys[hs, named][slot_ok[hs, named]], priv_k[h, 0], win_k[h]])
        sel_v = torch.cat([sink_v[hs], values[hs, named][slot_ok[hs, named]], priv_v[h, 0], win_v[h]])
        rk, rv, rmask, rbias = unselected_part(means[0][hs][None], means[1][hs][None], valid[hs][None], ids[h][None])
        ref.append(decode_attention(q[h][None], torch.cat([sel_k[None], rk], 1), torch.cat([sel_v[None], rv], 1),
                                    torch.cat([torch.ones(1, len(sel_k), dtype=torch.bool), rmask], 1), scaling,
                                    torch.cat([torch.zeros(1, len(sel_k)), rbias], 1))[0])
    want, ref = torch.stack(want), torch.stack(ref)
    if one_key:
        torch.testing.assert_close(ref, want, atol=1e-4, rtol=1e-4)

    def kernel(rest):
        blocks = triton.cdiv(S, P) + R + triton.cdiv(W, P)
        GP = common.row_tile(G)
        sizes = {"att_parts": rows * blocks * GP * 2, "att_acc": rows * blocks * GP * D,
                 **attention.rest_scratch_sizes(B, HS, G, D, N)}
        scratch = {name: torch.full((n,), float("nan"), device=DEVICE) for name, n in sizes.items()}
        d = lambda t: t.to(DEVICE).contiguous()  # noqa: E731
        out = attention.sparse_attention(
            d(q), d(sink_k), d(sink_v), d(ids), d(keys), d(values), d(valid), d(priv_k), d(priv_v), d(priv_valid),
            d(win_k), d(win_v), d(counts), scaling, scratch, torch.empty(rows, G, D, device=DEVICE), None,
            None if rest is None else tuple(d(t.to(dtype)) for t in rest))
        return out.cpu()

    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(kernel(means), ref, atol=tol, rtol=tol)
    if one_key:
        torch.testing.assert_close(kernel(means), want, atol=tol, rtol=tol)
    assert (kernel(None) - ref).abs().max() > 1e-2  # the pages left out matter here
