"""Flat byte layout of a Context, so one buffer (e.g. a shared-memory segment) holds an
indexed document and other processes can map it without copying or deserialising.

Layout: MAGIC | u64 header length | JSON header | tensor bytes, each 64-byte aligned.
The header names every tensor (dtype, shape, offset) and carries the scalar fields.
Unpacking returns a Context whose tensors are views of the buffer.
"""

from __future__ import annotations

import json
import struct
import warnings
from dataclasses import fields

import torch

from icecache.config import IceCacheConfig
from icecache.context import Context, Layout, SparseLayer, layout_of
from icecache.index.tree import TreeIndex, level_sizes, max_pages
from icecache.store import HostPageStore

MAGIC = b"ICECTX03"
_ALIGN = 64
_PREFIX = struct.Struct("<8sQ")
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.uint8, torch.bool)}


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _tensors(ctx: Context) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor of a context under a flat name, and the length of each list-valued field."""
    out = {"token_ids": torch.tensor(ctx.token_ids, dtype=torch.int64), "last_logits": ctx.last_logits}
    lists = {}
    for layer, (k, v) in ctx.dense.items():
        out[f"dense.{layer}.k"], out[f"dense.{layer}.v"] = k, v
    for layer, s in ctx.sparse.items():
        for name in ("sink_k", "sink_v", "tail_k", "tail_v"):
            out[f"sparse.{layer}.{name}"] = getattr(s, name)
        for f in fields(HostPageStore):
            out[f"sparse.{layer}.pages.{f.name}"] = getattr(s.pages, f.name)
        for f in fields(TreeIndex):
            value, name = getattr(s.tree, f.name), f"sparse.{layer}.tree.{f.name}"
            if isinstance(value, list):
                lists[name] = len(value)
                out.update({f"{name}.{i}": t for i, t in enumerate(value)})
            else:
                out[name] = value
    return {name: t.detach() for name, t in out.items()}, lists


def _plan(ctx: Context) -> tuple[bytes, dict[str, torch.Tensor], int]:
    """(header, tensors, total bytes). Tensor offsets are relative to the data start, which
    follows the header at the next alignment boundary."""
    tensors, lists = _tensors(ctx)
    entries, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        entries[name] = (str(t.dtype), list(t.shape), offset, nbytes)
        offset = _align(offset + nbytes)
    meta = {"model_id": ctx.model_id, "layout": ctx.layout, "prefill_s": ctx.prefill_s, "build_s": ctx.build_s,
            "dense": sorted(ctx.dense), "sparse": sorted(ctx.sparse), "lists": lists, "tensors": entries}
    header = json.dumps(meta).encode()
    return header, tensors, _data_start(len(header)) + offset


def _data_start(header_len: int) -> int:
    return _align(_PREFIX.size + header_len)


def packed_size(ctx: Context) -> int:
    """Bytes `pack_into` needs for this context."""
    return _plan(ctx)[2]


def packed_size_bound(config: IceCacheConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype, vocab_size: int, num_tokens: int) -> int:
    """An upper bound of packed_size for a document of num_tokens, known before it is
    prefilled (so its segment can be reserved and page-locked meanwhile): the layout of a
    context whose every sparse layer holds max_pages pages (~1.2x the pages a tree makes)."""
    H, D, c = num_kv_heads, head_dim, config
    meta = {"device": "meta"}
    num_sink = min(c.sink_tokens, num_tokens)
    num_tail = min(c.window_tokens, num_tokens - num_sink)
    mid = num_tokens - num_sink - num_tail
    pages = max_pages(mid, c.page_size, c.promotion_ratio, c.top_level_max)
    levels = level_sizes(mid, c.promotion_ratio, c.top_level_max) if mid else []

    def t(*shape, kind=dtype):
        return torch.empty(shape, dtype=kind, **meta)

    tree = TreeIndex(scale=t(H, kind=torch.float32), node_mean=[t(H, n, D) for n in levels],
                     node_var=[t(H, n, D) for n in levels], node_size=[t(H, n, kind=torch.float32) for n in levels],
                     node_parent=[t(H, n, kind=torch.long) for n in levels[:-1]],
                     page_parent=t(H, pages, kind=torch.long), page_mean=t(H, pages, D), page_var=t(H, pages, D),
                     page_lo=t(H, pages, D), page_hi=t(H, pages, D), page_valid=t(H, pages, kind=torch.long))
    store = HostPageStore(t(H, pages, c.page_size, D), t(H, pages, c.page_size, D),
                          t(H, pages, c.page_size, kind=torch.long), t(H, pages, kind=torch.long), t(H, pages, D),
                          t(H, pages, D))
    dense = {l: (t(H, num_tokens, D), t(H, num_tokens, D)) for l in range(min(c.dense_layers, num_layers))}
    sparse = {l: SparseLayer(t(H, num_sink, D), t(H, num_sink, D), t(H, num_tail, D), t(H, num_tail, D), tree, store)
              for l in range(c.dense_layers, num_layers)}
    skeleton = Context("", (0,) * num_tokens, layout_of(config), dense, sparse, t(vocab_size, kind=torch.float32))
    return _plan(skeleton)[2] + 4096  # slack: the real header's numbers may be longer


def pack_into(ctx: Context, buffer: memoryview) -> int:
    """Write a context into a writable buffer of at least `packed_size(ctx)` bytes; returns
    bytes used. Each tensor is copied once, from wherever it lies (a context built on the
    GPU goes device -> buffer directly: DMA when the buffer is page-locked)."""
    header, tensors, total = _plan(ctx)
    if len(buffer) < total:
        raise ValueError(f"buffer: {len(buffer)} bytes, the context needs {total}")
    _PREFIX.pack_into(buffer, 0, MAGIC, len(header))
    buffer[_PREFIX.size:_PREFIX.size + len(header)] = header
    meta = json.loads(header)
    target = torch.frombuffer(buffer, dtype=torch.uint8, count=total)
    base = _data_start(len(header))
    for name, t in tensors.items():
        _, _, offset, nbytes = meta["tensors"][name]
        if nbytes:
            target[base + offset:base + offset + nbytes].view(t.dtype).view(t.shape).copy_(t)
    return total


def unpack(buffer: memoryview) -> Context:
    """A Context whose tensors are views of `buffer` (no copy). The buffer may be read-only;
    the engine never writes to a context's tensors."""
    magic, header_len = _PREFIX.unpack_from(buffer, 0)
    if magic != MAGIC:
        raise ValueError("buffer: not a packed IceCache context (bad magic)")
    meta = json.loads(bytes(buffer[_PREFIX.size:_PREFIX.size + header_len]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        whole = torch.frombuffer(buffer, dtype=torch.uint8) if len(buffer) else torch.empty(0, dtype=torch.uint8)

    base = _data_start(header_len)

    def get(name: str) -> torch.Tensor:
        dtype, shape, offset, nbytes = meta["tensors"][name]
        return whole[base + offset:base + offset + nbytes].view(_DTYPES[dtype]).reshape(shape)

    dense = {l: (get(f"dense.{l}.k"), get(f"dense.{l}.v")) for l in meta["dense"]}
    sparse = {}
    for l in meta["sparse"]:
        p = f"sparse.{l}"
        tree = {}
        for f in fields(TreeIndex):
            name = f"{p}.tree.{f.name}"
            if name in meta["lists"]:
                tree[f.name] = [get(f"{name}.{i}") for i in range(meta["lists"][name])]
            else:
                tree[f.name] = get(name)
        pages = HostPageStore(**{f.name: get(f"{p}.pages.{f.name}") for f in fields(HostPageStore)})
        sparse[l] = SparseLayer(get(f"{p}.sink_k"), get(f"{p}.sink_v"), get(f"{p}.tail_k"), get(f"{p}.tail_v"),
                                TreeIndex(**tree), pages)
    token_ids = tuple(get("token_ids").tolist())
    return Context(meta["model_id"], token_ids, Layout.from_list(meta["layout"]), dense, sparse, get("last_logits"),
                   meta["prefill_s"], meta["build_s"])
