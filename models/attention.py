"""Attention as two parts merged by log-sum-exp: the document ("context") and the local tokens.

For a query q, exact attention over keys C ∪ L equals

    w = σ(lse_C(q) − lse_L(q)),   o = w·o_C(q) + (1 − w)·o_L(q)

so the context part can be swapped for anything that returns (o_C, lse_C): exact attention over
the document's cached keys (`ExactContextAttention`), or Nectar's fitted networks.

Shapes: queries are grouped by KV head, `q: [B, Hkv, G, T, D]` (G = query heads per KV head),
keys/values `[B, Hkv, S, D]`, outputs `o: [B, Hkv, G, T, D]` and `lse: [B, Hkv, G, T]` (fp32).
Positions are absolute token indices; an invalid (padding) key has position `INVALID_POS`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

INVALID_POS = 1 << 30  # a key at this position is never visible (k_pos <= q_pos fails)
_QUERY_CHUNK = 512  # query rows per block, bounds the [.., T, S] score matrix in long prefills


class ContextAttention(Protocol):
    """Attention of the local queries over the document of one layer."""

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, Hkv, G, T, D], q_pos: [B, T] -> (o: [B, Hkv, G, T, D], lse: [B, Hkv, G, T] fp32)."""
        ...


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype attention math runs in: fp32 for half types, else the dtype (fp64 stays fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.promote_types(dtype, torch.float32)


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cpu_flash_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `attention_with_lse` may use the CPU flash kernel: CPU, unmasked, same batch and
    dtype, at least one key (the kernel cannot take zero keys), no autograd (kept on the explicit path)."""
    return (
        _CPU_FLASH is not None
        and mask is None
        and q.device.type == "cpu"
        and q.dtype in _CPU_FLASH_DTYPES
        and q.dtype == k.dtype == v.dtype
        and k.shape[0] == q.shape[0]
        and k.shape[2] > 0
        and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    )


def visibility(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Causal (and sliding-window) mask. q_pos: [B, T], k_pos: [B or 1, S] -> [B, 1, 1, T, S] bool."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    vis = kp <= qp
    if window:
        vis = vis & (qp - kp < window)
    return vis[:, None, None]


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with its log-normalizer.

    q: [B, Hkv, G, T, D], k/v: [B|1, Hkv, S, D], mask: broadcastable to [B, Hkv, G, T, S] or None.
    Returns o: [B, Hkv, G, T, D] (q's dtype) and lse: [B, Hkv, G, T] fp32. A query that sees no
    key gets o = 0 and lse = -inf, so merging with it is a no-op.
    """
    b, hkv, g, t, d = q.shape
    if b > 1 and k.shape[0] == 1 and mask is None:
        # A document shared by the batch: fold the batch into the query rows so K and V are read
        # once, not broadcast (which copies them B times per layer).
        qf = q.permute(1, 0, 2, 3, 4).reshape(1, hkv, 1, b * g * t, d)
        o, lse = attention_with_lse(qf, k, v, scale, None)
        o = o.view(hkv, b, g, t, d).permute(1, 0, 2, 3, 4)
        return o, lse.view(hkv, b, g, t).permute(1, 0, 2, 3)
    if _cpu_flash_ok(q, k, v, mask):
        # Without a mask, exact attention with its log-normalizer is one call of PyTorch's CPU
        # flash kernel (the one SDPA uses; tiled online softmax, fp32/fp64 accumulation). With G
        # query heads folded into rows it needs no GQA support. Same result up to float rounding
        # (~1e-7 in fp32), and far fewer small ops per decode step than the explicit path below.
        o, lse = _CPU_FLASH(q.reshape(b, hkv, g * t, d), k, v, 0.0, False, attn_mask=None, scale=scale)
        return o.reshape(b, hkv, g, t, d), lse.reshape(b, hkv, g, t)
    acc = _acc_dtype(q.dtype)
    # The G query heads of a KV head are just more query rows: [B, Hkv, G*T, D] @ [B|1, Hkv, D, S]
    # is one batched matmul over the keys as stored. (A [.., G, ..] broadcast against k[:, :, None]
    # would make matmul materialise k and v G times over, a full copy of the cache every step.)
    # With matching batches it is a plain bmm over [B*Hkv, ...] views (fewer ops than matmul's
    # broadcasting path: this runs twice per layer per decode step).
    rows = g * t
    if k.shape[0] == b:
        s = torch.bmm(q.reshape(b * hkv, rows, d), k.reshape(b * hkv, -1, d).transpose(1, 2))
    else:
        s = torch.matmul(q.reshape(b, hkv, rows, d), k.transpose(-1, -2))
    s = s.view(b, hkv, g, t, -1)  # [B, Hkv, G, T, S]
    if s.dtype != acc:
        s = s.to(acc)
    # s is a fresh tensor: without autograd it is updated in place (no temporaries).
    inplace = not s.requires_grad
    s = s.mul_(scale) if inplace else s * scale
    if mask is not None:
        s = s.masked_fill_(~mask, float("-inf")) if inplace else s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, T]
    # p = exp(s - lse); a row with no visible key has lse = -inf, and clamping it to the lowest
    # finite value keeps its p at exp(-inf) = 0 (instead of NaN), so o = 0 there.
    shift = lse.clamp_min(torch.finfo(acc).min).unsqueeze(-1)
    p = s.sub_(shift).exp_() if inplace else torch.exp(s - shift)
    if p.dtype != v.dtype:
        p = p.to(v.dtype)
    if v.shape[0] == b:
        o = torch.bmm(p.view(b * hkv, rows, -1), v.reshape(b * hkv, -1, d))
    else:
        o = torch.matmul(p.view(b, hkv, rows, -1), v)
    return o.view(b, hkv, g, t, d), lse  # o: [B, Hkv, G, T, D]


def chunked_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_lse` in blocks of query rows, with the mask built from positions."""
    if q.shape[3] <= _QUERY_CHUNK:  # one block (every decode step): no slicing
        return attention_with_lse(q, k, v, scale, visibility(q_pos, k_pos, window) if causal or window else None)
    outs, lses = [], []
    for t0 in range(0, q.shape[3], _QUERY_CHUNK):
        qc, pc = q[:, :, :, t0 : t0 + _QUERY_CHUNK], q_pos[:, t0 : t0 + _QUERY_CHUNK]
        mask = visibility(pc, k_pos, window) if causal or window else None
        o, lse = attention_with_lse(qc, k, v, scale, mask)
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3)


def merge_attention(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Exact merge of two attention parts. o*: [..., T, D], lse*: [..., T] fp32 -> o: [..., T, D]."""
    # σ(lse1 − lse2) = exp(lse1 − logaddexp(lse1, lse2)). It is already exact at one infinite
    # side (σ(−inf) = 0, σ(+inf) = 1); only both −inf gives NaN (−inf − −inf): no key on either
    # side, both o are 0, any w would do and 0 is taken.
    w = torch.sigmoid(lse1 - lse2)
    # (in place only without autograd: sigmoid's backward reads its output)
    w = w.nan_to_num(nan=0.0) if w.requires_grad else w.nan_to_num_(nan=0.0)
    acc = _acc_dtype(o1.dtype)  # fp32 math for half inputs, fp64 stays fp64
    w = w[..., None]
    if w.dtype != acc:
        w = w.to(acc)
    if o1.dtype == acc and o2.dtype == acc:  # no casts to spend time on (fp32 / fp64)
        return w * o1 + (1 - w) * o2
    return (w * o1.to(acc) + (1 - w) * o2.to(acc)).to(o1.dtype)


class ExactContextAttention:
    """Exact attention over the document's cached (post-RoPE) keys and values of one layer.

    k, v: [1 or B, Hkv, n, D]; positions: [n] (0..n-1 for a document at the start).
    `window` > 0 for sliding-window layers: a query at p sees document keys with p - k < window.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int, scale: float):
        self.k, self.v, self.window, self.scale = k, v, window, scale
        self.positions = positions[None]  # [1, n]

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Document keys all precede the local queries, so only a sliding window needs a mask.
        return chunked_attention_with_lse(
            q, self.k, self.v, self.scale, q_pos, self.positions, self.window, causal=False
        )

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def select(self, index: torch.Tensor) -> "ExactContextAttention":
        """The same layer's cache restricted to the document positions `index` (a 1-D index tensor)."""
        return ExactContextAttention(
            self.k[:, :, index], self.v[:, :, index], self.positions[0, index], self.window, self.scale
        )


class CompositeContext:
    """Several context parts of one layer (e.g. exact template prefix + Nectar heads), merged by LSE."""

    def __init__(self, parts: list):
        self.parts = parts

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o, lse = self.parts[0](q, q_pos)
        for part in self.parts[1:]:
            o2, lse2 = part(q, q_pos)
            o, lse = merge_attention(o, lse, o2, lse2), torch.logaddexp(lse, lse2)
        return o, lse


class LocalKV:
    """Pre-allocated KV buffer of one layer for the local tokens (prompt + generated).

    k, v: [B, Hkv, capacity, D]; pos: [B, capacity] with INVALID_POS in unused/padding slots.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, capacity), INVALID_POS, dtype=torch.long, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D]; pos: [B, T] (INVALID_POS marks padding)."""
        t = k.shape[2]
        if self.length + t > self.capacity:
            self._grow(self.length + t)
        self.k[:, :, self.length : self.length + t] = k
        self.v[:, :, self.length : self.length + t] = v
        self.pos[:, self.length : self.length + t] = pos
        self.length += t

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        pos = self.pos.new_full((self.pos.shape[0], cap), INVALID_POS)
        pos[:, : self.length] = self.pos[:, : self.length]
        self.pos = pos

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.length
        return self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]


def sdpa_local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Local-only attention through SDPA (no lse needed when there is no context part).

    q: [B, Hkv, G, T, D], k/v: [B, Hkv, S, D], mask: [B, 1, 1, T, S] -> o: [B, Hkv, G, T, D].
    """
    b, hkv, g, t, d = q.shape
    qf = q.reshape(b, hkv * g, t, d)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask[:, :, 0], scale=scale, enable_gqa=g > 1)
    return o.view(b, hkv, g, t, d)
