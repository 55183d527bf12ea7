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
