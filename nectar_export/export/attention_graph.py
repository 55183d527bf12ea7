"""The standard-op attention of one decoder layer (`StandardAttention`, the writer's default
`attention_op`): one softmax over the layer's separately scored baked parts, its past and new local
keys and, with Nectar MLP heads, their pseudo-key (`mlp_heads`); retained heads join it through
retained_graph.py. Node names under `/model/layers.{i}/attn/` (docs/onnx.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .context_parts import MLPHeads
from .graph_builder import GraphBuilder
from .retained_graph import retained_columns, retained_heads

if TYPE_CHECKING:
    from .decoder_graph import DecoderGraphWriter

LOCAL_PARTS = ("past", "new")  # the writer's k_parts / v_parts, and their mask keys


class StandardAttention:
    """Attention of one layer in standard ONNX ops, as ONE softmax over: the baked parts (the
    template prefix, a whole document, quadrature nodes), the past and the new local keys — each
    scored where it lies, so no key or value is ever copied — and, for Nectar MLP heads, one
    pseudo-key per query whose logit is g(q) and whose value is f(q). Its softmax weight is
    exactly the merge weight σ(g − lse_exact), so o = Σ p·V + p_g·f is the log-sum-exp merge, in
    one Softmax instead of lse/sigmoid algebra."""

    def __call__(self, wr: DecoderGraphWriter, i: int, q: str, k_parts: list[str], v_parts: list[str], masks: dict) -> str:
        s, b, ctx = wr.s, wr.b, wr.ctx[i]
        p, wn = f"/model/layers.{i}/attn", f"model.layers.{i}"
        window = s.layer_windows[i]
        qs = b.op("Mul", [q, b.const(s.scale, np.float32)], f"{p}/q_scale/Mul")
        scores, values, sizes = [], [], []
        for part in ctx.baked:  # constants [Hkv, ...]: the matmuls broadcast them over the batch
            pp, pw = f"{p}/context.{part.name}", f"{wn}.context.{part.name}"
            kt = b.weight(f"{pw}.key_t", np.ascontiguousarray(part.k.transpose(0, 2, 1), dtype=np.float32))  # [Hkv, D, c]
            sc = b.op("MatMul", [qs, kt], f"{pp}/scores/MatMul")  # [B, Hkv, G*T, c]
            if part.bias is not None:
                sc = b.op("Add", [sc, b.weight(f"{pw}.bias", part.bias.astype(np.float32))], f"{pp}/bias/Add")
            if part.positions is not None and window:
                sc = b.op("Add", [sc, masks[(part.name, window)]], f"{pp}/mask/Add")
            elif part.name == "nodes" and window:  # quadrature heads in a sliding-window layer
                sc = b.op("Add", [sc, masks[("heads", window)]], f"{pp}/window/Add")
            scores.append(sc)
            values.append(b.weight(f"{pw}.value", part.v.astype(np.float32)))  # [Hkv, c, D]
            sizes.append(part.length)
        # The local keys stay in their two inputs (the past buffer, this call's tokens): a Concat
        # would copy the whole past buffer at every decode step.
        for kind, k, v in zip(LOCAL_PARTS, k_parts, v_parts):
            kt = b.op("Transpose", [wr.f32(k, f"{p}/{kind}/key/Cast")], f"{p}/{kind}/key/Transpose", perm=[0, 1, 3, 2])
            sc = b.op("MatMul", [qs, kt], f"{p}/{kind}/scores/MatMul")  # [B, Hkv, G*T, P or T]
            scores.append(b.op("Add", [sc, masks[(kind, window)]], f"{p}/{kind}/mask/Add"))
            values.append(wr.f32(v, f"{p}/{kind}/value/Cast"))
            sizes.append(kind)  # dynamic: P or T
        f = None
        if ctx.heads is not None:
            f, g = mlp_heads(b, f"{p}/nectar_heads", f"{wn}.nectar_heads", q, ctx.heads, wr.gelu_erf)
            if ctx.retained is not None and wr.fused and ctx.retained.k_scale is not None:
                cols = retained_columns(b, f"{p}/retained", f"{wn}.retained", q, ctx.retained, s.num_kv_heads, s.scale)
                scores.append(cols.scores)
                values.append(cols.term)
                sizes.append(ctx.retained.k.shape[1])
                if cols.g_bias is not None:
                    g = b.op("Add", [g, cols.g_bias], f"{p}/retained/g/Add")
            elif ctx.retained is not None:
                f, g = retained_heads(b, f"{p}/retained", f"{wn}.retained", qs, ctx.retained, f, g, s.num_kv_heads)
            if window:  # past the window the document is not seen: the pseudo-key gets no weight
                g = b.op("Add", [g, masks[("heads", window)]], f"{p}/nectar_heads/window/Add")
            scores.append(g)  # the pseudo-key's logit: g(q) ≈ lse_ctx(q)
            sizes.append(1)
        allsc = b.op("Concat", scores, f"{p}/scores/Concat", axis=-1)
        probs = b.op("Softmax", [allsc], f"{p}/Softmax", axis=-1)
        parts = b.op("Split", [probs, wr.split_sizes(sizes)], f"{p}/probs/Split", outputs=len(sizes), axis=-1)
        o = None
        for j, (pr, val) in enumerate(zip(parts, values)):
            term = val(pr) if callable(val) else b.op("MatMul", [pr, val], f"{p}/pv.{j}/MatMul")
            o = term if o is None else b.op("Add", [o, term], f"{p}/pv.{j}/Add")
        if f is not None:
            o = b.op("Add", [o, b.op("Mul", [parts[-1], f], f"{p}/merge/Mul")], f"{p}/merge/Add")  # + p_g · f(q)
        return o


def mlp_heads(b: GraphBuilder, p: str, wn: str, q: str, heads: MLPHeads, gelu) -> tuple[str, str]:
    """q [B, Hkv, G*T, D] -> f [B, Hkv, G*T, D], g [B, Hkv, G*T, 1]: one input matmul shared by the
    target and score networks (and the linear skip), then each network's two matmuls."""
    d = heads.w3.shape[-1]
    z = b.op("Add", [b.op("MatMul", [q, b.weight(f"{wn}.wa", heads.wa)], f"{p}/in/MatMul"), b.weight(f"{wn}.ba", heads.ba)], f"{p}/in/Add")
    zt, zs, skip = b.op("Split", [z, b.const([heads.hidden, heads.hidden_lse, d])], f"{p}/in/Split", outputs=3, axis=-1)
    a = gelu(b.op("MatMul", [gelu(zt, f"{p}/act1"), b.weight(f"{wn}.w2", heads.w2)], f"{p}/mid/MatMul"), f"{p}/act2")
    f = b.op("MatMul", [a, b.weight(f"{wn}.w3", heads.w3)], f"{p}/out/MatMul")
    # The score network past the shared input matmul: quantized bundles keep it fp32 (quantize.py), as
    # its error moves the merge weight σ(g − lse_loc) of every output dimension at once.
    s = gelu(b.op("MatMul", [gelu(zs, f"{p}/lse_act1"), b.weight(f"{wn}.w2_lse", heads.w2_lse)], f"{p}/lse_mid/MatMul"),
             f"{p}/lse_act2")
    g = b.op("MatMul", [s, b.weight(f"{wn}.w3_lse", heads.w3_lse)], f"{p}/lse/MatMul")
    return b.op("Add", [f, skip], f"{p}/skip/Add"), g
