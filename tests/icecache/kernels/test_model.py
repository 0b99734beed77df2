"""kernels/model.py against transformers' modules: RMSNorm, rotary embedding, the residual
add, SiLU-and-multiply and merged projections give what the modules give."""

import pytest
import torch

from icecache.testing import random_model, tiny_config

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_norm_and_rope_equal_the_modules(arch):
    """RMSNorm and rotary embedding as single kernels give what transformers' modules give,
    in fp32 and, on a GPU, in bf16 (where they must round after each product, as torch
    does; Triton's interpreter mishandles bf16 memory, so CPU CI checks fp32 only)."""
    from icecache.kernels.model import can_fuse_norm, rms_norm, rope
    for dtype in (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,):
        model = random_model(tiny_config(arch, num_hidden_layers=1), DEVICE, dtype)
        layer, D = model.model.layers[0], model.config.head_dim
        h = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
        norm = layer.input_layernorm
        assert can_fuse_norm(norm, h)
        with torch.no_grad():
            norm.weight.normal_()
            assert torch.equal(rms_norm(h, norm), norm(h))
            positions = torch.tensor([[1234], [5], [77777]], device=DEVICE)  # a batch of 3 tokens
            cos, sin = model.model.rotary_emb(h, positions)  # [3, 1, D]
            q = torch.randn(3, 1, 4, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
            k = torch.randn(3, 1, 2, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
            module = __import__(type(layer.self_attn).__module__, fromlist=["apply_rotary_pos_emb"])
            ref_q, ref_k = module.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            got_q, got_k = rope(q.view(3, 4, D), k.view(3, 2, D), cos.view(3, D), sin.view(3, D))
        # bf16: the last two bits may round differently than transformers' expression does;
        # a wrong partner or sign is off by the value's own size
        tol = 1e-6 if dtype == torch.float32 else 2 ** -5
        for got, ref in ((got_q, ref_q[:, :, 0]), (got_k, ref_k[:, :, 0])):
            assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (got - ref).abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_add_norm_mlp_and_merged_projections_equal_the_modules(arch):
    """The residual add folded into RMSNorm, silu(gate) * up as one kernel, and q/k/v (and
    gate/up) merged into one weight give what the modules give; the modules, now views
    into the merged weight, still give what they gave, and merging twice reuses it."""
    from icecache.kernels.model import add_rms_norm, merge_linears, rope, silu_mul
    model = random_model(tiny_config(arch, num_hidden_layers=1), DEVICE, torch.float32)
    layer, D = model.model.layers[0], model.config.head_dim
    attn, mlp = layer.self_attn, layer.mlp
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 1, model.config.hidden_size, generator=gen).to(DEVICE)
    delta = torch.randn(3, 1, model.config.hidden_size, generator=gen).to(DEVICE)
    with torch.no_grad():
        norm = layer.post_attention_layernorm
        norm.weight.normal_()
        if attn.q_proj.bias is not None:
            for m in (attn.q_proj, attn.k_proj, attn.v_proj):
                m.bias.normal_()
        ref_h = h + delta
        ref_x = norm(ref_h)
        got_x = add_rms_norm(h, delta, norm)
        assert torch.allclose(h, ref_h, atol=1e-6) and torch.allclose(got_x, ref_x, atol=1e-5, rtol=1e-5)
        ref = [m(got_x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        ref_mlp = mlp(got_x)
        qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        assert merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])[0] is qkv[0]
        assert attn.q_proj.weight.data_ptr() == qkv[0].data_ptr()  # a view: no second copy
        got = torch.nn.functional.linear(got_x, *qkv).split([r.shape[-1] for r in ref], dim=-1)
        for g_, r in zip(got, ref):
            assert torch.allclose(g_, r, atol=1e-5, rtol=1e-5)
        assert torch.allclose(attn.k_proj(got_x), ref[1], atol=1e-6)  # the module alone, unchanged
        gate_up = merge_linears([mlp.gate_proj, mlp.up_proj])
        got_mlp = mlp.down_proj(silu_mul(torch.nn.functional.linear(got_x, *gate_up)))
        assert torch.allclose(got_mlp, ref_mlp, atol=1e-5, rtol=1e-5)
        # rope reads q and k straight from the merged output (each token's heads contiguous)
        cos, sin = model.model.rotary_emb(h, torch.tensor([[3], [900], [41]], device=DEVICE))
        Hq, Hk = model.config.num_attention_heads, model.config.num_key_value_heads
        q, k = got[0].view(3, Hq, D), got[1].view(3, Hk, D)
        assert not q.is_contiguous()
        got_q, got_k = rope(q, k, cos.view(3, D), sin.view(3, D))
        ref_q, ref_k = rope(q.contiguous(), k.contiguous(), cos.view(3, D), sin.view(3, D))
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert merge_linears([attn.q_proj, torch.nn.Identity()]) is None


def test_a_model_copied_or_cast_after_merging_is_merged_anew():
    """A model merged once (an Engine built on it) and then copied and cast to another
    dtype (as a user makes a bf16 engine of the same model) keeps the old merge as a stale
    attribute: merging again gives the cast weights, not the first ones."""
    import copy

    from icecache.kernels.model import merge_linears
    model = random_model(tiny_config("llama", num_hidden_layers=1), DEVICE, torch.float32)
    attn = model.model.layers[0].self_attn
    first = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])[0]
    cast = copy.deepcopy(model).to(torch.bfloat16).model.layers[0].self_attn
    weight, _ = merge_linears([cast.q_proj, cast.k_proj, cast.v_proj])
    assert weight.dtype == torch.bfloat16 and cast.k_proj.weight.data_ptr() != first.data_ptr()
    assert torch.equal(weight[:cast.q_proj.weight.shape[0]], cast.q_proj.weight)
    assert merge_linears([cast.q_proj, cast.k_proj, cast.v_proj])[0] is weight  # and reused from then on
