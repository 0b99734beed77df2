"""Triton kernels for one sparse layer's decode step: push the new token, walk the tree,
rank pages, attend over sinks + selected pages + window.

Why: written in torch ops, a sparse layer's step is ~400 tiny kernels, and on an H100 a
CUDA graph of them costs more than reading the 8B model's weights. Here a layer is about
20 kernels whose cost does not grow with the context: only the children of kept tree
nodes are ranked, and pages are read where they lie (host memory, through a UVA view).

One file per concern: common (shapes, launches, shared helpers), walk (tree walk and page
choice by bounds), rerank (page choice by keys), push, attention, model (norms, RoPE,
SiLU). Each has a torch reference (index/select.py, decode_layers.py) that
tests/icecache/kernels/ checks it against.
Without CUDA they can run in Triton's interpreter (slow, exact), which is how CPU CI
checks them: TRITON_INTERPRET=1 must be set before torch is imported (torch imports
triton, and the flag is read then); tests/conftest.py does that.
"""
