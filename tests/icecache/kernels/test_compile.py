"""The GPU kernels (attention, a question's pages, the index query) compiled for an H200 (sm_90) on this
machine, without a GPU: Triton's interpreter (the other kernel tests on CPU) runs their
Python, not the compiler, so a kernel can pass there and fail to build on the GPU; and a
kernel that needs more than 255 registers a thread spills to local memory (a 64-bit address
per element of a [64, 128] tile did: 512-728 bytes of stack, where 32-bit offsets need none).
The compiler runs in a child process: this one's kernels are the interpreter's
(TRITON_INTERPRET=1, tests/conftest.py)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

CHILD = r'''
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from icecache.kernels import attention, question, rerank, walk
from icecache.kernels.common import BLOCK, warps

F32, BF16, I64, I32 = "*fp32", "*bf16", "*i64", "*i32"
SHAPE = dict(G=4, D=128)  # an 8B model's: 32 query heads over 8 KV heads of 128
SPARSE = dict(q_ptr=F32, sink_k_ptr=BF16, sink_v_ptr=BF16, ids_ptr=I64, shared_k_ptr=BF16, shared_v_ptr=BF16,
              shared_valid_ptr=I64, shared_at_ptr=I64, priv_k_ptr=BF16, priv_v_ptr=BF16, pvalid_ptr=I64,
              win_k_ptr=BF16, win_v_ptr=BF16, count_ptr=I64, mean_k_ptr=BF16, mean_v_ptr=BF16, part_ptr=F32,
              acc_ptr=F32)
MERGE = dict(part_ptr=F32, acc_ptr=F32, rest_part_ptr=F32, rest_acc_ptr=F32, out_ptr=BF16)
PREFIX = dict(q_ptr=F32, k_ptr=BF16, v_ptr=BF16, part_ptr=F32, acc_ptr=F32, count_ptr=I64)
WALK = dict(q_ptr=BF16, mean_ptr=BF16, var_ptr=BF16, size_ptr=F32, order_ptr=I32, start_ptr=I32, parents_ptr=I32,
            raw_ptr=F32, cand_ptr=I32, part_ptr=F32, top_ptr=I32, valid_ptr=I64, pmean_ptr=BF16, pvar_ptr=BF16,
            pvalid_ptr=I64, out_ptr=I64)
RERANK = dict(q_ptr=BF16, cand_ptr=I64, shared_k_ptr=BF16, shared_valid_ptr=I64, shared_at_ptr=I64, priv_k_ptr=BF16,
              pvalid_ptr=I64, copy_k_ptr=BF16, lse_ptr=F32, out_ptr=I64)
PREFIX_MERGE = dict(part_ptr=F32, acc_ptr=F32, o1_ptr=BF16, l1_ptr=F32, o2_ptr=BF16, l2_ptr=F32, out_ptr=BF16,
                    lse_ptr=F32, q_ptr=BF16, own_k_ptr=BF16, own_v_ptr=BF16, start_ptr=I32)
QUESTION = dict(q_ptr=BF16, lse_ptr=F32, rows_ptr=I64, start_ptr=I32, k_ptr=BF16, pos_ptr=I64, out_ptr=F32,
                by_ptr=F32, page_ptr=I64)
DENSE_MERGE = dict(q_ptr=BF16, part_ptr=F32, acc_ptr=F32, own_k_ptr=BF16, own_v_ptr=BF16, count_ptr=I64, out_ptr=BF16)
cases = {
    "dense merge": (attention._dense_merge, DENSE_MERGE,
                    dict(**SHAPE, SC=attention.MERGE_PARTS, BLOCK=attention.BLOCK_KEYS)),
    **{f"sparse REST={r}": (attention._sparse_attention, SPARSE, dict(**SHAPE, GP=16, P=16, SINK_BLOCKS=1, REST=r))
       for r in (False, True)},
    **{f"merge REST={r}": (attention._merge_attention, MERGE, dict(**SHAPE, GP=16, SC=attention.MERGE_PARTS, REST=r))
       for r in (False, True)},
    **{f"prefix RP={rp} COUNTS={c}": (attention._prefix_attention, PREFIX,
                                       dict(**SHAPE, RP=rp, BLOCK=attention.BLOCK_KEYS, LOW=True, COUNTS=c))
       for rp in (16, 64) for c in (False, True)},
    **{f"prefix merge OTHERS={o} OWN={own}": (attention._prefix_merge, PREFIX_MERGE,
                                               dict(**SHAPE, SC=attention.MERGE_PARTS, OTHERS=o, OWN=own,
                                                    BLOCK=attention.OWN_KEYS))
       for o, own in ((0, False), (0, True), (2, True))},
    # a question's pages, picked while it is prefilled
    "question mass": (question._question_mass, QUESTION,
                      dict(G=SHAPE["G"], D=SHAPE["D"], RB=question._ROWS, BN=question._TOKENS, LOW=True)),
    "page weights": (question._page_weights, QUESTION, dict(BN=question._PAGE_TOKENS)),
    # the index query: a tree level's and the pages' moment scores, their selection (RANK 0: a
    # level's, 2: pages by the largest head score) up to 8,192 candidates a row, the re-ranking
    **{f"child scores KP={kp}": (walk._child_scores, WALK, dict(**SHAPE, GP=16, BLOCK=BLOCK, KP=kp))
       for kp in (16, 32)},
    "page scores": (walk._page_scores, WALK, dict(**SHAPE, GP=16, BLOCK=BLOCK, KP=32)),
    **{f"select NB={nb} RANK={r}": (walk._select_compact, WALK,
                                    dict(G=SHAPE["G"], GP=16, CP=16, NB=nb, KP=32, KW=64, RANK=r))
       for nb in (1024, 8192) for r in (0, 2)},
    "rerank page lse": (rerank._page_lse, RERANK, dict(**SHAPE, GP=16, P=16, CP=128, CB=rerank.PAGES_PER_PROGRAM)),
    "rerank top": (rerank._top_by_share, RERANK, dict(R=12, G=SHAPE["G"], GP=16, CP=128)),
    # head_pages="share": the always-attended tokens' log-mass, then a request's pages split among its 8 KV heads
    # (budget 256: 96 candidates, 24 bids a row; 1024: 288, 120)
    **{f"rerank bids CP={cp}": (rerank._row_bids, dict(q_ptr=F32, lse_ptr=F32, sink_ptr=BF16, win_ptr=BF16,
                                                       counts_ptr=I64, keys_ptr=I64, bids_ptr=I64),
                                dict(**SHAPE, LEAST=1, CAP=cap, CAPP=capp, GP=16, SP=32, WP=32, CP=cp,
                                     CH=rerank.COUNT_BLOCK // cp))
       for cp, cap, capp in ((128, 24, 32), (512, 120, 128))},
    **{f"rerank cut CAPP={capp}": (rerank._cut_bids, dict(bids_ptr=I64, cand_ptr=I64, out_ptr=I64),
                                   dict(HS=8, KEEP=8 * cap // 2, CAP=cap, CAPP=capp, CP=cp,
                                        BH=min(8 * capp, rerank.COUNT_BLOCK // capp)))
       for cp, cap, capp in ((128, 24, 32), (512, 120, 128))},
}
stack = {}
for name, (kernel, pointers, constexprs) in cases.items():
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n == "scaling" else "i32")
                 for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": warps(constexprs["NB"])} if "NB" in constexprs else {}  # as walk.py launches it
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    path = os.path.join(sys.argv[1], "kernel.cubin")
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([sys.argv[2], "--dump-resource-usage", path], capture_output=True, text=True,
                           check=True).stdout
    fields = dict(f.split(":") for line in usage.splitlines() if "REG:" in line for f in line.split() if ":" in f)
    stack[name] = int(fields["STACK"])
print(json.dumps(stack))
'''


NAMES = ["dense merge", "sparse REST=False", "sparse REST=True", "merge REST=False", "merge REST=True",
         *(f"prefix RP={rp} COUNTS={c}" for rp in (16, 64) for c in (False, True)),
         "prefix merge OTHERS=0 OWN=False", "prefix merge OTHERS=0 OWN=True", "prefix merge OTHERS=2 OWN=True",
         "question mass", "page weights",
         "child scores KP=16", "child scores KP=32", "page scores",
         *(f"select NB={nb} RANK={r}" for nb in (1024, 8192) for r in (0, 2)), "rerank page lse", "rerank top",
         "rerank bids CP=128", "rerank bids CP=512", "rerank cut CAPP=32", "rerank cut CAPP=128"]
# Triton 3.6 (the H200 machine's, with torch 2.11) gives the shared-context kernel's 64-row tile
# (dense layers at 9+ requests, every question's prefill) 255 registers and 16 bytes of stack at
# 4 warps, before and after the page means' COUNTS; 3.9 (CI's) none; 8 warps none on either, but
# unmeasured on the GPU, so not taken. strict: the case fails once a change fixes it.
KNOWN = {"prefix RP=64 COUNTS=False": "Triton < 3.7 spills 16 bytes here (255 registers at 4 warps)"}


@pytest.fixture(scope="module")
def stack() -> dict[str, int]:
    if not os.path.exists(CUOBJDUMP):
        pytest.skip("triton's NVIDIA backend ships no cuobjdump here")
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([sys.executable, "-c", CHILD, tmp, CUOBJDUMP], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(NAMES), out
    return out


def _old_triton() -> bool:
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(_old_triton(), reason=KNOWN[n], strict=True))
                                  if n in KNOWN else n for n in NAMES])
def test_kernels_build_for_an_h200_without_spilling(stack, name):
    """Sparse attention, its merge and the shared-context attention and its merges (dense
    layers, the page means, a prefill's rows), with and without the pages left out, a
    question's pages and the index query's kernels, at an 8B model's shapes in bf16: no
    bytes of stack (spilled registers) a thread."""
    assert stack[name] == 0, f"{name}: {stack[name]} bytes of stack a thread (all: {stack})"
