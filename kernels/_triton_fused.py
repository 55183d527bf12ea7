"""Triton source of the small fused kernels of a decode step (imported lazily by fused.py)."""

import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, sx, sy, N, eps, BLOCK: tl.constexpr):
    """y = x / rms(x) * w per row, in fp32 (w already holds offset + weight, fp32)."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(y_ptr + row * sy + c, (x * r * w).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                       s_row, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                       T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """Program (row = b*T + t, head hh of the fused qkv projection): RoPE on q and k heads (NeoX
    rotate-half, fp32), q to q_out[b, hh, t], k/v to the cache at slot[b] + t unless pos < 0."""
    row = tl.program_id(0)
    hh = tl.program_id(1)
    b = row // T
    t = row % T
    half = tl.arange(0, D // 2)
    src = qkv_ptr + row * s_row + hh * D
    p = tl.load(pos_ptr + row)
    if hh < HQ + HKV:
        x1 = tl.load(src + half).to(tl.float32)
        x2 = tl.load(src + D // 2 + half).to(tl.float32)
        ang = tl.maximum(p, 0).to(tl.float32) * tl.load(inv_ptr + half)
        c = tl.cos(ang)
        s = tl.sin(ang)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        if hh < HQ:
            dst = q_ptr + b * sqb + hh * sqh + t * sqt
            tl.store(dst + half, y1.to(q_ptr.dtype.element_ty))
            tl.store(dst + D // 2 + half, y2.to(q_ptr.dtype.element_ty))
        elif p >= 0:
            dst = k_ptr + b * skb + (hh - HQ) * skh + (tl.load(slot_ptr + b) + t) * sks
            tl.store(dst + half, y1.to(q_ptr.dtype.element_ty))
            tl.store(dst + D // 2 + half, y2.to(q_ptr.dtype.element_ty))
    elif p >= 0:
        d = tl.arange(0, D)
        dst = v_ptr + b * svb + (hh - HQ - HKV) * svh + (tl.load(slot_ptr + b) + t) * svs
        tl.store(dst + d, tl.load(src + d))


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, s_row, sy, N, BLOCK: tl.constexpr):
    """y = silu(gate) * up for gu = [gate | up] per row (fp32 math)."""
    row = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    g = tl.load(gu_ptr + row * s_row + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * s_row + N + c, mask=m, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(y_ptr + row * sy + c, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, d_ptr, w_ptr, y_ptr, sx, sd, sy, N, eps, BLOCK: tl.constexpr):
    """x += delta (in place, the residual stream), then y = rmsnorm(x) * w; fp32 math."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < N
    x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0)
    x = (x.to(tl.float32) + tl.load(d_ptr + row * sd + c, mask=m, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row * sx + c, x, mask=m)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + c, mask=m, other=0.0)
    tl.store(y_ptr + row * sy + c, (xf * r * w).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gemv_kernel(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, y_ptr, M, N, K, sx, sd, sxo, sw, sy, eps,
                 ADD: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    """y = f(x) @ W[cols]^T for a few rows (decode): f = [x + delta] -> [RMSNorm * nw]; with GLU,
    W = [gate; up] (2N rows) and y = silu(f(x) Wg^T) * (f(x) Wu^T). Program 0 of each row block
    writes x + delta to xo (the new residual stream). fp32 accumulation."""
    pn = tl.program_id(0)
    pm = tl.program_id(1)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    kc = tl.arange(0, BK)
    wdt = w_ptr.dtype.element_ty
    r = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM:
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + kc
            m2 = rm[:, None] & (kk < K)[None, :]
            xk = tl.load(x_ptr + rows[:, None] * sx + kk[None, :], mask=m2, other=0.0)
            if ADD:
                xk = (xk.to(tl.float32) + tl.load(d_ptr + rows[:, None] * sd + kk[None, :], mask=m2, other=0.0).to(tl.float32)).to(xk.dtype)
            xf = xk.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
        r = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + kc
        km = kk < K
        m2 = rm[:, None] & km[None, :]
        xk = tl.load(x_ptr + rows[:, None] * sx + kk[None, :], mask=m2, other=0.0)
        if ADD:
            xk = (xk.to(tl.float32) + tl.load(d_ptr + rows[:, None] * sd + kk[None, :], mask=m2, other=0.0).to(tl.float32)).to(xk.dtype)
            if pn == 0:
                tl.store(xo_ptr + rows[:, None] * sxo + kk[None, :], xk, mask=m2)
        if NORM:
            xk = xk.to(tl.float32) * r[:, None] * tl.load(nw_ptr + kk, mask=km, other=0.0)[None, :]
        xk = xk.to(wdt)
        wk = tl.load(w_ptr + cols[:, None] * sw + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(xk, tl.trans(wk), input_precision="ieee")
        else:
            acc += tl.dot(xk, tl.trans(wk))
        if GLU:
            wu = tl.load(w_ptr + (N + cols)[:, None] * sw + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
            if IEEE:
                acc_u += tl.dot(xk, tl.trans(wu), input_precision="ieee")
            else:
                acc_u += tl.dot(xk, tl.trans(wu))
    if GLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    tl.store(y_ptr + rows[:, None] * sy + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])
