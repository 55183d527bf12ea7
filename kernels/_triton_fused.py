"""Triton source of the small fused kernels of a decode step (imported lazily by fused.py)."""

import triton
import triton.language as tl

from ._triton_pdl import pdl_enter, prefetch_rows


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
                 pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                 ADD: tl.constexpr, NORM: tl.constexpr, EPI: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                 PDL: tl.constexpr, PREFETCH: tl.constexpr, W_BYTES: tl.constexpr,
                 T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """y = f(x) @ W[cols]^T for a few rows (decode): f = [x + delta] -> [RMSNorm * nw]. Epilogues:
    EPI 0: store y. EPI 1 (GLU): W = [gate; up] (2N rows), y = silu(f(x) Wg^T) * (f(x) Wu^T).
    EPI 2 (RoPE): W = the fused q|k|v projection, rows r = b*T + t; RoPE (rotate-half, fp32) on q
    and k heads, q stored to q_out[b, h, t], k/v to the cache at slot[b] + t unless pos < 0; the
    rotate-half partner of column c comes from a second dot with W's row c ± D/2 (each program
    owns BLOCK_N columns of one head, so any D ≥ 16 works). Program 0 of each row block writes
    x + delta to xo (the new residual stream). fp32 accumulation."""
    pn = tl.program_id(0)
    pm = tl.program_id(1)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rm = rows < M
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    if EPI == 1:
        cols2 = N + cols  # the up rows
    elif EPI == 2:
        head = (pn * BLOCK_N) // D
        rot = head < HQ + HKV  # q and k heads are rotated, v heads are not
        i = cols % D
        cols2 = head * D + (i + D // 2) % D  # rotate-half partner rows
    else:
        cols2 = cols
    if PREFETCH:  # weights do not depend on the previous kernel: stream them into L2 meanwhile
        prefetch_rows(w_ptr, pn * BLOCK_N, tl.minimum(BLOCK_N, N - pn * BLOCK_N), sw, W_BYTES)
        if EPI == 1:
            prefetch_rows(w_ptr, N + pn * BLOCK_N, tl.minimum(BLOCK_N, N - pn * BLOCK_N), sw, W_BYTES)
    pdl_enter(PDL)
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
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
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
        if EPI != 0:
            m_2 = cm[:, None] & km[None, :]
            if EPI == 2:
                m_2 = m_2 & rot
            w2 = tl.load(w_ptr + cols2[:, None] * sw + kk[None, :], mask=m_2, other=0.0)
            if IEEE:
                acc2 += tl.dot(xk, tl.trans(w2), input_precision="ieee")
            else:
                acc2 += tl.dot(xk, tl.trans(w2))
    if EPI == 2:
        _rope_epilogue(acc, acc2, rows, rm, i, head, pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                       sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, T, HQ, HKV, D)
    else:
        if EPI == 1:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        tl.store(y_ptr + rows[:, None] * sy + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])


@triton.jit
def _rope_epilogue(acc, acc2, rows, rm, i, head, pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                   sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                   T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
    """acc [M, BN]: columns i of head `head` of the q|k|v projection; acc2: their rotate-half
    partners. Rotates q/k (fp32, positions clamped at 0) and scatters to q_out / the KV cache."""
    b = rows // T
    t = rows % T
    p = tl.load(pos_ptr + rows, mask=rm, other=-1)
    ang = tl.maximum(p, 0).to(tl.float32)[:, None] * tl.load(inv_ptr + i % (D // 2))[None, :]
    sign = tl.where(i < D // 2, -1.0, 1.0)[None, :]
    y = acc * tl.cos(ang) + sign * acc2 * tl.sin(ang)
    if head < HQ:
        dst = q_ptr + b[:, None] * sqb + head * sqh + t[:, None] * sqt + i[None, :]
        tl.store(dst, y.to(q_ptr.dtype.element_ty), mask=rm[:, None])
    else:
        keep = (rm & (p >= 0))[:, None]
        slot = tl.load(slot_ptr + b, mask=rm, other=0) + t
        if head < HQ + HKV:
            dst = k_ptr + b[:, None] * skb + (head - HQ) * skh + slot[:, None] * sks + i[None, :]
            tl.store(dst, y.to(k_ptr.dtype.element_ty), mask=keep)
        else:
            dst = v_ptr + b[:, None] * svb + (head - HQ - HKV) * svh + slot[:, None] * svs + i[None, :]
            tl.store(dst, acc.to(v_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _row_tiles(w_ptr, cols, cols2, kk, sw, wm, wm2, EPI: tl.constexpr):
    """The row GEMV's weight tile and, for epilogues 1/2, its partner tile (else the same tile)."""
    w = tl.load(w_ptr + cols[:, None] * sw + kk[None, :], mask=wm, other=0.0)
    if EPI != 0:
        w2 = tl.load(w_ptr + cols2[:, None] * sw + kk[None, :], mask=wm2, other=0.0)
    else:
        w2 = w
    return w, w2


@triton.jit
def _merged_row(sh_ptr, lse_ptr, row, M_ROWS, kk, km, K, NS: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr):
    """Row `row` of the Nectar attention output, merged from kernels/_triton_src.py:
    _mlp_parts_kernel's shares [NS + 1, M_ROWS, K] (f = the sum of the first NS, then o_loc) and
    lse [2, M_ROWS, HQ] (lse_loc, lse_ctx): o = w·f + (1 − w)·o_loc, w = σ(lse_ctx − lse_loc).
    kk: [BK] element indices h * D + d (km: kk < K). Returns fp32 [BK]; every load is independent,
    so they are all in flight at once."""
    base = sh_ptr + row * K + kk
    f = tl.load(base, mask=km, other=0.0)
    for s in tl.static_range(1, NS):
        f += tl.load(base + s * M_ROWS * K, mask=km, other=0.0)
    o_loc = tl.load(base + NS * M_ROWS * K, mask=km, other=0.0)
    hh = kk // D
    lse_loc = tl.load(lse_ptr + row * HQ + hh, mask=km, other=0.0)
    lse_ctx = tl.load(lse_ptr + (M_ROWS + row) * HQ + hh, mask=km, other=0.0)
    w = 1.0 / (1.0 + tl.exp(lse_loc - lse_ctx))
    return w * f + (1.0 - w) * o_loc


@triton.jit
def _gemv_row_kernel(x_ptr, d_ptr, nw_ptr, xo_ptr, w_ptr, y_ptr, N, K, sx, sd, sxo, sw, sy, eps,
                     pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, sqb, sqh, sqt, skb, skh, sks, svb, svh, svs,
                     ADD: tl.constexpr, NORM: tl.constexpr, EPI: tl.constexpr, BLOCK_N: tl.constexpr,
                     BK: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, W_BYTES: tl.constexpr,
                     T: tl.constexpr, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                     z_ptr=None, sz=0, ZERO: tl.constexpr = False, EARLY: tl.constexpr = False,
                     sh_ptr=None, lse_ptr=None, M_ROWS=1, MERGE: tl.constexpr = False, NS: tl.constexpr = 1):
    """_gemv_kernel for one row per program (decode at batch ≤ 4): the whole K axis is one tile
    (BK ≥ K), so every weight and x load is in flight at once, and the product is a plain fp32
    multiply + sum (no tensor-core layout shuffles through shared memory). Same prologue,
    epilogues and rounding as _gemv_kernel (f(x) rounded to W's dtype before the product).
    ZERO: program 0 of each row also zeroes z[row, :K] (fp32; an accumulator a later kernel of the
    step adds into). EARLY: the weight tile is loaded into registers before the PDL wait (it never
    depends on the previous kernel) instead of only prefetched into L2. MERGE: x is not loaded
    but merged from the Nectar kernel's shares (_merged_row; NS of them, HQ heads of D, K = HQ*D),
    rounded to x's dtype as the stored attention output would be."""
    pn = tl.program_id(0)
    row = tl.program_id(1)
    rows = row + tl.arange(0, 1)
    rm = rows >= 0
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    if EPI == 1:
        cols2 = N + cols
    elif EPI == 2:
        head = (pn * BLOCK_N) // D
        rot = head < HQ + HKV
        i = cols % D
        cols2 = head * D + (i + D // 2) % D
    else:
        cols2 = cols
    kk = tl.arange(0, BK)
    km = kk < K
    wm = cm[:, None] & km[None, :]
    if EPI == 2:
        wm2 = wm & rot
    else:
        wm2 = wm
    if EARLY:
        w, w2 = _row_tiles(w_ptr, cols, cols2, kk, sw, wm, wm2, EPI)
        pdl_enter(PDL)
    else:
        if PREFETCH:
            prefetch_rows(w_ptr, pn * BLOCK_N, tl.minimum(BLOCK_N, N - pn * BLOCK_N), sw, W_BYTES)
            if EPI == 1:
                prefetch_rows(w_ptr, N + pn * BLOCK_N, tl.minimum(BLOCK_N, N - pn * BLOCK_N), sw, W_BYTES)
        pdl_enter(PDL)
        w, w2 = _row_tiles(w_ptr, cols, cols2, kk, sw, wm, wm2, EPI)
    if ZERO:
        if pn == 0:
            tl.store(z_ptr + row * sz + kk, tl.zeros([BK], tl.float32), mask=km)
    if MERGE:
        x = _merged_row(sh_ptr, lse_ptr, row, M_ROWS, kk, km, K, NS, HQ, D).to(x_ptr.dtype.element_ty)
    else:
        x = tl.load(x_ptr + row * sx + kk, mask=km, other=0.0)
    if ADD:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * sd + kk, mask=km, other=0.0).to(tl.float32)).to(x.dtype)
        if pn == 0:
            tl.store(xo_ptr + row * sxo + kk, x, mask=km)
    xf = x.to(tl.float32)
    if NORM:
        xf = xf * tl.rsqrt(tl.sum(xf * xf, 0) / K + eps) * tl.load(nw_ptr + kk, mask=km, other=0.0)
    xf = xf.to(w_ptr.dtype.element_ty).to(tl.float32)[None, :]
    acc = tl.sum(w.to(tl.float32) * xf, 1)[None, :]  # [1, BLOCK_N]
    if EPI == 2:
        acc2 = tl.sum(w2.to(tl.float32) * xf, 1)[None, :]
        _rope_epilogue(acc, acc2, rows, rm, i, head, pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                       sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, T, HQ, HKV, D)
    else:
        if EPI == 1:
            acc = acc / (1.0 + tl.exp(-acc)) * tl.sum(w2.to(tl.float32) * xf, 1)[None, :]
        tl.store(y_ptr + rows[:, None] * sy + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=cm[None, :])


@triton.jit
def _mlp_tiles(wgu_ptr, wdt_ptr, ci, cim, k0, N_I, K, sw, swd, BK: tl.constexpr):
    """Rows k0 … k0 + BK − 1 of this program's gate, up and down weights as [BK, BI] tiles (K
    along axis 0, contiguous in memory: each thread holds all BI columns of its K elements, so the
    down-projection's sum over BI stays in registers and `a` needs no layout change)."""
    kk = k0 + tl.arange(0, BK)
    wm = (kk < K)[:, None] & cim[None, :]
    wg = tl.load(wgu_ptr + kk[:, None] + ci[None, :] * sw, mask=wm, other=0.0)
    wu = tl.load(wgu_ptr + kk[:, None] + (N_I + ci)[None, :] * sw, mask=wm, other=0.0)
    wd = tl.load(wdt_ptr + kk[:, None] + ci[None, :] * swd, mask=wm, other=0.0)
    return wg, wu, wd


@triton.jit
def _mlp_row_kernel(x_ptr, d_ptr, nw_ptr, xo_ptr, wgu_ptr, wdt_ptr, acc_ptr, M, N_I, K, sx, sd, sxo, sw, swd, sacc,
                    eps, BI: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, PDL: tl.constexpr,
                    PREFETCH: tl.constexpr, W_BYTES: tl.constexpr, EARLY: tl.constexpr, ATOMIC: tl.constexpr = True):
    """A whole gated MLP for a few rows, split over its intermediate axis: program p owns the
    intermediate columns i = p*BI … p*BI + BI − 1 and, for every row m < M,
      h = x + delta (rounded to x's dtype; program 0 writes it to xo, the new residual stream),
      a_i = silu(f(h)·Wg_i) · (f(h)·Wu_i), f = RMSNorm * nw rounded to W's dtype, a rounded to W's
            dtype (as the unfused GEMV's output was),
      acc[m, :] += Σ_i a_i · WdT[i, :]   (fp32 atomics; WdT = W_down transposed, [I, K]).
    acc must be zero on entry (an earlier kernel of the step zeroes it). Every program recomputes
    the residual add and the RMSNorm of its rows (K values); the weights are held in registers
    across rows. The K axis is two tiles, BK = the largest power of two ≤ K and BK2 (0: none) for
    the rest, so registers hold no padding up to the next power of two (576 = 512 + 64). The
    atomics make the summation order over programs nondeterministic."""
    p = tl.program_id(0)
    ci = p * BI + tl.arange(0, BI)
    cim = ci < N_I
    if EARLY:  # the weights never depend on the previous kernel
        wg, wu, wd = _mlp_tiles(wgu_ptr, wdt_ptr, ci, cim, 0, N_I, K, sw, swd, BK)
        if BK2 > 0:
            wg2, wu2, wd2 = _mlp_tiles(wgu_ptr, wdt_ptr, ci, cim, BK, N_I, K, sw, swd, BK2)
        pdl_enter(PDL)
    else:
        if PREFETCH:
            nrows = tl.minimum(BI, N_I - p * BI)
            prefetch_rows(wgu_ptr, p * BI, nrows, sw, W_BYTES)
            prefetch_rows(wgu_ptr, N_I + p * BI, nrows, sw, W_BYTES)
            prefetch_rows(wdt_ptr, p * BI, nrows, swd, W_BYTES)
        pdl_enter(PDL)
        wg, wu, wd = _mlp_tiles(wgu_ptr, wdt_ptr, ci, cim, 0, N_I, K, sw, swd, BK)
        if BK2 > 0:
            wg2, wu2, wd2 = _mlp_tiles(wgu_ptr, wdt_ptr, ci, cim, BK, N_I, K, sw, swd, BK2)
    wdt = wgu_ptr.dtype.element_ty
    k1 = tl.arange(0, BK)
    m1 = k1 < K
    nw = tl.load(nw_ptr + k1, mask=m1, other=0.0)
    if BK2 > 0:
        k2 = BK + tl.arange(0, BK2)
        m2 = k2 < K
        nw2 = tl.load(nw_ptr + k2, mask=m2, other=0.0)
    for m in range(M):
        x = tl.load(x_ptr + m * sx + k1, mask=m1, other=0.0)
        h = (x.to(tl.float32) + tl.load(d_ptr + m * sd + k1, mask=m1, other=0.0).to(tl.float32)).to(x.dtype)
        if p == 0:
            tl.store(xo_ptr + m * sxo + k1, h, mask=m1)
        hf = h.to(tl.float32)
        ss = tl.sum(hf * hf, 0)
        if BK2 > 0:
            x2 = tl.load(x_ptr + m * sx + k2, mask=m2, other=0.0)
            h2 = (x2.to(tl.float32) + tl.load(d_ptr + m * sd + k2, mask=m2, other=0.0).to(tl.float32)).to(x2.dtype)
            if p == 0:
                tl.store(xo_ptr + m * sxo + k2, h2, mask=m2)
            hf2 = h2.to(tl.float32)
            ss += tl.sum(hf2 * hf2, 0)
        r = tl.rsqrt(ss / K + eps)
        xn = (hf * r * nw).to(wdt).to(tl.float32)[:, None]
        g = tl.sum(wg.to(tl.float32) * xn, 0)
        u = tl.sum(wu.to(tl.float32) * xn, 0)
        if BK2 > 0:
            xn2 = (hf2 * r * nw2).to(wdt).to(tl.float32)[:, None]
            g += tl.sum(wg2.to(tl.float32) * xn2, 0)
            u += tl.sum(wu2.to(tl.float32) * xn2, 0)
        a = (g / (1.0 + tl.exp(-g)) * u).to(wdt).to(tl.float32)[None, :]
        if ATOMIC:
            tl.atomic_add(acc_ptr + m * sacc + k1, tl.sum(wd.to(tl.float32) * a, 1), mask=m1, sem="relaxed")
            if BK2 > 0:
                tl.atomic_add(acc_ptr + m * sacc + k2, tl.sum(wd2.to(tl.float32) * a, 1), mask=m2, sem="relaxed")
        else:  # timing diagnostics only (benchmarks/kernel_sweep.py): plain stores, a wrong sum
            tl.store(acc_ptr + m * sacc + k1, tl.sum(wd.to(tl.float32) * a, 1), mask=m1)
            if BK2 > 0:
                tl.store(acc_ptr + m * sacc + k2, tl.sum(wd2.to(tl.float32) * a, 1), mask=m2)
