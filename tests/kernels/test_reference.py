"""The pure-torch reference of the fused kernel against the model's own pieces: NectarHeads
(via NectarContext) + attention_with_lse over the local KV + merge_attention."""

from __future__ import annotations

import pytest
import torch

from nectar_export.heads import HeadsSpec, NectarHeads, NectarContext
from nectar_kernels.reference import nectar_layer_attention_reference
from nectar_kernels.weights import layout, pack_layer, unpack
from nectar_models.attention import attention_with_lse, merge_attention, visibility


def _random_heads(variant: str, widths, hkv=2, d=16, seed=0) -> NectarHeads:
    torch.manual_seed(seed)
    heads = NectarHeads(HeadsSpec(variant, len(widths), hkv, d, tuple(widths), d**-0.5))
    with torch.no_grad():
        for name, p in list(heads.named_parameters()) + list(heads.named_buffers()):
            if name.endswith("std"):
                p.copy_(0.5 + torch.rand_like(p))  # positive scales
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 2 else 1.0))
    return heads


def _model_path(heads, layer, q, k, v, kv_len, kv_start):
    """What the decoder does today: NectarContext + exact local attention + merge_attention."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, t, d)
    o_ctx, lse_ctx = NectarContext(heads, layer)(qg, None)
    s = k.shape[2]
    slot = torch.arange(s)[None].expand(b, s)
    kpos = torch.where((slot >= kv_start[:, None]) & (slot < kv_len[:, None]), slot, 1 << 30)
    qpos = kv_len[:, None] - t + torch.arange(t)[None]
    o_loc, lse_loc = attention_with_lse(qg, k, v, d**-0.5, visibility(qpos, kpos, 0))
    return merge_attention(o_ctx, lse_ctx, o_loc, lse_loc).reshape(b, hq, t, d)


@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
@pytest.mark.parametrize("t", [1, 4])
def test_reference_matches_model_path(variant, t):
    heads = _random_heads(variant, (32, 48, 32))
    b, hkv, g, d, s = 3, 2, 3, 16, 11
    for layer in range(3):
        q, k, v = torch.randn(b, hkv * g, t, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
        kv_len = torch.tensor([s, s - 2, t], dtype=torch.int32)  # the last row sees only its own tokens
        kv_start = torch.tensor([0, 3, 0], dtype=torch.int32)
        hw, hb, var, width = pack_layer(heads, layer)
        assert var == variant and width == heads.spec.widths[layer]
        got = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, var, width, d**-0.5, kv_start)
        want = _model_path(heads, layer, q, k, v, kv_len.long(), kv_start.long())
        err = (got - want).norm() / want.norm()
        assert err < 1e-5, (layer, err.item())


def test_pack_unpack_roundtrip():
    heads = _random_heads("mlp", (48,), hkv=2, d=16)
    hw, hb, _, width = pack_layer(heads, 0)
    w, b = layout("mlp", width, 16)
    assert hw.shape == (2, max(o + torch.Size(s).numel() for o, s in w.values()))
    p = unpack(hw, hb, "mlp", width)
    grp = heads.groups[0]
    assert torch.equal(p["w2"], grp.w2.detach()) and torch.equal(p["l_mean"][:, 0], grp.l_mean[:, 0].detach())
    assert torch.equal(p["s3"], grp.s3.detach()[..., 0]) and torch.equal(p["q_mean"], grp.q_mean.detach()[:, 0])


def test_pack_bad_shape_is_refused():
    heads = _random_heads("mlp", (48,), hkv=2, d=16)
    hw, hb, _, _ = pack_layer(heads, 0)
    with pytest.raises(ValueError):
        unpack(hw[:, :-1], hb, "mlp", 48)
    with pytest.raises(ValueError, match="head dim 32"):
        unpack(hw, hb, "mlp", 48, d=32)
    assert {k: v.shape for k, v in unpack(hw, hb, "mlp", 48, d=16).items()} == {k: v.shape for k, v in unpack(hw, hb, "mlp", 48).items()}
