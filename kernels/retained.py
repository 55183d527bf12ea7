"""Retained heads (`nectar fit --retain-heads`) in a fused layer attention: torch ops that overwrite
the retained KV heads' rows of the layer's attention output.

The fused kernels (triton_nectar.nectar_layer_attention, its PyTorch reference) evaluate every KV
head's networks. For a retained head the document part is instead exact attention over its stored
document keys/values (or, under a token budget, the kept tokens' attention merged by log-sum-exp with
the network, which serves the other tokens), then merged with exact attention over the local keys,
as the torch backend's RetainedHeadsContext does. One function serves the fused CUDA-graph step
(runtime/backends/cuda_graph.py), the TensorRT plugin `NectarRetainedAttention` (trt_plugin.py) and
the plugin graph's CPU reference (reference.py), so all three compute the same rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def retained_query_heads(kv_heads: "torch.Tensor", group: int) -> "torch.Tensor":
    """kv_heads: [R] KV-head indices -> [R*G] their query heads, KV head-major."""
    import torch

    kv = kv_heads.long()
    return (kv[:, None] * group + torch.arange(group, device=kv.device)).reshape(-1)


def retained_rows(q: "torch.Tensor", k_loc: "torch.Tensor", v_loc: "torch.Tensor", kv_len: "torch.Tensor",
                  kv_start: "torch.Tensor", ret_k: "torch.Tensor", ret_v: "torch.Tensor", kv_heads: "torch.Tensor",
                  scale: float, subset: bool, heads_w: "torch.Tensor | None" = None, heads_b: "torch.Tensor | None" = None,
                  width: int = 0, compute_dtype=None, q_heads: "torch.Tensor | None" = None) -> "torch.Tensor":
    """The retained heads' attention output rows.

    q: [B, Hq, T, D]; k_loc, v_loc: [B, Hkv, S, D] local keys/values (slots kv_start[b] ≤ s < kv_len[b],
    the T queries are the last T of them, causal); ret_k, ret_v: [R, c, D] stored post-RoPE document
    keys/values of the KV heads kv_heads: [R]; subset: their networks (mlp, packed heads_w: [R, P_w],
    heads_b: [R, P_b] of those R heads, `width`) serve the document tokens not kept.
    q_heads: retained_query_heads(kv_heads, G) when the caller already holds it (the decode step does).
    Returns o: [B, R*G, T, D] in `compute_dtype` (default fp32), rows in retained_query_heads order.
    """
    import torch

    from nectar_models.attention import attention_with_lse, merge_attention

    from .reference import local_attention_reference, nectar_heads_reference

    dt = compute_dtype or torch.float32
    b, hq, t, d = q.shape
    r, g = kv_heads.numel(), hq // k_loc.shape[1]
    kv = kv_heads.long()
    qh = retained_query_heads(kv, g) if q_heads is None else q_heads
    qr = q.index_select(1, qh).to(dt)  # [B, R*G, T, D]
    qs = qr.view(b, r, g, t, d)
    o, lse = attention_with_lse(qs, ret_k.to(dt)[None], ret_v.to(dt)[None], scale, None)  # [B, R, G, T, D], [B, R, G, T]
    if subset:
        x = qs.permute(1, 0, 2, 3, 4).reshape(r, b * g * t, d)
        f, gn = nectar_heads_reference(x, heads_w, heads_b, "mlp", width, scale)
        f = f.view(r, b, g, t, d).permute(1, 0, 2, 3, 4)
        gn = gn.view(r, b, g, t).permute(1, 0, 2, 3)
        o, lse = merge_attention(o, lse, f, gn), torch.logaddexp(lse, gn)
    o_loc, lse_loc = local_attention_reference(qr, k_loc.index_select(1, kv), v_loc.index_select(1, kv), kv_len, kv_start, scale)
    return merge_attention(o.reshape(b, r * g, t, d), lse.reshape(b, r * g, t), o_loc, lse_loc)


def overwrite_retained_rows(out: "torch.Tensor", q: "torch.Tensor", k_loc: "torch.Tensor", v_loc: "torch.Tensor",
                            kv_len: "torch.Tensor", kv_start: "torch.Tensor", ret_k: "torch.Tensor", ret_v: "torch.Tensor",
                            kv_heads: "torch.Tensor", scale: float, subset: bool, heads_w=None, heads_b=None,
                            width: int = 0, compute_dtype=None) -> "torch.Tensor":
    """`out` [B, Hq, T, D] (a fused layer attention's output) with the retained heads' rows replaced by
    `retained_rows` (same arguments; heads_w/heads_b: the layer's packed weights of *all* KV heads, the
    retained ones are picked here). In place; returns `out`."""
    g = q.shape[1] // k_loc.shape[1]
    kv = kv_heads.long()
    if subset:
        heads_w, heads_b = heads_w.index_select(0, kv), heads_b.index_select(0, kv)
    qh = retained_query_heads(kv, g)
    o = retained_rows(q, k_loc, v_loc, kv_len, kv_start, ret_k, ret_v, kv, scale, subset, heads_w, heads_b, width,
                      compute_dtype, qh)
    return out.index_copy_(1, qh, o.to(out.dtype))
