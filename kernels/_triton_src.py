"""Triton source of the Nectar kernels (imported only by triton_nectar's launchers: it imports
triton at module level). Semantics: kernels/reference.py; launchers and shapes: triton_nectar.py."""

import triton
import triton.language as tl

from ._triton_pdl import pdl_enter, prefetch_l2


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_block(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One block of an online softmax: s [R, S] fp32 scores (-inf = masked), v [S, D]."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _local_attention(q, k_ptr, v_ptr, len_ptr, start_ptr, b, j, t, skb, skh, sks, svb, svh, svs, scale,
                     T: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                     IEEE: tl.constexpr):
    """Exact attention of rows q [R, D] (batch b, KV head j, tokens t) over the local keys
    kv_start <= s <= kv_len - T + t -> (o_loc [R, D] fp32, lse_loc [R] fp32; -inf = no key)."""
    d = tl.arange(0, D)
    kv_len = tl.load(len_ptr + b)
    kv_start = tl.load(start_ptr + b)
    last = kv_len - T + t
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    s_idx = tl.arange(0, BLOCK_S)
    lo = (kv_start // BLOCK_S) * BLOCK_S
    for s0 in range(lo, kv_len, BLOCK_S):
        ks = s0 + s_idx
        kin = (ks < kv_len) & (ks >= kv_start)
        k = tl.load(k_ptr + b * skb + j * skh + ks[:, None] * sks + d[None, :], mask=kin[:, None], other=0.0)
        v = tl.load(v_ptr + b * svb + j * svh + ks[:, None] * svs + d[None, :], mask=kin[:, None], other=0.0)
        s = _dot(q.to(k.dtype), tl.trans(k), IEEE) * scale
        vis = kin[None, :] & (ks[None, :] <= last[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_i, l_i, acc = _online_block(s, v, m_i, l_i, acc, IEEE)
    o_loc = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    lse_loc = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    return o_loc, lse_loc


@triton.jit
def _skip_and_score(xw, wrow, brow, D: tl.constexpr, H: tl.constexpr, HS: tl.constexpr, HS_PAD: tl.constexpr,
                    W_IEEE: tl.constexpr):
    """The mlp heads' skip path and score net (kernels/weights.py: layout) for standardized rows
    xw [R, D] (weight dtype) of the KV head whose packed rows start at wrow / brow -> (xw @ skip +
    b3 [R, D] fp32, still standardized; lse_ctx [R] fp32, destandardized). Shared by the merging
    and the deferred-merge kernels."""
    d = tl.arange(0, D)
    off_skip = D * H + H * H + H * D
    off_s1 = off_skip + D * D
    off_s2 = off_s1 + D * HS
    off_s3 = off_s2 + HS * HS
    off_sb1 = 2 * H + D
    off_sb2 = off_sb1 + HS
    off_sb3 = off_sb2 + HS
    off_lm = off_sb3 + 1 + D + 1 + D + 1  # after q_mean [D], q_std, o_mean [D], o_std
    wdt = wrow.dtype.element_ty
    skip = tl.load(wrow + off_skip + d[:, None] * D + d[None, :])
    hc = tl.arange(0, HS_PAD)
    hm = hc < HS
    s1 = tl.load(wrow + off_s1 + d[:, None] * HS + hc[None, :], mask=hm[None, :], other=0.0)
    s2 = tl.load(wrow + off_s2 + hc[:, None] * HS + hc[None, :], mask=hm[:, None] & hm[None, :], other=0.0)
    part = _dot(xw, skip, W_IEEE) + tl.load(brow + 2 * H + d)[None, :]
    # score net: D -> HS -> HS -> 1
    sa = _gelu(_dot(xw, s1, W_IEEE) + tl.load(brow + off_sb1 + hc, mask=hm, other=0.0)[None, :])
    sb_ = _gelu(_dot(sa.to(wdt), s2, W_IEEE) + tl.load(brow + off_sb2 + hc, mask=hm, other=0.0)[None, :])
    s3 = tl.load(wrow + off_s3 + hc, mask=hm, other=0.0).to(tl.float32)
    gs = tl.sum(sb_ * s3[None, :], 1) + tl.load(brow + off_sb3)
    return part, gs * tl.load(brow + off_lm + 1) + tl.load(brow + off_lm)


@triton.jit
def _layer_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, start_ptr, w_ptr, b_ptr, o_ptr, ws_ptr, po_ptr, pl_ptr,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sob, soh, sot, sw, sb, R_TOTAL, NSPLIT, N_TILES, scale,
    HKV: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, MODE: tl.constexpr,
    H: tl.constexpr, HS: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr, HS_PAD: tl.constexpr,
    IEEE: tl.constexpr, W_IEEE: tl.constexpr, PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    W_BYTES: tl.constexpr = 2, SB: tl.constexpr = 8,
    wo_ptr=None, acc_ptr=None, zero_ptr=None, s_wo=0, s_acc=0, HID=0, ZN=0,
    RPB: tl.constexpr = 16, PROJ: tl.constexpr = False, ZERO: tl.constexpr = False, HB: tl.constexpr = 128,
    HB2: tl.constexpr = 0,
    PREFETCH_O: tl.constexpr = False, WO_BYTES: tl.constexpr = 2,
):
    """Program (b * Hkv + j, row block, part z). Rows are (g, t) of batch b, KV head j.

    mlp (MODE 0): the target net's hidden layer is split over NC = ceil(H / BH) programs; part
    z < NC computes h2[:, z*BH:(z+1)*BH] (recomputing h1 block by block) and its share of the
    output layer, part z = NC the skip path and the score net, part z = NC + 1 the local
    attention. Shares are summed into a zeroed fp32 workspace by atomics; the last part to finish
    (a counter) merges, writes o, and zeroes its workspace tile again for the next launch.
    quadrature / partials (MODES 1, 2): one part does everything.

    A row block holds RPB ≤ BLOCK_R rows (RPB < BLOCK_R spreads a KV head's rows over more
    programs; the tensor-core tiles keep BLOCK_R rows, the extra ones masked).
    PROJ: the o-projection in the epilogue: whoever writes o (the merging part) also adds
    o[row (g, t)] @ WoT[(j*G + g)*D : +D, :] to acc[b*T + t, :] (fp32 atomics into the residual
    delta, zeroed by an earlier kernel of the step). ZERO: program (0, 0, 0) zeroes ZN fp32 at
    zero_ptr after its PDL wait (the accumulator the next kernel adds into)."""
    pid = tl.program_id(0)
    rb = tl.program_id(1)
    z = tl.program_id(2)
    b = pid // HKV
    j = pid % HKV
    if PREFETCH:  # the heads never depend on the previous kernel: part z warms its share of row j
        _prefetch_share(w_ptr, j, z, tl.num_programs(2), sw * W_BYTES, HKV)
    if PREFETCH_O:  # nor does WoT: this block's rows of it, split over the parts
        g_lo = ((rb * RPB) // T).to(tl.int64)
        g_hi = tl.minimum((rb * RPB + RPB - 1) // T, G - 1)
        _prefetch_span(wo_ptr, (j * G + g_lo) * D * s_wo * WO_BYTES, (g_hi - g_lo + 1) * D * s_wo * WO_BYTES,
                       z, tl.num_programs(2))
    pdl_enter(PDL)
    if ZERO:
        if (pid == 0) & (rb == 0) & (z == 0):
            zc = tl.arange(0, 1024)
            for z0 in range(0, ZN, 1024):
                tl.store(zero_ptr + z0 + zc, tl.zeros([1024], tl.float32), mask=z0 + zc < ZN)
    rl = tl.arange(0, BLOCK_R)
    r = rb * RPB + rl  # row = g * T + t
    rmask = (rl < RPB) & (r < G * T)
    g = r // T
    t = r % T
    d = tl.arange(0, D)
    q_offs = b * sqb + (j * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=rmask[:, None], other=0.0)  # [R, D] input dtype
    qf = q.to(tl.float32)
    o_offs = b * sob + (j * G + g)[:, None] * soh + t[:, None] * sot + d[None, :]
    wrow = w_ptr + j * sw
    brow = b_ptr + j * sb
    if MODE == 0:  # mlp, nectar_export.heads.MLPGroup
        OFF_W2 = D * H  # kernels/weights.py: layout; skip path and score net: _skip_and_score
        OFF_W3 = OFF_W2 + H * H
        OFF_B2 = H
        OFF_QM = 2 * H + D + 2 * HS + 1  # after b1, b2, b3, sb1, sb2, sb3
        OFF_QS = OFF_QM + D
        OFF_OM = OFF_QS + 1
        OFF_OS = OFF_OM + D
        wdt = w_ptr.dtype.element_ty
        x = (qf - tl.load(brow + OFF_QM + d)[None, :]) / tl.load(brow + OFF_QS)
        xw = x.to(wdt)
        tile = pid * tl.num_programs(1) + rb
        acc_offs = tile * BLOCK_R * D + rl[:, None] * D + d[None, :]
        aux = ws_ptr + N_TILES * (BLOCK_R * D + 1) + tile * BLOCK_R * (D + 2)
        if z < NC:
            c = tl.arange(0, BH)
            ck0 = tl.arange(0, BK)
            cj = z * BH + c
            cjm = cj < H
            acc2 = tl.zeros([BLOCK_R, BH], tl.float32)
            for k0 in range(0, H, BK):  # h1 block by block, straight into layer 2
                ck = k0 + ck0
                ckm = ck < H
                w1 = tl.load(wrow + d[:, None] * H + ck[None, :], mask=ckm[None, :], other=0.0)
                w2 = tl.load(wrow + OFF_W2 + ck[:, None] * H + cj[None, :], mask=ckm[:, None] & cjm[None, :], other=0.0)
                h1 = _gelu(_dot(xw, w1, W_IEEE) + tl.load(brow + ck, mask=ckm, other=0.0)[None, :])
                acc2 += _dot(h1.to(wdt), w2, W_IEEE)
            w3 = tl.load(wrow + OFF_W3 + cj[:, None] * D + d[None, :], mask=cjm[:, None], other=0.0)
            h2 = _gelu(acc2 + tl.load(brow + OFF_B2 + cj, mask=cjm, other=0.0)[None, :])
            part = _dot(h2.to(wdt), w3, W_IEEE)
        elif z == NC:
            part, lse_ctx = _skip_and_score(xw, wrow, brow, D, H, HS, HS_PAD, W_IEEE)
            tl.store(aux + BLOCK_R * (D + 1) + rl, lse_ctx)
        else:  # z == NC + 1: the local attention, in parallel with the heads
            o_loc, lse_loc = _local_attention(q, k_ptr, v_ptr, len_ptr, start_ptr, b, j, t, skb, skh, sks,
                                              svb, svh, svs, scale, T, D, BLOCK_R, BLOCK_S, IEEE)
            tl.store(aux + rl[:, None] * D + d[None, :], o_loc)
            tl.store(aux + BLOCK_R * D + rl, lse_loc)
            part = tl.zeros([BLOCK_R, D], tl.float32)
        if z <= NC:
            tl.atomic_add(ws_ptr + acc_offs, part, sem="relaxed")
        tl.debug_barrier()
        cnt_ptr = ws_ptr + N_TILES * BLOCK_R * D + tile
        done = tl.atomic_add(cnt_ptr, 1.0, sem="acq_rel")
        if done == NC + 1:  # the last part of this tile: every share is in
            f = tl.load(ws_ptr + acc_offs, cache_modifier=".cg")
            o_loc = tl.load(aux + rl[:, None] * D + d[None, :], cache_modifier=".cg")
            lse_loc = tl.load(aux + BLOCK_R * D + rl, cache_modifier=".cg")
            lse_ctx = tl.load(aux + BLOCK_R * (D + 1) + rl, cache_modifier=".cg")
            f = f * tl.load(brow + OFF_OS) + tl.load(brow + OFF_OM + d)[None, :]
            w = 1.0 / (1.0 + tl.exp(lse_loc - lse_ctx))  # σ(lse_ctx − lse_loc)
            o = w[:, None] * f + (1.0 - w)[:, None] * o_loc
            tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
            tl.store(ws_ptr + acc_offs, tl.zeros([BLOCK_R, D], tl.float32))
            tl.store(cnt_ptr, 0.0)
            if PROJ:
                _oproj_rows(o.to(o_ptr.dtype.element_ty).to(tl.float32), rl, rb * RPB, b, j, wo_ptr, acc_ptr, s_wo,
                            s_acc, HID, G, T, D, RPB, HB, HB2)
    else:
        o_loc, lse_loc = _local_attention(q, k_ptr, v_ptr, len_ptr, start_ptr, b, j, t, skb, skh, sks,
                                          svb, svh, svs, scale, T, D, BLOCK_R, BLOCK_S, IEEE)
        s_idx = tl.arange(0, BLOCK_S)
        if MODE == 1:  # quadrature: softmax attention over H learned nodes with a bias
            wdt = w_ptr.dtype.element_ty
            qw = q.to(wdt)
            mq = tl.full([BLOCK_R], float("-inf"), tl.float32)
            lq = tl.zeros([BLOCK_R], tl.float32)
            aq = tl.zeros([BLOCK_R, D], tl.float32)
            for n0 in range(0, H, BLOCK_S):
                nodes = n0 + s_idx
                nm = nodes < H
                kn = tl.load(wrow + nodes[:, None] * D + d[None, :], mask=nm[:, None], other=0.0)
                vn = tl.load(wrow + H * D + nodes[:, None] * D + d[None, :], mask=nm[:, None], other=0.0)
                bias = tl.load(brow + nodes, mask=nm, other=float("-inf"))
                s = _dot(qw, tl.trans(kn), W_IEEE) * scale + bias[None, :]
                mq, lq, aq = _online_block(s, vn, mq, lq, aq, W_IEEE)
            f = aq / lq[:, None]
            lse_ctx = mq + tl.log(lq)
        else:  # partials of split-KV attention over the document (full-attention baseline)
            f, lse_ctx = _merge_partials(po_ptr, pl_ptr, j, b * G * T + r, rmask, R_TOTAL, NSPLIT, D, BLOCK_R, SB)
        # merge: w = σ(lse_ctx − lse_loc)
        w = 1.0 / (1.0 + tl.exp(lse_loc - lse_ctx))
        o = w[:, None] * f + (1.0 - w)[:, None] * o_loc
        tl.store(o_ptr + o_offs, o.to(o_ptr.dtype.element_ty), mask=rmask[:, None])
        if PROJ:
            _oproj_rows(o.to(o_ptr.dtype.element_ty).to(tl.float32), rl, rb * RPB, b, j, wo_ptr, acc_ptr, s_wo,
                        s_acc, HID, G, T, D, RPB, HB, HB2)


@triton.jit
def _oproj_rows(o, rl, r0, b, j, wo_ptr, acc_ptr, s_wo, s_acc, HID, G: tl.constexpr, T: tl.constexpr,
                D: tl.constexpr, RPB: tl.constexpr, HB: tl.constexpr, HB2: tl.constexpr):
    """The o-projection of this row block: for each of its rows i (row r0 + i = (g, t), o [BLOCK_R, D]
    fp32 already rounded to the output dtype, rows in block order), acc[b*T + t, :] +=
    o[i] @ WoT[(j*G + g)*D : +D, :] by fp32 atomics (the other query heads' blocks add into the
    same row: summation order is not deterministic). The hidden axis is covered by two tiles,
    HB = the largest power of two ≤ hidden and HB2 (0 if none) for the rest, both loaded at
    once: a row's D × hidden weights are one round trip, with no padding to the next power of two."""
    d = tl.arange(0, D)
    n1 = tl.arange(0, HB)
    for i in tl.static_range(RPB):
        ri = r0 + i
        if ri < G * T:
            g = ri // T
            t = ri % T
            orow = tl.sum(tl.where((rl == i)[:, None], o, 0.0), 0)[None, :]  # [1, D]
            wrow = wo_ptr + ((j * G + g) * D + d).to(tl.int64)[None, :] * s_wo  # tiles [n, d]: the sum over d
            arow = acc_ptr + (b * T + t) * s_acc                               # stays inside each thread
            w1 = tl.load(wrow + n1[:, None], mask=(n1 < HID)[:, None], other=0.0)
            if HB2 > 0:
                n2 = HB + tl.arange(0, HB2)
                w2 = tl.load(wrow + n2[:, None], mask=(n2 < HID)[:, None], other=0.0)
            tl.atomic_add(arow + n1, tl.sum(w1.to(tl.float32) * orow, 1), mask=n1 < HID, sem="relaxed")
            if HB2 > 0:
                tl.atomic_add(arow + n2, tl.sum(w2.to(tl.float32) * orow, 1), mask=n2 < HID, sem="relaxed")


@triton.jit
def _prefetch_span(ptr, start, nbytes, z, parts):
    """Prefetch share z of `parts` of the byte span [start, start + nbytes) at ptr into L2 (16-byte
    aligned inside the span; a few bytes at its ends may be left out)."""
    chunk = (nbytes + parts - 1) // parts
    lo = (start + z * chunk + 15) // 16 * 16
    hi = tl.minimum(start + (z + 1) * chunk, start + nbytes) // 16 * 16
    if hi > lo:
        prefetch_l2(ptr.to(tl.int64) + lo, hi - lo)


@triton.jit
def _merge_partials(po_ptr, pl_ptr, j, rf, rmask, R_TOTAL, NSPLIT, D: tl.constexpr, BLOCK_R: tl.constexpr,
                    SB: tl.constexpr):
    """Log-sum-exp merge of KV head j's NSPLIT split-KV partials for folded rows rf -> (o [R, D],
    lse [R]; -inf = no key). SB splits a step, loaded as one tile with an online rescale: a
    handful of dependent L2 round trips instead of two per split (64 splits at n = 128K)."""
    d = tl.arange(0, D)
    sbi = tl.arange(0, SB)
    m_run = tl.full([BLOCK_R], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_R], tl.float32)
    f = tl.zeros([BLOCK_R, D], tl.float32)
    for s0 in range(0, NSPLIT, SB):
        sp = s0 + sbi
        lm = (sp < NSPLIT)[:, None] & rmask[None, :]
        base = (j * NSPLIT + sp)[:, None] * R_TOTAL + rf[None, :]  # [SB, R]
        lse = tl.load(pl_ptr + base, mask=lm, other=float("-inf"))
        po = tl.load(po_ptr + base[:, :, None] * D + d[None, None, :], mask=lm[:, :, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_run - m_safe)
        wgt = tl.exp(lse - m_safe[None, :])
        den = den * alpha + tl.sum(wgt, 0)
        f = f * alpha[:, None] + tl.sum(wgt[:, :, None] * po, 0)
        m_run = m_new
    m_safe = tl.where(m_run == float("-inf"), 0.0, m_run)
    f = f / tl.where(den > 0, den, 1.0)[:, None]
    lse = tl.where(den > 0, m_safe + tl.log(tl.where(den > 0, den, 1.0)), float("-inf"))
    return f, lse


@triton.jit
def _prefetch_share(w_ptr, j, z, parts, row_bytes, HKV: tl.constexpr):
    """Prefetch share z of `parts` of row j (row_bytes bytes) of the packed heads into L2, aligned
    to 16 bytes inside the tensor (a few bytes at its very end may be left out)."""
    chunk = (row_bytes + parts - 1) // parts
    lo = (j * row_bytes + z * chunk) // 16 * 16
    hi = tl.minimum((j * row_bytes + (z + 1) * chunk + 15) // 16 * 16, (HKV * row_bytes) // 16 * 16)
    if hi > lo:
        prefetch_l2(w_ptr.to(tl.int64) + lo, hi - lo)


@triton.jit
def _doc_partial_kernel(
    q_ptr, k_ptr, v_ptr, po_ptr, pl_ptr, sqb, sqh, sqt, skh, sks, svh, svs, N, R_TOTAL, SPLIT_LEN, scale,
    G: tl.constexpr, T: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Split-KV flash decoding: program (j, split, row block) reads its slice of KV head j's
    document keys once for all B*G*T folded query rows (the document is shared by the batch)."""
    j = tl.program_id(0)
    sp = tl.program_id(1)
    rb = tl.program_id(2)
    nsplit = tl.num_programs(1)
    pdl_enter(PDL)
    rf = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rf < R_TOTAL
    b = rf // (G * T)
    g = (rf // T) % G
    t = rf % T
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b[:, None] * sqb + (j * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :],
                mask=rmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    lo = sp * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    n_idx = tl.arange(0, BLOCK_N)
    for s0 in range(lo, hi, BLOCK_N):
        ks = s0 + n_idx
        km = ks < hi
        k = tl.load(k_ptr + j * skh + ks[:, None] * sks + d[None, :], mask=km[:, None], other=0.0)
        v = tl.load(v_ptr + j * svh + ks[:, None] * svs + d[None, :], mask=km[:, None], other=0.0)
        s = _dot(q.to(k.dtype), tl.trans(k), IEEE) * scale
        s = tl.where(km[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_block(s, v, m_i, l_i, acc, IEEE)
    base = (j * nsplit + sp) * R_TOTAL + rf
    o = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(po_ptr + base[:, None] * D + d[None, :], o, mask=rmask[:, None])
    tl.store(pl_ptr + base, lse, mask=rmask)


@triton.jit
def _mlp_parts_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, start_ptr, w_ptr, b_ptr, sh_ptr, lse_ptr,
    sqb, sqh, sqt, skb, skh, sks, svb, svh, svs, sw, sb, M_ROWS, scale,
    HKV: tl.constexpr, T: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    H: tl.constexpr, HS: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, NC: tl.constexpr, HS_PAD: tl.constexpr,
    IEEE: tl.constexpr, W_IEEE: tl.constexpr, EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, W_BYTES: tl.constexpr = 2,
):
    """The mlp mode of _layer_kernel without its merge: program (b * Hkv + j, row block, part z)
    writes its share of the merge's inputs and stops (no atomics, no completion counter, no
    re-read of a workspace); the consumer (kernels/_triton_fused.py: _merged_row, inside the
    o-projection's GEMV) sums the shares and merges. With K_O = Hq * D and row m = b * T + t,
    query head h = j * G + g:

      shares[z, m, h*D + d]   z < NC: target-net hidden block z's share of f, times o_std
      shares[NC, m, h*D + d]  (skip path + b3) * o_std + o_mean   (so f = Σ_{z ≤ NC} shares[z])
      shares[NC + 1, m, ...]  o_loc, exact attention over the local tokens
      lse[0, m, h] = lse_loc,  lse[1, m, h] = lse_ctx (the score net)

    shares: [NC + 2, M_ROWS, K_O] fp32; lse: [2, M_ROWS, Hq] fp32. EARLY: part z's target-net
    weights (w1 whole, its BH columns of w2, its BH rows of w3; BK ≥ H) are loaded into registers
    before the PDL wait — they never depend on the previous kernel —, so after the wait a part's
    chain is: read q, three dots, one store."""
    pid = tl.program_id(0)
    rb = tl.program_id(1)
    z = tl.program_id(2)
    b = pid // HKV
    j = pid % HKV
    K_O = HKV * G * D
    OFF_W2 = D * H  # kernels/weights.py: layout; skip path and score net: _skip_and_score
    OFF_W3 = OFF_W2 + H * H
    OFF_B2 = H
    OFF_QM = 2 * H + D + 2 * HS + 1  # after b1, b2, b3, sb1, sb2, sb3
    OFF_QS = OFF_QM + D
    OFF_OM = OFF_QS + 1
    OFF_OS = OFF_OM + D
    wrow = w_ptr + j * sw
    brow = b_ptr + j * sb
    d = tl.arange(0, D)
    c = tl.arange(0, BH)
    cj = z * BH + c
    cjm = (cj < H) & (z < NC)
    if EARLY:
        ck = tl.arange(0, BK)
        ckm = (ck < H) & (z < NC)
        w1 = tl.load(wrow + d[:, None] * H + ck[None, :], mask=ckm[None, :], other=0.0)
        w2 = tl.load(wrow + OFF_W2 + ck[:, None] * H + cj[None, :], mask=ckm[:, None] & cjm[None, :], other=0.0)
        w3 = tl.load(wrow + OFF_W3 + cj[:, None] * D + d[None, :], mask=cjm[:, None], other=0.0)
        b1 = tl.load(brow + ck, mask=ckm, other=0.0)
    elif PREFETCH:
        _prefetch_share(w_ptr, j, z, tl.num_programs(2), sw * W_BYTES, HKV)
    b2 = tl.load(brow + OFF_B2 + cj, mask=cjm, other=0.0)
    q_mean = tl.load(brow + OFF_QM + d)
    q_std = tl.load(brow + OFF_QS)
    o_std = tl.load(brow + OFF_OS)
    pdl_enter(PDL)
    rl = tl.arange(0, BLOCK_R)
    r = rb * BLOCK_R + rl  # row = g * T + t
    rmask = r < G * T
    g = r // T
    t = r % T
    q = tl.load(q_ptr + b * sqb + (j * G + g)[:, None] * sqh + t[:, None] * sqt + d[None, :],
                mask=rmask[:, None], other=0.0)  # [R, D] input dtype
    m_row = b * T + t
    s_offs = m_row[:, None] * K_O + (j * G + g)[:, None] * D + d[None, :]
    l_offs = m_row * (HKV * G) + j * G + g
    wdt = w_ptr.dtype.element_ty
    xw = ((q.to(tl.float32) - q_mean[None, :]) / q_std).to(wdt)
    if z < NC:
        if EARLY:
            h1 = _gelu(_dot(xw, w1, W_IEEE) + b1[None, :])
            acc2 = _dot(h1.to(wdt), w2, W_IEEE)
        else:
            ck0 = tl.arange(0, BK)
            acc2 = tl.zeros([BLOCK_R, BH], tl.float32)
            for k0 in range(0, H, BK):  # h1 block by block, straight into layer 2
                ck = k0 + ck0
                ckm = ck < H
                w1b = tl.load(wrow + d[:, None] * H + ck[None, :], mask=ckm[None, :], other=0.0)
                w2b = tl.load(wrow + OFF_W2 + ck[:, None] * H + cj[None, :], mask=ckm[:, None] & cjm[None, :],
                              other=0.0)
                h1 = _gelu(_dot(xw, w1b, W_IEEE) + tl.load(brow + ck, mask=ckm, other=0.0)[None, :])
                acc2 += _dot(h1.to(wdt), w2b, W_IEEE)
            w3 = tl.load(wrow + OFF_W3 + cj[:, None] * D + d[None, :], mask=cjm[:, None], other=0.0)
        h2 = _gelu(acc2 + b2[None, :])
        part = _dot(h2.to(wdt), w3, W_IEEE) * o_std
        tl.store(sh_ptr + z * M_ROWS * K_O + s_offs, part, mask=rmask[:, None])
    elif z == NC:
        skip_part, lse_ctx = _skip_and_score(xw, wrow, brow, D, H, HS, HS_PAD, W_IEEE)
        part = skip_part * o_std + tl.load(brow + OFF_OM + d)[None, :]
        tl.store(sh_ptr + NC * M_ROWS * K_O + s_offs, part, mask=rmask[:, None])
        tl.store(lse_ptr + M_ROWS * (HKV * G) + l_offs, lse_ctx, mask=rmask)
    else:  # z == NC + 1: the local attention, in parallel with the heads
        o_loc, lse_loc = _local_attention(q, k_ptr, v_ptr, len_ptr, start_ptr, b, j, t, skb, skh, sks,
                                          svb, svh, svs, scale, T, D, BLOCK_R, BLOCK_S, IEEE)
        tl.store(sh_ptr + (NC + 1) * M_ROWS * K_O + s_offs, o_loc, mask=rmask[:, None])
        tl.store(lse_ptr + l_offs, lse_loc, mask=rmask)
