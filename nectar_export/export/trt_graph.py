"""The decoder graph for TensorRT: each layer's context attention + local attention + merge is
one `NectarAttention` node (domain `nectar`), served by the TensorRT plugin in
kernels/trt_plugin.py, whose kernel is the Triton kernel of kernels/triton_nectar.py.

    NectarAttention(q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, D], kv_len [B] int32,
                    kv_start [B] int32, heads_w [Hkv, P_w], heads_b [Hkv, P_b] fp32)
        attributes: variant ("mlp" | "quadrature"), width (int), scale (float),
                    plugin_namespace "nectar", plugin_version "1" (for TensorRT's ONNX parser)
        -> o [B, Hq, T, D]

    NectarRetainedAttention(the seven inputs above, ret_k [R, c, D], ret_v [R, c, D], ret_heads [R] int32)
        attributes: those above and subset (int: 1 under a token budget)
        -> o [B, Hq, T, D]

k/v hold, in order, the template prefix's exact keys (a constant, a few tokens), the past local
tokens and this call's tokens; kv_len = S, kv_start = 0: TensorRT bundles run one sequence
(batch 1, no padding). A layer with retained heads (`nectar fit --retain-heads`) is one
NectarRetainedAttention node: the retained KV heads' stored document keys/values (int8 in the
artifact, decoded here to the graph's dtype) replace their networks (or, under a token budget,
join them by log-sum-exp), as in the ONNX bundle (kernels/retained.py). Sliding-window layers keep
the standard-op attention inside the engine (the kernel has no window). The packed weight layout is
kernels/weights.py's.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .attention_graph import StandardAttention
from .decoder_graph import DecoderGraphWriter

DOMAIN = "nectar"


class NectarAttentionOp:
    """attention_op for DecoderGraphWriter emitting one NectarAttention node per layer."""

    def __init__(self, heads, prefix_kv: list | None, retained: dict | None = None):
        """heads: NectarHeads (torch); prefix_kv: per layer (k, v) numpy [Hkv, c, D] or None;
        retained: layer -> context_parts.RetainedHeads, the layers served by NectarRetainedAttention."""
        self.heads, self.prefix_kv, self.retained = heads, prefix_kv, retained or {}
        self.fallback = StandardAttention()

    def __call__(self, wr: DecoderGraphWriter, i: int, q: str, k_parts: list[str], v_parts: list[str], masks: dict) -> str:
        from nectar_kernels.weights import pack_layer

        s, b = wr.s, wr.b
        if s.layer_windows[i]:
            return self.fallback(wr, i, q, k_parts, v_parts, masks)
        b.custom_domains[DOMAIN] = 1
        p, wn = f"/model/layers.{i}/attn", f"model.layers.{i}"
        qh = wr.to_dt(b.op("Reshape", [q, b.const([0, s.num_heads, -1, s.head_dim])], f"{p}/q_heads/Reshape"), f"{p}/q_heads/Cast")
        if self.prefix_kv is not None and self.prefix_kv[i] is not None:
            pk, pv = self.prefix_kv[i]
            k_parts = [_expanded(wr, f"{wn}.context.prefix.key", pk, f"{p}/prefix_key", wr.dt)] + k_parts
            v_parts = [_expanded(wr, f"{wn}.context.prefix.value", pv, f"{p}/prefix_value", wr.dt)] + v_parts
        k_all = b.op("Concat", k_parts, f"{p}/key_all/Concat", axis=2)
        v_all = b.op("Concat", v_parts, f"{p}/value_all/Concat", axis=2)
        shp = b.op("Shape", [k_all], f"{p}/key_all/Shape")
        s_len = b.op("Slice", [shp, b.const([2]), b.const([3]), b.const([0])], f"{p}/kv_len/Slice")
        bsz = b.op("Slice", [shp, b.const([0]), b.const([1]), b.const([0])], f"{p}/kv_batch/Slice")
        kv_len = b.op("Cast", [b.op("Expand", [s_len, bsz], f"{p}/kv_len/Expand")], f"{p}/kv_len/Cast", to=TensorProto.INT32)
        kv_start = b.op("Mul", [kv_len, b.const(0, np.int32)], f"{p}/kv_start/Mul")
        hw, hb, variant, width = pack_layer(self.heads, i)
        inputs = [qh, k_all, v_all, kv_len, kv_start,
                  b.weight(f"{wn}.nectar_heads.packed_w", hw.cpu().numpy().astype(np.float32)),
                  b.weight(f"{wn}.nectar_heads.packed_b", hb.cpu().numpy().astype(np.float32))]
        attrs = dict(domain=DOMAIN, variant=variant, width=int(width), scale=float(s.scale), plugin_namespace=DOMAIN,
                     plugin_version="1")
        kept = self.retained.get(i)
        op = "NectarAttention" if kept is None else "NectarRetainedAttention"
        if kept is not None:
            k, v = kept.k, kept.v
            if kept.k_scale is not None:  # int8 with one scale per token and head
                k, v = k.astype(np.float32) * kept.k_scale, v.astype(np.float32) * kept.v_scale
            inputs += [b.weight(f"{wn}.retained.key", np.ascontiguousarray(k, dtype=wr.dt)),  # [R, c, D]
                       b.weight(f"{wn}.retained.value", np.ascontiguousarray(v, dtype=wr.dt)),
                       b.weight(f"{wn}.retained.heads", np.asarray(kept.heads, np.int32))]  # [R]
            attrs["subset"] = int(kept.subset)
        o = b.op(op, inputs, f"{p}/{op}", **attrs)
        o = wr.f32(o, f"{p}/{op}/Cast")
        return b.op("Reshape", [o, b.const([0, s.num_kv_heads, -1, s.head_dim])], f"{p}/o_groups/Reshape")


def _expanded(wr: DecoderGraphWriter, name: str, array: np.ndarray, p: str, dtype=np.float32) -> str:
    """A constant [Hkv, a, b] broadcast to [B, Hkv, a, b] (a copy of a few KB per layer), so the
    template prefix can join the local keys in front of them."""
    b = wr.b
    w = b.weight(name, np.ascontiguousarray(array[None], dtype=dtype))
    shape = b.op("Concat", [wr.batch_dim(), b.const(list(array.shape))], f"{p}/shape/Concat", axis=0)
    return b.op("Expand", [w, shape], f"{p}/Expand")


def build_trt_proto(oa, dtype=np.float32):
    """The TensorRT-flavoured decoder graph of an opened artifact (method nectar)."""
    from .decoder_graph import DecoderGraphWriter
    from .from_model import decoder_weights, graph_spec, nectar_contexts_for_export

    model = oa.base.model
    contexts = nectar_contexts_for_export(model, oa.ctx, oa.heads, oa.retained)
    # the prefix joins the local KV inside the NectarAttention node, so layers served by the
    # plugin get it as (k, v) and their baked parts are dropped; fallback layers keep theirs
    prefix_kv = []
    for i, c in enumerate(contexts):
        pre = next((p for p in c.baked if p.name == "prefix"), None)
        prefix_kv.append(None if pre is None else (pre.k, pre.v))
    writer = DecoderGraphWriter(graph_spec(model, oa.ctx.n), decoder_weights(model), contexts, dtype,
                                attention_op=NectarAttentionOp(oa.heads, prefix_kv, {
                                    i: c.retained for i, c in enumerate(contexts) if c.retained is not None}))
    return writer.build("nectar_trt_decoder")

