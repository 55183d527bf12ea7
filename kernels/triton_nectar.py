"""The fused Nectar layer attention in Triton: for one layer and all heads in one launch,
evaluate the Nectar heads (mlp or quadrature), exact attention over the local KV cache, and the
log-sum-exp merge. Also the full-attention counterpart used as the baseline: split-KV flash
decoding over a document KV shared by the batch, merged with the same local attention.

`import triton` happens inside the launchers (lazily), so this module imports on CPU machines.
Inputs fp16/bf16/fp32; all accumulation in fp32. Semantics: kernels/reference.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .launch import launch

if TYPE_CHECKING:
    import torch


MODES = {"mlp": 0, "quadrature": 1, "partials": 2}


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _kernels():
    """The Triton JIT functions (compiled on first launch); importing them imports triton."""
    from . import _triton_src

    return _triton_src._layer_kernel, _triton_src._doc_partial_kernel


def _check(q, k_loc, v_loc, kv_len):
    b, hq, t, d = q.shape
    if k_loc.dim() != 4 or k_loc.shape[0] != b or k_loc.shape[3] != d or v_loc.shape != k_loc.shape:
        raise ValueError(f"k_loc/v_loc must be [B, Hkv, S, D] matching q {tuple(q.shape)}, got {tuple(k_loc.shape)}")
    if hq % k_loc.shape[1]:
        raise ValueError("query heads must be a multiple of KV heads")
    if d & (d - 1) or d < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    if q.stride(3) != 1 or k_loc.stride(3) != 1 or v_loc.stride(3) != 1:
        raise ValueError("q, k_loc, v_loc need a contiguous last (head-dim) axis")
    if kv_len.shape != (b,):
        raise ValueError("kv_len must be [B]")


def _row_block(rows: int) -> int:
    # at most 32 rows a program: the fused kernel stays on mma.sync tiles (no 64-row wgmma tiles)
    return min(32, max(16, _next_pow2(rows)))


def _rows_per_block(rows: int, block_r: int, rows_per_block: int | None) -> int:
    return block_r if not rows_per_block else max(1, min(int(rows_per_block), block_r))


def workspace_numel(batch: int, q_heads: int, kv_heads: int, t: int, d: int, rows_per_block: int | None = None) -> int:
    """fp32 elements of the mlp kernel's workspace for q: [batch, q_heads, t, d] (see
    nectar_layer_attention); the kernel leaves its first part zeroed again after each launch."""
    rows = (q_heads // kv_heads) * t
    block_r = _row_block(rows)
    tiles = batch * kv_heads * (-(-rows // _rows_per_block(rows, block_r, rows_per_block)))
    return tiles * (block_r * d + 1) + tiles * block_r * (d + 2)


# The o-projection fused into the attention kernel's epilogue (o_proj=): rows_per_block query rows
# per program (1: each query head's merge projects its own D rows of WoT, spreading the projection
# over more programs; None: all of a KV head's rows in one program); num_warps of the launch.
# H100, SmolLM2 shape, alone (benchmarks/kernel_sweep.py --fused): 1 row, 4 warps 11.1 us vs 7.9 us
# for the Nectar kernel without it + 1.2 us for the o-projection GEMV (all rows, 8 warps: 23 us).
OPROJ_TUNING = {"rows_per_block": 1, "num_warps": 4}


def _split_pow2(n: int) -> tuple[int, int]:
    """n = a + b covered by two power-of-two tiles: a = the largest power of two ≤ n, b the next
    power of two ≥ n − a (0 when n is one)."""
    a = 1 << (int(n).bit_length() - 1)
    return a, (_next_pow2(n - a) if n > a else 0)


# Launch parameters of the mlp kernel (block_h: hidden columns per part, block_k: h1 block,
# num_warps, num_stages); benchmarks/kernel_sweep.py and step_sweep.py (inside the CUDA-graph step,
# H100: 64 / 8 warps 0.609 ms a SmolLM2 step vs 0.635 ms for 32 / 4) time alternatives.
MLP_TUNING = {"block_h": 64, "block_k": 128, "num_warps": 8, "num_stages": 2}


def _check_proj(o_proj, zero, b, hq, t, d):
    if o_proj is not None:
        wo_t, acc = o_proj
        if wo_t.dim() != 2 or wo_t.shape[0] != hq * d or wo_t.stride(1) != 1:
            raise ValueError(f"o_proj: WoT must be [Hq*D, hidden] = [{hq * d}, ·] with contiguous rows, got {tuple(wo_t.shape)}")
        if acc.shape != (b * t, wo_t.shape[1]) or acc.stride(1) != 1 or str(acc.dtype) != "torch.float32":
            raise ValueError(f"o_proj: the accumulator must be fp32 [B*T, hidden] = [{b * t}, {wo_t.shape[1]}], "
                             f"got {tuple(acc.shape)} {acc.dtype}")
    if zero is not None and (str(zero.dtype) != "torch.float32" or not zero.is_contiguous()):
        raise ValueError("zero: a contiguous fp32 tensor")


def _launch_layer(q, k_loc, v_loc, kv_len, kv_start, heads_w, heads_b, mode, width, scale, out,
                  partials=None, workspace=None, tuning=None, o_proj=None, zero=None):
    import torch

    layer_kernel, _ = _kernels()
    b, hq, t, d = q.shape
    hkv = k_loc.shape[1]
    g = hq // hkv
    rows = g * t
    block_r = _row_block(rows)
    _check_proj(o_proj, zero, b, hq, t, d)
    rpb = _rows_per_block(rows, block_r, OPROJ_TUNING["rows_per_block"] if o_proj is not None else None)
    n_rb = -(-rows // rpb)
    if kv_start is None:
        kv_start = torch.zeros_like(kv_len)
    if out is None:
        out = torch.empty_like(q)
    ieee = q.dtype == torch.float32
    h = hs = hs_pad = 16
    bh, bk, nc, parts = 16, 16, 0, 1
    ws = po = pl = q  # unused pointers in the other modes
    r_total = nsplit = 1
    if mode == 0:
        from .weights import score_width

        h, hs = width, score_width(width)
        tune = {**MLP_TUNING, **(tuning or {})}
        bh = tune["block_h"]
        bk = tune["block_k"] if heads_w.element_size() <= 2 and h > 64 else 64
        nc = -(-h // bh)
        parts = nc + 2
        hs_pad = max(16, _next_pow2(hs))
        need = workspace_numel(b, hq, hkv, t, d, rpb)
        if workspace is None:
            ws = torch.zeros(need, device=q.device, dtype=torch.float32)
        elif workspace.numel() < need or workspace.dtype != torch.float32:
            raise ValueError(f"workspace: need {need} fp32 elements (workspace_numel), got {workspace.numel()}")
        else:
            ws = workspace
    elif mode == 1:
        h = width
    else:
        po, pl = partials
        nsplit, r_total = pl.shape[1], pl.shape[2]
    if heads_w is None:
        heads_w = heads_b = q
    w_ieee = heads_w.dtype == torch.float32
    from .launch import pdl_enabled, pdl_options

    pdl = pdl_enabled(q)
    prefetch = mode != 2 and pdl and heads_w.is_contiguous() and heads_w.data_ptr() % 16 == 0
    if o_proj is not None:
        wo_t, acc = o_proj
        hb, hb2 = _split_pow2(wo_t.shape[1])
        proj_args = dict(wo_ptr=wo_t, acc_ptr=acc, s_wo=wo_t.stride(0), s_acc=acc.stride(0), HID=wo_t.shape[1],
                         PROJ=True, HB=hb, HB2=hb2, PREFETCH_O=pdl and wo_t.data_ptr() % 16 == 0,
                         WO_BYTES=wo_t.element_size())
    else:
        proj_args = dict(wo_ptr=q, acc_ptr=q)
    if zero is not None:
        proj_args.update(zero_ptr=zero, ZN=zero.numel(), ZERO=True)
    else:
        proj_args.update(zero_ptr=q)
    launch(layer_kernel, (b * hkv, n_rb, parts),
        q, k_loc, v_loc, kv_len, kv_start, heads_w, heads_b, out, ws, po, pl,
        q.stride(0), q.stride(1), q.stride(2), k_loc.stride(0), k_loc.stride(1), k_loc.stride(2),
        v_loc.stride(0), v_loc.stride(1), v_loc.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads_w.stride(0), heads_b.stride(0), r_total, nsplit, b * hkv * n_rb, float(scale),
        HKV=hkv, T=t, G=g, D=d, BLOCK_R=block_r, BLOCK_S=64 if d <= 64 else 32, MODE=mode,
        H=h, HS=hs, BH=bh, BK=bk, NC=nc, HS_PAD=hs_pad, IEEE=ieee, W_IEEE=w_ieee,
        num_warps=OPROJ_TUNING["num_warps"] if o_proj is not None else tune["num_warps"] if mode == 0 else 4,
        num_stages=tune["num_stages"] if mode == 0 else 2,
        PDL=pdl, PREFETCH=prefetch, W_BYTES=heads_w.element_size(),
        SB=max(1, min(16, 8192 // (block_r * d))), RPB=rpb, **proj_args, **pdl_options(pdl),
    )
    return out


def nectar_layer_attention(
    q, k_loc, v_loc, kv_len, heads_w, heads_b, variant: str, width: int, scale: float,
    kv_start=None, out=None, workspace=None, tuning: dict | None = None, o_proj=None, zero=None,
):
    """Fused Nectar attention of one layer, all heads, one kernel launch.

    q:        [B, Hq, T, D]  fp16/bf16/fp32, post-RoPE queries of the T newest tokens (T ≤ ~64);
              query head h belongs to KV head h // (Hq / Hkv).
    k_loc,
    v_loc:    [B, Hkv, S, D] same dtype, the local KV cache (prompt + generated, post-RoPE); the
              T query tokens' own keys are already written at slots kv_len − T .. kv_len − 1.
    kv_len:   [B] int32, valid local slots per row (causal: token t sees slots ≤ kv_len − T + t).
    kv_start: [B] int32 or None (zeros), first valid slot per row (left padding).
    heads_w:  [Hkv, P_w] (fp32/bf16/fp16) and heads_b: [Hkv, P_b] fp32, this layer's packed
              heads (kernels/weights.py: layout, pack_layer).
    variant:  "mlp" | "quadrature"; width: the layer's hidden width H (mlp) or node count (quadrature).
    scale:    the attention scale (usually D ** -0.5).
    out:      optional [B, Hq, T, D] output buffer (any strides with a contiguous last axis).
    workspace: optional zero-filled fp32 tensor of ≥ workspace_numel(B, Hq, Hkv, T, D) elements
              (mlp only; reused across launches on one stream: the kernel re-zeroes it). None
              allocates a zeroed one per call.
    tuning:   optional overrides of MLP_TUNING (launch parameters; results do not depend on them).
    o_proj:   optional (WoT [Hq*D, hidden] with contiguous rows — the o-projection's weight
              transposed —, acc [B*T, hidden] fp32): the epilogue also adds o (rounded to q's
              dtype, rows b*T + t) @ WoT into acc by fp32 atomics, the residual stream's delta with
              the o-projection fused in (no separate launch). The atomics make the summation order
              across query heads nondeterministic (a few fp32 ulps between runs).
    zero:     optional contiguous fp32 tensor zeroed by the kernel after its PDL wait (the decode
              step's other accumulator, which the next kernel adds into).
    workspace with o_proj: size it with workspace_numel(..., OPROJ_TUNING["rows_per_block"]).
    Returns   o: [B, Hq, T, D] in q's dtype, o = σ(g − lse_loc)·f + (1 − σ(g − lse_loc))·o_loc.

    All last axes must be contiguous; D a power of two ≥ 16. All math in fp32 (fp32 inputs use
    IEEE fp32 dots; half inputs feed the tensor cores with fp32 accumulation).
    """
    _check(q, k_loc, v_loc, kv_len)
    if variant not in ("mlp", "quadrature"):
        raise ValueError(f"variant must be 'mlp' or 'quadrature', got {variant!r}")
    if heads_w.shape[0] != k_loc.shape[1] or heads_b.shape[0] != k_loc.shape[1]:
        raise ValueError("heads_w/heads_b need one row per KV head")
    return _launch_layer(q, k_loc, v_loc, kv_len, kv_start, heads_w.contiguous(), heads_b.contiguous(),
                         MODES[variant], width, scale, out, workspace=workspace, tuning=tuning, o_proj=o_proj,
                         zero=zero)


def nectar_retained_attention(
    q, k_loc, v_loc, kv_len, heads_w, heads_b, variant: str, width: int, scale: float,
    ret_k, ret_v, kv_heads, subset: bool, kv_start=None, out=None,
):
    """`nectar_layer_attention` for a layer with retained heads (nectar fit --retain-heads): the fused
    kernel runs every head, then the retained KV heads' rows are recomputed in torch ops over their
    stored document keys/values (nectar_kernels.retained; fp32).

    ret_k, ret_v: [R, c, D] stored post-RoPE document keys/values of the KV heads kv_heads: [R] (int);
    subset: a token budget (their networks serve the tokens not kept). Other arguments and the result
    as nectar_layer_attention (without o_proj: the retained rows are written after the merge)."""
    from .retained import overwrite_retained_rows

    if variant != "mlp":
        raise ValueError("retained heads need mlp heads (quadrature heads have no retained-head path)")
    if ret_k.dim() != 3 or ret_k.shape != ret_v.shape or ret_k.shape[0] != kv_heads.numel() or ret_k.shape[2] != q.shape[3]:
        raise ValueError(f"ret_k/ret_v must be [R, c, D] for R = {kv_heads.numel()} kv_heads, got {tuple(ret_k.shape)}")
    if kv_start is None:
        import torch

        kv_start = torch.zeros_like(kv_len)
    o = nectar_layer_attention(q, k_loc, v_loc, kv_len, heads_w, heads_b, variant, width, scale, kv_start=kv_start, out=out)
    return overwrite_retained_rows(o, q, k_loc, v_loc, kv_len, kv_start, ret_k, ret_v, kv_heads, scale, subset,
                                   heads_w, heads_b, width)


# Launch parameters of the deferred-merge mlp kernel (nectar_layer_shares): hidden columns per
# part, h1 block of the loop, warps, pipeline stages, and the largest D * next_pow2(H) +
# next_pow2(H) * block_h weight elements a part holds in registers before the PDL wait (above it:
# the h1 loop after the wait, weights prefetched into L2).
SHARES_TUNING = {"block_h": 64, "block_k": 128, "num_warps": 8, "num_stages": 2, "early_max": 32768}


@dataclass(frozen=True)
class NectarShares:
    """One layer's Nectar attention before its merge, as nectar_layer_shares leaves it.

    shares: [NS + 1, M, Hq*D] fp32 (M = B*T rows b*T + t, columns h*D + d): f = Σ shares[:NS]
            (the target net's output, destandardized), shares[NS] = o_loc (local attention).
    lse:    [2, M, Hq] fp32: lse_loc (local tokens; −inf: none), lse_ctx (the score net)."""

    shares: torch.Tensor  # annotations are not evaluated: torch is imported lazily here
    lse: torch.Tensor

    @property
    def rows(self) -> int:
        return self.shares.shape[1]

    def merged(self):
        """o [M, Hq*D] fp32 = w·f + (1 − w)·o_loc, w = σ(lse_ctx − lse_loc) (torch)."""
        import torch

        ns = self.shares.shape[0] - 1
        f, o_loc = self.shares[:ns].sum(0), self.shares[ns]
        d = self.shares.shape[2] // self.lse.shape[2]
        w = torch.sigmoid(self.lse[1] - self.lse[0]).repeat_interleave(d, dim=-1)
        return w * f + (1.0 - w) * o_loc


def _shares_parts(width: int, tuning: dict | None = None) -> int:
    """Target-net parts of the deferred-merge kernel for hidden width `width`."""
    tune = {**SHARES_TUNING, **(tuning or {})}
    return -(-int(width) // tune["block_h"])


def shares_numel(batch: int, q_heads: int, t: int, d: int, width: int, tuning: dict | None = None) -> int:
    """fp32 elements of nectar_layer_shares' workspace for q [batch, q_heads, t, d] and a layer of
    hidden width `width` (size it for the widest layer to share it across layers)."""
    m = batch * t
    return (_shares_parts(width, tuning) + 2) * m * q_heads * d + 2 * m * q_heads


def nectar_layer_shares(q, k_loc, v_loc, kv_len, heads_w, heads_b, width: int, scale: float, kv_start=None,
                        workspace=None, tuning: dict | None = None) -> NectarShares:
    """nectar_layer_attention (mlp variant) without the merge: one launch that writes the merge's
    inputs (NectarShares) instead of o; the consumer merges (kernels/fused.py: merge_gemv, in the
    o-projection's prologue). Same arguments as nectar_layer_attention; workspace: optional fp32
    tensor of ≥ shares_numel(...) elements (no zeroing needed: every element read is written).
    This takes the merge's serial tail out of the attention kernel (atomics, a completion counter,
    a re-read of the workspace) and lets each part hold its weights in registers before the PDL
    wait."""
    import torch

    _check(q, k_loc, v_loc, kv_len)
    if heads_w.shape[0] != k_loc.shape[1] or heads_b.shape[0] != k_loc.shape[1]:
        raise ValueError("heads_w/heads_b need one row per KV head")
    from ._triton_src import _mlp_parts_kernel
    from .launch import pdl_enabled, pdl_options
    from .weights import score_width

    heads_w, heads_b = heads_w.contiguous(), heads_b.contiguous()
    b, hq, t, d = q.shape
    hkv = k_loc.shape[1]
    g = hq // hkv
    rows, m, k_o = g * t, b * t, hq * d
    tune = {**SHARES_TUNING, **(tuning or {})}
    h, hs = int(width), score_width(int(width))
    bh = tune["block_h"]
    nc = _shares_parts(h, tune)
    need = shares_numel(b, hq, t, d, h, tune)
    if workspace is None:
        workspace = torch.empty(need, device=q.device, dtype=torch.float32)
    elif workspace.numel() < need or workspace.dtype != torch.float32:
        raise ValueError(f"workspace: need {need} fp32 elements (shares_numel), got {workspace.numel()}")
    sh = workspace[: (nc + 2) * m * k_o].view(nc + 2, m, k_o)
    lse = workspace[(nc + 2) * m * k_o: need].view(2, m, hq)
    if kv_start is None:
        kv_start = torch.zeros_like(kv_len)
    h_pad = _next_pow2(h)
    early = d * h_pad + h_pad * bh <= tune["early_max"]
    bk = h_pad if early else (tune["block_k"] if heads_w.element_size() <= 2 and h > 64 else 64)
    block_r = _row_block(rows)
    pdl = pdl_enabled(q)
    launch(_mlp_parts_kernel, (b * hkv, -(-rows // block_r), nc + 2),
        q, k_loc, v_loc, kv_len, kv_start, heads_w, heads_b, sh, lse,
        q.stride(0), q.stride(1), q.stride(2), k_loc.stride(0), k_loc.stride(1), k_loc.stride(2),
        v_loc.stride(0), v_loc.stride(1), v_loc.stride(2), heads_w.stride(0), heads_b.stride(0), m, float(scale),
        HKV=hkv, T=t, G=g, D=d, BLOCK_R=block_r, BLOCK_S=64 if d <= 64 else 32,
        H=h, HS=hs, BH=bh, BK=bk, NC=nc, HS_PAD=max(16, _next_pow2(hs)),
        IEEE=q.dtype == torch.float32, W_IEEE=heads_w.dtype == torch.float32, EARLY=early, PDL=pdl,
        PREFETCH=(not early) and pdl and heads_w.data_ptr() % 16 == 0, W_BYTES=heads_w.element_size(),
        num_warps=tune["num_warps"], num_stages=tune["num_stages"], **pdl_options(pdl),
    )
    return NectarShares(sh, lse)


def split_len_for(n: int, kv_heads: int, sms: int = 132, programs_per_sm: int = 2) -> int:
    """Keys per split: about `programs_per_sm` programs per SM over (KV heads × splits), at least
    256 keys each."""
    target = max(1, programs_per_sm * sms // kv_heads)
    return max(256, _next_pow2(-(-n // target)))


# Launch parameters of the split-KV kernel (benchmarks/kernel_sweep.py --partials times alternatives).
PARTIAL_TUNING = {"programs_per_sm": 2, "block_n": None, "num_warps": 4, "num_stages": 3}


# PDL on the split-KV kernel lets its CTAs become resident while the previous kernel still holds
# the SMs; on the H100 that halved its streaming bandwidth inside the decode step at long
# documents (SmolLM2 shape, n = 131,072: 2.96 ms a step with PDL, 2.36 without), while it helps
# a little at short ones (1,024: 0.684 vs 0.713 ms). Full attention gets the faster of the two.
PDL_DOC_MAX_N = 2048


def _pdl_doc(n: int) -> bool:
    """Whether the document kernel launches with PDL: NECTAR_PDL_DOC=0/1 forces it, else by n."""
    forced = os.environ.get("NECTAR_PDL_DOC")
    return forced == "1" if forced in ("0", "1") else n <= PDL_DOC_MAX_N


def doc_attention_partials(q, k_doc, v_doc, scale: float, split_len: int | None = None, tuning: dict | None = None):
    """Split-KV flash decoding over a document KV shared by the batch.

    q: [B, Hq, T, D]; k_doc, v_doc: [1, Hkv, N, D] (read once for all B*G*T query rows).
    Returns (part_o [Hkv, NSPLIT, B*G*T, D] fp32, part_lse [Hkv, NSPLIT, B*G*T] fp32), rows
    folded as (b, g, t); merge them with `full_layer_attention` (or torch.logsumexp).
    """
    import torch

    _, partial_kernel = _kernels()
    b, hq, t, d = q.shape
    hkv, n = k_doc.shape[1], k_doc.shape[2]
    g = hq // hkv
    r_total = b * g * t
    tune = {**PARTIAL_TUNING, **(tuning or {})}
    split_len = split_len or split_len_for(n, hkv, programs_per_sm=tune["programs_per_sm"])
    nsplit = -(-n // split_len)
    block_r = min(64, max(16, _next_pow2(r_total)))
    po = torch.empty(hkv, nsplit, r_total, d, device=q.device, dtype=torch.float32)
    pl = torch.empty(hkv, nsplit, r_total, device=q.device, dtype=torch.float32)
    block_n = tune["block_n"] or (64 if d <= 64 else 32)
    from .launch import pdl_enabled, pdl_options

    pdl = pdl_enabled(q) and _pdl_doc(n)
    launch(partial_kernel, (hkv, nsplit, -(-r_total // block_r)),
        q, k_doc, v_doc, po, pl, q.stride(0), q.stride(1), q.stride(2), k_doc.stride(1), k_doc.stride(2),
        v_doc.stride(1), v_doc.stride(2), n, r_total, split_len, float(scale),
        G=g, T=t, D=d, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=tune["num_warps"], num_stages=tune["num_stages"], PDL=pdl, **pdl_options(pdl),
    )
    return po, pl


def doc_attention_partials_cublas(q, k_doc, v_doc, scale: float):
    """What doc_attention_partials returns, as one split, from two cuBLAS GEMMs (torch): for fp32
    inputs, where Triton's IEEE-fp32 dots are slow (the split-KV kernel held a batch-16 fp32
    decode step at 7.4 ms on the H100, n = 4K: benchmarks/probe_gen.py) and cuBLAS is exact fp32.
    q: [B, Hq, T, D]; k_doc, v_doc: [1, Hkv, N, D] -> ([Hkv, 1, B*G*T, D], [Hkv, 1, B*G*T]) fp32."""
    import torch

    b, hq, t, d = q.shape
    hkv = k_doc.shape[1]
    qf = q.reshape(b, hkv, hq // hkv, t, d).transpose(0, 1).reshape(hkv, -1, d)  # rows folded (b, g, t)
    s = torch.matmul(qf.float(), k_doc[0].float().transpose(1, 2)) * scale  # [Hkv, R, N]
    lse = torch.logsumexp(s, -1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v_doc[0].float())
    return o[:, None], lse[:, None]


CUBLAS_SCORES_MAX_BYTES = 256 << 20  # the cuBLAS path materializes [Hkv, B*G*T, N] fp32 scores


def full_layer_attention(q, k_doc, v_doc, k_loc, v_loc, kv_len, scale: float, kv_start=None, out=None,
                         split_len: int | None = None, tuning: dict | None = None, o_proj=None, zero=None):
    """Exact attention over [shared document | local tokens] for one layer: two launches
    (split-KV partials over the document, then merge of the partials + local attention). fp32
    inputs with no split_len asked for take the cuBLAS partials when their scores fit in
    CUBLAS_SCORES_MAX_BYTES. o_proj, zero: as in nectar_layer_attention (in the merge launch)."""
    import torch

    _check(q, k_loc, v_loc, kv_len)
    b, hq, t, _ = q.shape
    if q.dtype == torch.float32 and split_len is None and hq * b * t * k_doc.shape[2] * 4 <= CUBLAS_SCORES_MAX_BYTES:
        parts = doc_attention_partials_cublas(q, k_doc, v_doc, scale)
    else:
        parts = doc_attention_partials(q, k_doc, v_doc, scale, split_len, tuning)
    return _launch_layer(q, k_loc, v_loc, kv_len, kv_start, None, None, MODES["partials"], 0, scale, out, parts,
                         o_proj=o_proj, zero=zero)
