"""Pure-torch reference of the fused Nectar layer attention (what `triton_nectar` computes).

For one layer, every query head h (KV head j = h // G) and query token t:

    (f, g) = Nectar head j at q              # target net f ≈ o_ctx, score net g ≈ lse_ctx
    (o_loc, lse_loc) = exact attention over the local keys the token sees
    w = σ(g − lse_loc),   o = w·f + (1 − w)·o_loc

Local keys of batch row b are the slots kv_start[b] ≤ s < kv_len[b] of k_loc/v_loc; the T query
tokens are the last T of them (slots kv_len[b] − T + t), causal: token t sees s ≤ kv_len[b] − T + t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import unpack


def _mlp_reference(x: torch.Tensor, p: dict, scale: float):
    """nectar_export.heads.MLPGroup: x [Hkv, N, D], p {name: [Hkv, *shape]} -> (f [Hkv, N, D], g [Hkv, N]).
    `scale` is unused (the mlp learns its own)."""
    z = (x - p["q_mean"][:, None]) / p["q_std"][:, None]
    h = F.gelu(torch.bmm(z, p["w1"]) + p["b1"][:, None])
    h = F.gelu(torch.bmm(h, p["w2"]) + p["b2"][:, None])
    f = torch.bmm(h, p["w3"]) + p["b3"][:, None] + torch.bmm(z, p["skip"])
    s = F.gelu(torch.bmm(z, p["s1"]) + p["sb1"][:, None])
    s = F.gelu(torch.bmm(s, p["s2"]) + p["sb2"][:, None])
    g = (s * p["s3"][:, None]).sum(-1) + p["sb3"]  # [Hkv, N]
    return f * p["o_std"][:, None] + p["o_mean"][:, None], g * p["l_std"] + p["l_mean"]


def _quadrature_reference(x: torch.Tensor, p: dict, scale: float):
    """nectar_export.heads.QuadratureGroup: x [Hkv, N, D], p {name: [Hkv, *shape]} -> (f [Hkv, N, D], g [Hkv, N])."""
    s = scale * torch.bmm(x, p["keys"].transpose(1, 2)) + p["bias"][:, None]  # [Hkv, N, m]
    return torch.bmm(torch.softmax(s, -1), p["values"]), torch.logsumexp(s, -1)


# variant -> (x, unpacked blocks, scale) -> (f, g)
_REFERENCES = {"mlp": _mlp_reference, "quadrature": _quadrature_reference}


def nectar_heads_reference(x: torch.Tensor, heads_w, heads_b, variant: str, width: int, scale: float):
    """x: [Hkv, N, D] fp32/fp64 queries per KV head -> (f: [Hkv, N, D], g: [Hkv, N]).

    Exactly nectar_export.heads.MLPGroup / QuadratureGroup on the packed weights."""
    p = {k: v.to(x.dtype) for k, v in unpack(heads_w, heads_b, variant, width, x.shape[-1]).items()}
    return _REFERENCES[variant](x, p, scale)


def local_attention_reference(q, k_loc, v_loc, kv_len, kv_start, scale: float):
    """q: [B, Hq, T, D] (compute dtype), k/v: [B, Hkv, S, D] -> (o [B, Hq, T, D], lse [B, Hq, T])."""
    b, hq, t, d = q.shape
    hkv, s = k_loc.shape[1], k_loc.shape[2]
    g = hq // hkv
    k = k_loc.to(q.dtype).repeat_interleave(g, dim=1)  # [B, Hq, S, D]
    v = v_loc.to(q.dtype).repeat_interleave(g, dim=1)
    sc = scale * q @ k.transpose(-1, -2)  # [B, Hq, T, S]
    slot = torch.arange(s, device=q.device)
    last = kv_len.long()[:, None] - t + torch.arange(t, device=q.device)[None]  # [B, T]
    vis = (slot[None, None] <= last[..., None]) & (slot[None, None] >= kv_start.long()[:, None, None])  # [B, T, S]
    sc = sc.masked_fill(~vis[:, None], float("-inf"))
    lse = torch.logsumexp(sc, -1)
    p = torch.exp(sc - lse.clamp_min(torch.finfo(sc.dtype).min)[..., None])
    return p @ v, lse


def nectar_layer_attention_reference(
    q: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor, kv_len: torch.Tensor,
    heads_w: torch.Tensor, heads_b: torch.Tensor, variant: str, width: int, scale: float,
    kv_start: torch.Tensor | None = None, compute_dtype=torch.float32,
) -> torch.Tensor:
    """Same signature as `triton_nectar.nectar_layer_attention`; computed in `compute_dtype`.

    q: [B, Hq, T, D]; k_loc, v_loc: [B, Hkv, S, D]; kv_len, kv_start: [B] int; heads_w/heads_b:
    [Hkv, P_w] / [Hkv, P_b] (weights.py). Returns o: [B, Hq, T, D] in q's dtype.
    """
    b, hq, t, d = q.shape
    hkv = k_loc.shape[1]
    g = hq // hkv
    if kv_start is None:
        kv_start = torch.zeros_like(kv_len)
    qc = q.to(compute_dtype)
    x = qc.view(b, hkv, g, t, d).permute(1, 0, 2, 3, 4).reshape(hkv, b * g * t, d)  # [Hkv, B*G*T, D]
    f, lse_ctx = nectar_heads_reference(x, heads_w, heads_b, variant, width, scale)
    f = f.view(hkv, b, g, t, d).permute(1, 0, 2, 3, 4).reshape(b, hq, t, d)
    lse_ctx = lse_ctx.view(hkv, b, g, t).permute(1, 0, 2, 3).reshape(b, hq, t)
    o_loc, lse_loc = local_attention_reference(qc, k_loc, v_loc, kv_len, kv_start, scale)
    w = torch.sigmoid(lse_ctx - lse_loc)[..., None]  # σ(g − lse_loc); lse_loc = −inf gives w = 1
    return (w * f + (1 - w) * o_loc).to(q.dtype)


def nectar_retained_attention_reference(
    q: torch.Tensor, k_loc: torch.Tensor, v_loc: torch.Tensor, kv_len: torch.Tensor,
    heads_w: torch.Tensor, heads_b: torch.Tensor, variant: str, width: int, scale: float,
    ret_k: torch.Tensor, ret_v: torch.Tensor, kv_heads: torch.Tensor, subset: bool,
    kv_start: torch.Tensor | None = None, compute_dtype=torch.float32,
) -> torch.Tensor:
    """What the TensorRT plugin `NectarRetainedAttention` computes: `nectar_layer_attention_reference`
    with the retained KV heads' rows (kv_heads: [R]; ret_k, ret_v: [R, c, D] their stored document
    keys/values; subset: a token budget) replaced as nectar_kernels.retained does."""
    from .retained import overwrite_retained_rows

    if kv_start is None:
        kv_start = torch.zeros_like(kv_len)
    o = nectar_layer_attention_reference(q, k_loc, v_loc, kv_len, heads_w, heads_b, variant, width, scale, kv_start,
                                         compute_dtype).to(compute_dtype)
    out = overwrite_retained_rows(o, q.to(compute_dtype), k_loc, v_loc, kv_len, kv_start, ret_k, ret_v, kv_heads, scale,
                                  subset, heads_w, heads_b, width, compute_dtype)
    return out.to(q.dtype)
