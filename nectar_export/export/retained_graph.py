"""Retained heads in the graph: a few KV heads' exact document keys/values, whose exact (o, lse)
replace those heads' Nectar (f, g) — in standard ops (`retained_heads`: fp32/fp16 bundles) or, in
quantized bundles, as per-head `MatMulNBits` columns of the layer's one softmax (`retained_columns`).
Node names under `/model/layers.{i}/attn/retained/` (docs/onnx.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .graph_builder import NEG, GraphBuilder


def retained_heads(b: GraphBuilder, p: str, wn: str, qs: str, kept, f: str, g: str, hkv: int) -> tuple[str, str]:
    """For the retained KV heads, (f, g) := exact (o, lse) over their document keys. qs: scaled
    queries [B, Hkv, G*T, D]; f [B, Hkv, G*T, D], g [B, Hkv, G*T, 1] -> the same with those heads
    replaced. The pseudo-key then carries the exact document part, and the one softmax over
    [prefix + local | pseudo-key] stays the exact log-sum-exp merge.

    Standard ops (fp32/fp16 bundles, TensorRT graphs): int8 keys/values of every token stay int8 and
    are cast per step, which keeps the bundle small but costs step time (docs/benchmarks.md); under
    a token budget they go in decoded (fp32). Quantized bundles use `retained_columns` instead."""
    qr = b.op("Gather", [qs, b.const(list(kept.heads))], f"{p}/q/Gather", axis=1)  # [B, R, G*T, D]
    lse, o = _retained_standard(b, p, wn, qr, kept)
    if kept.subset:  # kept tokens S; the network (f, g) serves the rest of the document: log-sum-exp merge
        heads = b.const(list(kept.heads))
        fr = b.op("Gather", [f, heads], f"{p}/subset/f/Gather", axis=1)
        gr = b.op("Gather", [g, heads], f"{p}/subset/g/Gather", axis=1)
        both = b.op("Concat", [lse, gr], f"{p}/subset/Concat", axis=-1)  # [B, R, G*T, 2]
        w_s, w_r = b.op("Split", [b.op("Softmax", [both], f"{p}/subset/Softmax", axis=-1), b.const([1, 1])], f"{p}/subset/Split",
                        outputs=2, axis=-1)
        o = b.op("Add", [b.op("Mul", [w_s, o], f"{p}/subset/o_kept/Mul"), b.op("Mul", [w_r, fr], f"{p}/subset/o_rest/Mul")],
                 f"{p}/subset/o/Add")
        lse = b.op("ReduceLogSumExp", [both], f"{p}/subset/lse/ReduceLogSumExp", axes=[-1], keepdims=1)

    def splice(nectar: str, exact: str, what: str) -> str:
        ones = b.const([1] * hkv)
        per_head = b.op("Split", [nectar, ones], f"{p}/{what}/nectar/Split", outputs=hkv, axis=1) if hkv > 1 else [nectar]
        r = len(kept.heads)
        ex = b.op("Split", [exact, b.const([1] * r)], f"{p}/{what}/exact/Split", outputs=r, axis=1) if r > 1 else [exact]
        for i, j in enumerate(kept.heads):
            per_head[j] = ex[i]
        return per_head[0] if hkv == 1 else b.op("Concat", per_head, f"{p}/{what}/Concat", axis=1)

    return splice(f, o, "o"), splice(g, lse, "lse")


def _retained_standard(b: GraphBuilder, p: str, wn: str, qr: str, kept) -> tuple[str, str]:
    """Standard-op attention of the retained heads: qr [B, R, G*T, D] -> lse [B, R, G*T, 1], o [B, R, G*T, D].
    int8 KV of every token stays int8 and is cast per step, its per-token scales multiplying the
    scores (keys) and the probabilities (values); a token budget's int8 KV goes in decoded (fp32)."""
    k, v = kept.k, kept.v
    cast = kept.k_scale is not None and not kept.subset
    if kept.k_scale is not None and not cast:
        k, v = k.astype(np.float32) * kept.k_scale, v.astype(np.float32) * kept.v_scale
    kt = b.weight(f"{wn}.key_t", np.ascontiguousarray(k.transpose(0, 2, 1), dtype=np.int8 if cast else np.float32))  # [R, D, c]
    vv = b.weight(f"{wn}.value", np.ascontiguousarray(v, dtype=np.int8 if cast else np.float32))  # [R, c, D]
    if cast:
        kt = b.op("Cast", [kt], f"{p}/key/Cast", to=TensorProto.FLOAT)
        vv = b.op("Cast", [vv], f"{p}/value/Cast", to=TensorProto.FLOAT)
    sc = b.op("MatMul", [qr, kt], f"{p}/scores/MatMul")  # [B, R, G*T, c]
    if cast:  # q·(s_j k_j) = s_j (q·k_j): the key scale multiplies score column j
        sc = b.op("Mul", [sc, b.weight(f"{wn}.key_scale_t", np.ascontiguousarray(kept.k_scale.transpose(0, 2, 1), dtype=np.float32))],
                  f"{p}/scores/scale/Mul")  # [R, 1, c]
    lse = b.op("ReduceLogSumExp", [sc], f"{p}/lse/ReduceLogSumExp", axes=[-1], keepdims=1)  # [B, R, G*T, 1]
    probs = b.op("Softmax", [sc], f"{p}/Softmax", axis=-1)
    if cast:  # Σ p_j s_j v_j: the value scale joins the probabilities
        probs = b.op("Mul", [probs, b.weight(f"{wn}.value_scale_t", np.ascontiguousarray(kept.v_scale.transpose(0, 2, 1), dtype=np.float32))],
                     f"{p}/probs/scale/Mul")
    return lse, b.op("MatMul", [probs, vv], f"{p}/pv/MatMul")  # [B, R, G*T, D]


# Tokens per block of the values' MatMulNBits: ORT rounds the probabilities to int8 per block. 64
# rather than 32: a default n = 7,000 int4 bundle decoded 0.42 ms (3%) faster per token at equal KL to
# the fp32 bundle (docs/benchmarks.md, "Larger blocks for the 8-bit heads").
NBITS_VALUE_BLOCK = 64


@dataclass(frozen=True)
class RetainedColumns:
    """The retained heads of one layer as extra columns of the layer's one softmax (quantized
    bundles): `scores` [B, Hkv, G*T, c] (NEG for the other heads), `term(p)` the values' part of
    the output for those columns' probabilities, `g_bias` NEG at the retained heads (every token
    kept: their networks serve nothing) or None (token budget: the network serves the other tokens,
    and the shared softmax is the exact log-sum-exp merge of the two)."""

    scores: str
    term: Callable[[str], str]  # probs part [B, Hkv, G*T, c] -> [B, Hkv, G*T, D]
    g_bias: str | None


def retained_columns(b: GraphBuilder, p: str, wn: str, q: str, kept, hkv: int, scale: float) -> RetainedColumns:
    """The retained heads' int8 document keys/values as `MatMulNBits` (8 bits, accuracy level 4:
    ORT rounds the activations to int8 per block and takes integer dot products). Retained head j:

        scores_j = MatMulNBits(q_j [B, 1, G*T, D];  keys q + 128 as uint8 [c, 1, D], one block of D
                               per token, scales = attention scale x the stored per-token key scales,
                               zero point 128)
        term_j   = MatMulNBits(p_j · value scales [B, 1, G*T, c];  values q + 128 as uint8
                               [D, ⌈c/64⌉, 64] (padding 128 = 0), scales 1, zero point 128)

    Both hold the stored integers exactly (no second rounding); the new error is ORT's int8 rounding
    of the queries and of the scaled probabilities. Their columns join the layer's one softmax, so a
    layer adds 8 + 2R nodes (R retained heads) and no separate merge. q: unscaled queries
    [B, Hkv, G*T, D] (the attention scale is folded into the key scales).
    Nodes under `{p}`: `q/Split`, `head{j}/scores/MatMulNBits8`, `fill/{Shape,Expand}`, `scores/Concat`,
    `probs/scale/Mul`, `probs/Split`, `head{j}/pv/MatMulNBits8`, `zeros/Mul`, `pv/Concat`, `g/Add`;
    weights `{wn}.head{j}.{key,value}.q8` with `.scales` and `.zero_points` (j the KV head)."""
    r, c, d = kept.k.shape
    blk = NBITS_VALUE_BLOCK
    cb = -(-c // blk)
    b.custom_domains["com.microsoft"] = 1

    def nbits(x, base, packed, scales, k, n, block, name):
        b.weight(base, packed)
        b.weight(f"{base}.scales", np.ascontiguousarray(scales, np.float32).ravel())
        b.weight(f"{base}.zero_points", np.full(packed.shape[0] * packed.shape[1], 128, np.uint8))
        return b.op("MatMulNBits", [x, base, f"{base}.scales", f"{base}.zero_points"], name, domain="com.microsoft",
                    K=k, N=n, bits=8, block_size=block, accuracy_level=4)

    def per_head(x, what):
        return b.op("Split", [x, b.const([1] * hkv)], f"{p}/{what}/Split", outputs=hkv, axis=1) if hkv > 1 else [x]

    qh, scores = per_head(q, "q"), {}
    for i, j in enumerate(kept.heads):
        key = (kept.k[i].astype(np.int16) + 128).astype(np.uint8)[:, None, :]  # [c, 1, D]: N = c tokens, K = D
        scores[j] = nbits(qh[j], f"{wn}.head{j}.key.q8", key, scale * kept.k_scale[i].astype(np.float64), d, c, d,
                          f"{p}/head{j}/scores/MatMulNBits8")
    first, fill = scores[kept.heads[0]], None
    if r < hkv:  # the other heads' columns: NEG, so the softmax gives them exactly 0
        fill = b.op("Expand", [b.const([NEG], np.float32), b.op("Shape", [first], f"{p}/fill/Shape")], f"{p}/fill/Expand")
    sc = first if hkv == 1 else b.op("Concat", [scores.get(j, fill) for j in range(hkv)], f"{p}/scores/Concat", axis=1)
    vs = np.zeros((hkv, 1, c), np.float32)
    vs[list(kept.heads)] = kept.v_scale.transpose(0, 2, 1)
    def term(pr: str) -> str:
        ph = per_head(b.op("Mul", [pr, b.weight(f"{wn}.value_scale_t", vs)], f"{p}/probs/scale/Mul"), "probs")
        outs = {}
        for i, j in enumerate(kept.heads):
            vt = np.full((d, cb * blk), 128, np.uint8)
            vt[:, :c] = (kept.v[i].astype(np.int16) + 128).astype(np.uint8).T  # [D, c]: N = D, K = c tokens
            outs[j] = nbits(ph[j], f"{wn}.head{j}.value.q8", vt.reshape(d, cb, blk), np.ones(d * cb), c, d, blk,
                            f"{p}/head{j}/pv/MatMulNBits8")
        if hkv == 1:
            return outs[kept.heads[0]]
        zeros = b.op("Mul", [outs[kept.heads[0]], b.const(0.0, np.float32)], f"{p}/zeros/Mul") if r < hkv else None
        return b.op("Concat", [outs.get(j, zeros) for j in range(hkv)], f"{p}/pv/Concat", axis=1)

    g_bias = None
    if not kept.subset:
        bias = np.zeros((1, hkv, 1, 1), np.float32)
        bias[0, list(kept.heads)] = NEG
        g_bias = b.weight(f"{wn}.retained_g_bias", bias)
    return RetainedColumns(sc, term, g_bias)
