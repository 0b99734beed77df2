"""kernels/walk.py against index.tree: the tree walk keeps the clusters tree_keep keeps, and
precompile() leaves nothing to compile for a tree of another width."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.index.select import tree_keep  # noqa: E402
from icecache.index.tree import build_tree  # noqa: E402
from icecache.kernels import common, walk  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("width,row_programs,dtype", [
    (6, None, torch.float32), (16, 1, torch.float32),
    pytest.param(6, None, torch.bfloat16, marks=pytest.mark.gpu)])  # tensor-core bf16 dots: the GPU
def test_kernel_tree_walk_keeps_the_same_clusters(monkeypatch, width, row_programs, dtype):
    """The kernel tree walk keeps the same level-1 clusters as index.select.tree_keep, on a
    tree with several levels and clusters of many pages, for two requests sharing the
    tree (rows = request x KV head) with different queries; with a beam as wide as the top
    level (which the plan then skips), one scoring program per row, and bf16 keys and
    queries (tensor-core dots)."""
    if row_programs is not None:
        monkeypatch.setattr(common, "ROW_PROGRAMS", row_programs)
    H, G, D, n, B = 2, 3, 32, 6000, 2
    keys = (torch.randn(H, n, D, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE, dtype)
    tree, _ = build_tree(keys, 16, (0.03, 0.2), 16, seed=1)
    assert tree.num_levels >= 3
    q = torch.randn(B * H, G, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    scaling = D ** -0.5
    plan = walk.WalkPlan(tree, width)
    assert len(plan.levels) == tree.num_levels - (tree.level_sizes()[-1] <= width)
    sizes = common.scratch_sizes(B * H, G, D, plan, 0, 0, 1, 1, 16)
    scratch = {k: torch.empty(sizes[k], dtype=common.SCRATCH_DTYPES.get(k, torch.float32), device=DEVICE)
               for k in ("raw", "cand", "parts", "tops")}
    root = torch.zeros(B * H, dtype=torch.int32, device=DEVICE)
    top = walk.walk_tree(q, plan, root, scaling, scratch["raw"], scratch["cand"], scratch["parts"], scratch["tops"])
    for b in range(B):
        expected = tree_keep(tree, q[b * H:(b + 1) * H].float(), width, scaling)
        got = top[b * H:(b + 1) * H].long().sort(dim=1).values
        assert torch.equal(got, expected.nonzero()[:, 1].view(H, width)), f"request {b}"


@pytest.mark.gpu
def test_after_precompile_a_document_of_another_shape_compiles_nothing():
    """Walks over two trees of very different widths after precompile(): no kernel compiles
    on the second (sizes are not specialized on; the widths' variants were built)."""

    def compiled() -> int:
        return sum(len(cache[0]) for k in common.VARIANTS
                   for cache in k.device_caches.values())

    def walk_once(n: int, seed: int) -> None:
        keys = (torch.randn(2, n, 32, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, torch.bfloat16)
        plan = walk.WalkPlan(build_tree(keys, 16, (0.03, 0.2), 16, seed=seed)[0], 8)
        sizes = common.scratch_sizes(2, 3, 32, plan, 0, 0, 1, 1, 16)
        scratch = [torch.empty(sizes[k], dtype=common.SCRATCH_DTYPES.get(k, torch.float32), device=DEVICE)
                   for k in ("raw", "cand", "parts", "tops")]
        q = torch.randn(2, 3, 32, device=DEVICE, dtype=torch.bfloat16)
        walk.walk_tree(q, plan, torch.zeros(2, dtype=torch.int32, device=DEVICE), 0.2, *scratch)

    walk_once(3000, 0)
    assert common.precompile(8, widest=4096) > 0
    before = compiled()
    walk_once(60000, 1)
    assert compiled() == before
