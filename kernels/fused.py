"""Small fused ops of a decode step (RMSNorm, RoPE + KV-cache write, SiLU·up): one Triton
launch each on CUDA, the same math in plain torch elsewhere (CPU). Triton is imported lazily."""

from __future__ import annotations

import torch

from .launch import launch


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [M, N] (contiguous rows), w: [N] fp32 (offset already added) -> [M, N] in x's dtype."""
    if x.device.type != "cuda":
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)
    from ._triton_fused import _rmsnorm_kernel

    y = torch.empty_like(x)
    n = x.shape[-1]
    launch(_rmsnorm_kernel, (x.shape[0],), x, w, y, x.stride(0), y.stride(0), n, eps, BLOCK=_next_pow2(n),
           num_warps=4 if n <= 2048 else 8)
    return y


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (rounded to x's dtype, as `x + delta` would be), then rmsnorm(x) * w.
    x, delta: [M, N]; w: [N] fp32 -> [M, N] in x's dtype. One launch on CUDA."""
    if x.device.type != "cuda":
        x.add_(delta)
        return rmsnorm(x, w, eps)
    from ._triton_fused import _add_rmsnorm_kernel

    y = torch.empty_like(x)
    n = x.shape[-1]
    launch(_add_rmsnorm_kernel, (x.shape[0],), x, delta, w, y, x.stride(0), delta.stride(0), y.stride(0), n, eps,
           BLOCK=_next_pow2(n), num_warps=4 if n <= 2048 else 8)
    return y


def rope_store(qkv: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, slot: torch.Tensor,
               q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, hq: int, hkv: int) -> None:
    """qkv: [B*T, (Hq + 2 Hkv) * D] (rows b*T + t), pos: [B, T] int, inv_freq: [D/2] fp32,
    slot: [B] int32 first cache slot of this step. Writes RoPE'd q into q_out [B, Hq, T, D] and
    RoPE'd k / plain v into k_cache / v_cache [B, Hkv, C, D] at slots slot[b] + t, except for
    padding tokens (pos < 0), whose k/v are not written."""
    b, _, t, d = q_out.shape
    if qkv.device.type != "cuda":
        x = qkv.view(b, t, hq + 2 * hkv, d)
        ang = pos.clamp_min(0).float()[..., None] * inv_freq  # [B, T, D/2]
        cos, sin = torch.cat([ang, ang], -1).cos()[:, :, None], torch.cat([ang, ang], -1).sin()[:, :, None]
        qk = x[:, :, : hq + hkv].float()
        x1, x2 = qk.chunk(2, dim=-1)
        qk = (qk * cos + torch.cat([-x2, x1], -1) * sin).to(qkv.dtype)  # [B, T, Hq+Hkv, D]
        q_out.copy_(qk[:, :, :hq].transpose(1, 2))
        idx = (slot.long()[:, None] + torch.arange(t, device=qkv.device)[None])  # [B, T]
        for i in range(b):
            keep = pos[i] >= 0
            k_cache[i, :, idx[i][keep]] = qk[i, keep, hq:].transpose(0, 1)
            v_cache[i, :, idx[i][keep]] = x[i, keep, hq + hkv :].transpose(0, 1)
        return
    from ._triton_fused import _rope_store_kernel

    launch(_rope_store_kernel, (b * t, hq + 2 * hkv),
        qkv, pos, inv_freq, slot, q_out, k_cache, v_cache, qkv.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), T=t, HQ=hq, HKV=hkv, D=d, num_warps=1,
    )


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu: [M, 2I] = [gate | up] -> silu(gate) * up: [M, I]."""
    n = gu.shape[-1] // 2
    if gu.device.type != "cuda":
        g, u = gu.float().split(n, dim=-1)
        return (torch.nn.functional.silu(g) * u).to(gu.dtype)
    from ._triton_fused import _silu_mul_kernel

    y = gu.new_empty(gu.shape[0], n)
    block = 1024
    launch(_silu_mul_kernel, (gu.shape[0], -(-n // block)), gu, y, gu.stride(0), y.stride(0), n, BLOCK=block, num_warps=4)
    return y


# Launch parameters of the fused GEMV (benchmarks/kernel_sweep.py times alternatives).
GEMV_TUNING = {"block_n": 16, "block_k": 256, "num_warps": 2}
# Decode rows (M ≤ 4, K ≤ 4096) take the one-row-per-program kernel: the whole K axis in one
# tile, 8 weight rows a program for 16-bit weights (in-step sweep on the H100 with the deferred
# Nectar merge, benchmarks/step_sweep.py, three interleaved rounds: 8 rows 0.440 / 0.434 / 0.436 ms
# a bf16 SmolLM2 step vs 4 rows 0.465 / 0.471 / 0.467 and 2 rows 0.512 / 0.508 / 0.507; before
# the deferred merge 4 and 8 rows were even, 0.629 vs 0.627). fp32 weights (`nectar fit`'s probe
# generation) keep 4, the setting its GPU fit time was measured with.
ROW_KERNEL_MAX_ROWS, ROW_KERNEL_MAX_K = 4, 4096
# early: load the weight tile into registers before the PDL wait (else: bulk L2 prefetch, then load).
ROW_TUNING = {"block_n": 8, "block_n_fp32": 4, "weights_per_thread": 64, "min_warps": 4, "early": True}


def gemv(x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor | None = None, norm_w: torch.Tensor | None = None,
         eps: float = 1e-6, x_out: torch.Tensor | None = None, glu: bool = False, backend: str = "auto",
         tuning: dict | None = None) -> torch.Tensor:
    """A few-row matmul with its prologue and epilogue fused (one launch; for decode steps of
    small models, where each separate launch costs more than the bytes it moves).

    x: [M, K]; w: [N, K] (or [2N, K] = [gate; up] with glu); delta: [M, K] added to x first (the
    residual), written to x_out [M, K]; norm_w: [K] fp32, RMSNorm after the add; glu: y =
    silu(x Wg^T) * (x Wu^T). Returns y: [M, N] in x's dtype. backend: "auto" (Triton on CUDA,
    torch elsewhere) | "triton" | "torch"."""
    n = w.shape[0] // 2 if glu else w.shape[0]
    use_triton = backend == "triton" or (backend == "auto" and x.device.type == "cuda")
    if not use_triton:
        h = x
        if delta is not None:
            h = x + delta
            x_out.copy_(h)
        if norm_w is not None:
            hf = h.float()
            h = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * norm_w).to(x.dtype)
        y = torch.nn.functional.linear(h, w)
        if glu:
            g, u = y.float().split(n, dim=-1)
            return (torch.nn.functional.silu(g) * u).to(x.dtype)
        return y
    return _launch_gemv(x, w, n, delta, norm_w, eps, x_out, 1 if glu else 0, tuning)


def merge_gemv(shares, w: torch.Tensor, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """The o-projection of a Nectar layer whose merge was deferred (triton_nectar.nectar_layer_shares):
    y = merged(shares) @ W^T with the merged attention output rounded to `dtype` first (as the
    stored output of nectar_layer_attention would be). shares: NectarShares for M = B*T rows,
    K = Hq*D; w: [N, K]. Returns y [M, N] in `dtype`. On CUDA at ≤ ROW_KERNEL_MAX_ROWS rows the
    merge runs in the GEMV's prologue (one launch, no attention output in memory); elsewhere torch."""
    m, k = shares.rows, shares.shares.shape[2]
    use_triton = backend == "triton" or (backend == "auto" and w.device.type == "cuda")
    if not use_triton or m > ROW_KERNEL_MAX_ROWS or k > ROW_KERNEL_MAX_K:
        return torch.nn.functional.linear(shares.merged().to(dtype), w)
    x = torch.empty((), dtype=dtype, device=w.device).expand(m, k)  # never read: x comes from the merge
    return _launch_gemv(x, w, w.shape[0], None, None, 0.0, None, 0, merge=shares)


def _launch_gemv(x, w, n, delta, norm_w, eps, x_out, epi, tuning=None, rope=None, zero=None, merge=None):
    """The Triton GEMV (kernels/_triton_fused.py: _gemv_kernel); rope = (pos, inv_freq, slot, q_out,
    k_cache, v_cache, hq, hkv) for epilogue 2; zero: [M, K] fp32 rows zeroed by the launch (row
    kernel only). Returns y [M, n] (epilogues 0/1) or None."""
    from ._triton_fused import _gemv_kernel
    from .launch import can_prefetch, pdl_enabled, pdl_options

    m, k = x.shape
    tune = {**GEMV_TUNING, **(tuning or {})}
    block_m, block_n = 16, tune["block_n"]
    d = delta if delta is not None else x
    xo = x_out if x_out is not None else x
    pdl = pdl_enabled(x)
    if rope is None:
        y = x.new_empty(m, n)
        pos = inv = slot = qo = kc = vc = y  # unused pointers
        sq = sk = sv = (0, 0, 0)
        t, hq, hkv, hd = 1, 1, 1, 16
        if merge is not None:
            hq, hd = merge.lse.shape[2], k // merge.lse.shape[2]
    else:
        pos, inv, slot, qo, kc, vc, hq, hkv = rope
        y = x  # unused: the epilogue scatters into q_out and the cache
        t, hd = qo.shape[2], qo.shape[3]
        sq, sk, sv = (qo.stride(0), qo.stride(1), qo.stride(2)), kc.stride()[:3], vc.stride()[:3]
    prefetch = pdl and w.stride(1) == 1 and w.stride(0) == k and can_prefetch(w, k)
    if zero is not None and not (m <= ROW_KERNEL_MAX_ROWS and k <= ROW_KERNEL_MAX_K):
        zero.zero_()  # the tile kernel has no zeroing epilogue: one extra launch
        zero = None
    if merge is not None and not (m <= ROW_KERNEL_MAX_ROWS and k <= ROW_KERNEL_MAX_K):
        raise ValueError("merge: only the row GEMV (decode rows) merges in its prologue")
    if m <= ROW_KERNEL_MAX_ROWS and k <= ROW_KERNEL_MAX_K:
        from ._triton_fused import _gemv_row_kernel

        bk, bn = _next_pow2(k), ROW_TUNING["block_n" if w.element_size() <= 2 else "block_n_fp32"]
        per_warp = 32 * ROW_TUNING["weights_per_thread"]  # the tile stays in registers
        warps = min(16, max(ROW_TUNING["min_warps"], _next_pow2(bn * bk * (2 if epi else 1) // per_warp)))
        launch(_gemv_row_kernel, (-(-n // bn), m),
            x, d, norm_w if norm_w is not None else x, xo, w, y, n, k, x.stride(0), d.stride(0), xo.stride(0),
            w.stride(0), y.stride(0), eps, pos, inv, slot, qo, kc, vc, *sq, *sk, *sv,
            ADD=delta is not None, NORM=norm_w is not None, EPI=epi, BLOCK_N=bn, BK=bk, PDL=pdl, PREFETCH=prefetch,
            W_BYTES=w.element_size(), T=t, HQ=hq, HKV=hkv, D=hd, num_warps=warps,
            z_ptr=zero if zero is not None else x, sz=zero.stride(0) if zero is not None else 0, ZERO=zero is not None,
            EARLY=bool(ROW_TUNING.get("early")) and pdl, **pdl_options(pdl),
            **(dict(sh_ptr=merge.shares, lse_ptr=merge.lse, M_ROWS=m, MERGE=True, NS=merge.shares.shape[0] - 1)
               if merge is not None else {}),
        )
        return None if rope is not None else y
    launch(_gemv_kernel, (-(-n // block_n), -(-m // block_m)),
        x, d, norm_w if norm_w is not None else x, xo, w, y, m, n, k, x.stride(0), d.stride(0), xo.stride(0),
        w.stride(0), y.stride(0), eps, pos, inv, slot, qo, kc, vc, *sq, *sk, *sv,
        ADD=delta is not None, NORM=norm_w is not None, EPI=epi, BLOCK_M=block_m, BLOCK_N=block_n,
        BK=min(tune["block_k"], _next_pow2(k)), IEEE=w.dtype == torch.float32, PDL=pdl,
        PREFETCH=prefetch, W_BYTES=w.element_size(),
        T=t, HQ=hq, HKV=hkv, D=hd, num_warps=tune["num_warps"], **pdl_options(pdl),
    )
    return None if rope is not None else y


def qkv_rope(x: torch.Tensor, w: torch.Tensor, delta: torch.Tensor | None, norm_w: torch.Tensor, eps: float,
             x_out: torch.Tensor | None, pos: torch.Tensor, inv_freq: torch.Tensor, slot: torch.Tensor,
             q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, hq: int, hkv: int,
             backend: str = "auto", zero: torch.Tensor | None = None) -> None:
    """[x + delta → RMSNorm → q|k|v projection → RoPE → q_out and KV-cache write] in one launch:
    `gemv(x, w, delta, norm_w, eps, x_out)` followed by `rope_store` (same arguments and shapes),
    without the [M, (Hq + 2 Hkv) * D] intermediate. x: [B*T, K] rows b*T + t; pos: [B, T]
    (contiguous); q_out: [B, Hq, T, D] with D a multiple of 16. zero: optional [B*T, K] fp32
    (contiguous rows) zeroed by the same launch (the accumulator the attention kernel's fused
    o-projection adds into); delta may be fp32 (such an accumulator)."""
    d = q_out.shape[3]
    if backend == "torch" or (backend == "auto" and x.device.type != "cuda") or d % 16:
        qkv = gemv(x, w, delta, norm_w, eps, x_out, backend="torch" if x.device.type != "cuda" else backend)
        rope_store(qkv, pos, inv_freq, slot, q_out, k_cache, v_cache, hq, hkv)
        if zero is not None:
            zero.zero_()
        return
    _launch_gemv(x, w, w.shape[0], delta, norm_w, eps, x_out, 2, tuning={"block_n": 16},
                 rope=(pos.contiguous(), inv_freq, slot, q_out, k_cache, v_cache, hq, hkv), zero=zero)


# The fused MLP (mlp_fused): block_i intermediate columns a program, num_warps, early = weights
# loaded into registers before the PDL wait (else prefetched into L2), split_k = the K axis as two
# power-of-two tiles (576 = 512 + 64: no padded registers, but the compiler then moves whole tiles
# between layouts through shared memory) instead of one padded tile.
# H100, alone (benchmarks/kernel_sweep.py --fused): 16 / 4 warps 3.39 us, 8 / 4 3.89 us, against
# 2.31 + 1.41 us for the gate|up and down GEMVs.
MLP_TUNING = {"block_i": 16, "num_warps": 4, "early": True, "split_k": False}


def mlp_fused(x: torch.Tensor, delta: torch.Tensor, norm_w: torch.Tensor, eps: float, x_out: torch.Tensor,
              wgu: torch.Tensor, wd_t: torch.Tensor, acc: torch.Tensor, backend: str = "auto",
              tuning: dict | None = None) -> None:
    """A decode step's whole MLP sub-block in one launch: h = x + delta (rounded to x's dtype,
    written to x_out: the new residual stream), acc += silu(f(h) Wg^T) * (f(h) Wu^T) @ WdT with
    f = RMSNorm(h) * norm_w. x, x_out: [M, K]; delta: [M, K] (fp32 accumulator or x's dtype);
    norm_w: [K] fp32; wgu: [2I, K] = [gate; up]; wd_t: [I, K] = W_down transposed (contiguous);
    acc: [M, K] fp32, zero on entry (the decode step zeroes it in an earlier launch), gets the
    MLP's output. The Triton kernel (CUDA, M ≤ ROW_KERNEL_MAX_ROWS) splits the intermediate axis
    over programs that add their partial down-projections by fp32 atomics, so the summation order
    (and the last bits of acc) is not deterministic; each program recomputes the add + RMSNorm.
    Elsewhere: the same math in torch (f(h) and the SiLU·up product rounded to W's dtype)."""
    m, k = x.shape
    i_dim = wd_t.shape[0]
    use_triton = backend == "triton" or (backend == "auto" and x.device.type == "cuda")
    if not use_triton or m > ROW_KERNEL_MAX_ROWS or k > ROW_KERNEL_MAX_K:
        h = (x.to(torch.float64 if x.dtype == torch.float64 else torch.float32) + delta).to(x.dtype)
        x_out.copy_(h)
        hf = h.float() if h.dtype != torch.float64 else h
        hn = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * norm_w).to(wgu.dtype)
        g, u = torch.nn.functional.linear(hn, wgu).split(i_dim, dim=-1)
        a = (torch.nn.functional.silu(g.to(hf.dtype)) * u.to(hf.dtype)).to(wgu.dtype)
        acc += a.to(acc.dtype) @ wd_t.to(acc.dtype)
        return
    from ._triton_fused import _mlp_row_kernel
    from .launch import can_prefetch, pdl_enabled, pdl_options

    tune = {**MLP_TUNING, **(tuning or {})}
    if tune["split_k"]:
        bi, bk = tune["block_i"], 1 << (k.bit_length() - 1)  # K = bk + the rest (a second tile, bk2)
        bk2 = _next_pow2(k - bk) if k > bk else 0
    else:
        bi, bk, bk2 = tune["block_i"], _next_pow2(k), 0
    pdl = pdl_enabled(x)
    early = bool(tune["early"]) and pdl
    prefetch = (not early) and pdl and wgu.is_contiguous() and wd_t.is_contiguous() and can_prefetch(wgu, k) \
        and can_prefetch(wd_t, k)
    warps = tune["num_warps"]
    launch(_mlp_row_kernel, (-(-i_dim // bi),),
        x, delta, norm_w, x_out, wgu, wd_t, acc, m, i_dim, k, x.stride(0), delta.stride(0), x_out.stride(0),
        wgu.stride(0), wd_t.stride(0), acc.stride(0), eps, BI=bi, BK=bk, BK2=bk2, PDL=pdl, PREFETCH=prefetch,
        W_BYTES=wgu.element_size(), EARLY=early, ATOMIC=tune.get("atomic", True), num_warps=warps, **pdl_options(pdl),
    )
