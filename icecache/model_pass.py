"""A pass through a transformers decoder's layers outside its forward, the attention left
to the caller, the model's own small ops as fused kernels (kernels.model) where they run:
RMSNorm alone or after the residual add, q/k/v and gate/up each one GEMM, the rotary
embedding and silu(gate) * up one kernel each, where transformers' modules launch ~35
kernels a layer for them. A decode step runs it inside a CUDA graph (each launch still a
slot of it); a prefill eagerly, where each launch costs the launching thread ~20 µs and a
question's prefill is bound by its launches. The kernels round where transformers rounds,
so the pass gives the values the model's forward gives (tests/icecache/kernels/)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

# (layer, q [N, T, Hq, D], k [N, T, H, D], v [N, T, H, D], scaling) -> attention output [N, T, Hq * D]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class ModelPass:
    """The layers of a Llama-family decoder (Llama, Mistral, Qwen2/3) run token rows
    [N, T] through; `fused`: with kernels.model's kernels (CUDA, or Triton's interpreter)."""

    def __init__(self, model: torch.nn.Module, fused: bool) -> None:
        inner = model.model
        self.model, self.fused = model, fused
        self.embed, self.layers, self.final_norm, self.rotary = (inner.embed_tokens, inner.layers, inner.norm,
                                                                 inner.rotary_emb)
        attn0 = self.layers[0].self_attn
        self.apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        self.head_dim = attn0.head_dim
        self.num_kv_heads = model.config.num_key_value_heads
        self.group = model.config.num_attention_heads // self.num_kv_heads
        self.merged = [_merge(layer) if fused else (None, None) for layer in self.layers]

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from icecache.kernels.model import can_fuse_norm, rms_norm
            if can_fuse_norm(module, x):
                return rms_norm(x, module)
        return module(x)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                 module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, module(h + delta)); one kernel where the norm can be fused (h is
        then updated in place)."""
        if delta is None:
            return h, self.norm(module, h)
        if self.fused:
            from icecache.kernels.model import add_rms_norm, can_fuse_norm
            if can_fuse_norm(module, h) and delta.dtype == h.dtype and delta.shape == h.shape:
                return h, add_rms_norm(h, delta.contiguous(), module)
        h = h + delta
        return h, self.norm(module, h)

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.merged[i][1]
        if gate_up is None:
            return self.layers[i].mlp(x)
        from icecache.kernels.model import silu_mul
        return self.layers[i].mlp.down_proj(silu_mul(torch.nn.functional.linear(x, *gate_up)))

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """tokens, positions: [N, T] on the device. -> the final norm's output [N, T, hidden]
        (what the model's lm_head reads)."""
        N, T = tokens.shape
        H, g, D = self.num_kv_heads, self.group, self.head_dim
        h = self.embed(tokens)  # [N, T, hidden]
        cos, sin = self.rotary(h, positions)  # [N, T, D]
        delta = None  # what the last block adds to h, folded into the next norm
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h, x = self.add_norm(h, delta, layer.input_layernorm)
            qkv = self.merged[i][0]
            if qkv is not None:
                q, k, v = torch.nn.functional.linear(x, *qkv).split([H * g * D, H * D, H * D], dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q, k, v = q.view(N, T, H * g, D), k.view(N, T, H, D), v.view(N, T, H, D)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = self.norm(attn.q_norm, q.contiguous()), self.norm(attn.k_norm, k.contiguous())
            if self.fused:
                from icecache.kernels.model import rope
                q, k = rope(q.reshape(N * T, H * g, D), k.reshape(N * T, H, D), cos.reshape(N * T, D),
                            sin.reshape(N * T, D))
                q, k = q.view(N, T, H * g, D), k.view(N, T, H, D)
            else:
                q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [N, heads, T, D]
                q, k = q.transpose(1, 2), k.transpose(1, 2)
            h, x = self.add_norm(h, attn.o_proj(attend(i, q, k, v, attn.scaling)), layer.post_attention_layernorm)
            delta = self.mlp(i, x)
        return self.add_norm(h, delta, self.final_norm)[1]


def _merge(layer: torch.nn.Module) -> tuple:
    """The layer's q/k/v and (for a SiLU-gated MLP) gate/up projections merged into one
    weight each (kernels.model.merge_linears), or None where they cannot be."""
    from icecache.kernels.model import merge_linears
    attn, mlp = layer.self_attn, layer.mlp
    qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up = None
    if (all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
        gate_up = merge_linears([mlp.gate_proj, mlp.up_proj])
    return qkv, gate_up
