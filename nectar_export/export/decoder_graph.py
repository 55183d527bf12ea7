"""The decoder as one ONNX graph (standard ops, opset 17; the `ort_fused` form adds two ONNX Runtime
contrib ops), with the document baked in as per-layer context parts (context_parts.py) — exact KV,
or Nectar heads, never both.

Graph interface (B batch, T new tokens, P past slots, S = P + T):

    inputs   input_ids             [B, T] int64
             position_ids          [B, T] int64   absolute; the first local token sits at n (the
                                                  context length); padding rows may hold anything
             attention_mask        [B, S] int64   1 = a real token in that past slot / new token
             past_key_values.{i}.key|value [B, Hkv, P, D]  local tokens only, post-RoPE
    outputs  logits                [B, 1, V] fp32 the last position's
             present.{i}.key|value [B, Hkv, T, D]  this call's tokens only: the runtime writes
                                                  them into its pre-allocated past buffers

The past buffer may hold empty slots (mask 0) anywhere: key positions are rebuilt from the mask
(n + cumsum − 1), so a fixed-capacity buffer is passed as is, no per-token reshaping or copying;
the graph scores it where it lies (no Concat with the new tokens).
One graph serves prefill (T > 1) and decode (T = 1).

Node names: `/model/embed/*`, `/model/masks/*`, `/model/rope/*`, `/model/rope.{r}/*`,
`/model/layers.{i}/{input_norm,attn,post_attn_norm,pre_ff_norm,mlp}/*` (attention: `qkv_proj`,
`qk_rope`, `scores`, `context.{part}`, `nectar_heads`, `merge`, `o_proj`; ort_fused: `qk_rope/RotaryEmbedding`,
`{input_norm,pre_ff_norm}/SkipSimplifiedLayerNormalization`), `/model/final_norm/*`, `/model/lm_head/MatMul`; weights
`model.layers.{i}.attn.qkv_proj.weight` etc. (see docs/onnx.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .attention_graph import StandardAttention
from .context_parts import BakedKV, LayerContext
from .graph_builder import NEG, GraphBuilder, onnx_dtype


@dataclass(frozen=True)
class GraphSpec:
    """Shapes and family flags the graph needs (a subset of nectar_models' ModelConfig)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    scale: float
    layer_windows: tuple[int, ...]
    layer_rope: tuple[int, ...]  # index into `inv_freqs` per layer
    inv_freqs: tuple[np.ndarray, ...]  # [D/2] fp32 per RoPE table
    context_len: int  # n: position of the first local token
    qk_norm: bool
    sandwich_norms: bool
    embed_scale: float | None
    activation: str  # "silu" | "gelu_tanh"
    attention_bias: bool

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LayerWeights:
    """One layer, matmul weights as [in, out] (x @ W), norms with any offset folded in."""

    input_norm: np.ndarray
    qkv: np.ndarray  # [hidden, (Hq + 2 Hkv) D]
    qkv_bias: np.ndarray | None
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    o_proj: np.ndarray  # [Hq D, hidden]
    post_attn_norm: np.ndarray
    pre_ff_norm: np.ndarray | None  # sandwich (Gemma): pre/post feed-forward norms
    post_ff_norm: np.ndarray | None
    gate_up: np.ndarray  # [hidden, 2 I]
    down: np.ndarray  # [I, hidden]


@dataclass
class DecoderWeights:
    embed_t: np.ndarray  # [hidden, V]: the tied embedding, transposed (lookup = Gather axis 1)
    lm_head: np.ndarray | None  # [hidden, V] when not tied
    final_norm: np.ndarray
    layers: list[LayerWeights]


class DecoderGraphWriter:
    """Writes the decoder into a GraphBuilder. `attention_op` (optional) replaces the standard-op
    attention of each layer (e.g. by one custom `NectarAttention` node for TensorRT); it is called
    as op(writer, layer, q [B, Hkv, G*T, D] fp32, [past_k, new_k], [past_v, new_v], masks) -> o:
    the local keys/values [B, Hkv, P, D] and [B, Hkv, T, D] in their two pieces (masks: `masks`).

    `ort_fused`: write RoPE as `com.microsoft.RotaryEmbedding` and each residual Add + RMSNorm as
    `com.microsoft.SkipSimplifiedLayerNormalization` (fp32 only) — ONNX Runtime's contrib ops, for
    bundles that are ORT-only anyway (quantized: MatMulNBits). On a 2-core CPU per-node cost is a
    good part of a decode step (about 2–3 µs per node removed, docs/benchmarks.md), and these take 5
    nodes per layer off."""

    def __init__(self, spec: GraphSpec, weights: DecoderWeights, contexts: list[LayerContext],
                 dtype=np.float32, attention_op=None, ort_fused: bool = False):
        self.s, self.w, self.ctx, self.dt = spec, weights, contexts, np.dtype(dtype)
        if ort_fused and self.dt != np.float32:
            raise ValueError("ort_fused graphs are fp32 (the quantized bundles')")
        self.fused = ort_fused
        self.b = GraphBuilder()
        if ort_fused:
            self.b.custom_domains["com.microsoft"] = 1
        self.attention_op = attention_op or StandardAttention()
        self._cache: dict = {}

    # ----------------------------------------------------------------- small helpers
    def f32(self, x: str, name: str) -> str:
        return x if self.dt == np.float32 else self.b.op("Cast", [x], name, to=TensorProto.FLOAT)

    def to_dt(self, x: str, name: str) -> str:
        return x if self.dt == np.float32 else self.b.op("Cast", [x], name, to=onnx_dtype(self.dt))

    def rms_norm(self, x: str, w: np.ndarray, prefix: str, wname: str) -> str:
        """Pow → ReduceMean → Add → Sqrt → Div → Mul: the pattern ORT fuses into one kernel."""
        b = self.b
        xf = self.f32(x, f"{prefix}/Cast_in")
        sq = b.op("Pow", [xf, b.const(2.0, np.float32)], f"{prefix}/Pow")
        ms = b.op("ReduceMean", [sq], f"{prefix}/ReduceMean", axes=[-1], keepdims=1)
        rs = b.op("Sqrt", [b.op("Add", [ms, b.const(self.s.rms_eps, np.float32)], f"{prefix}/Add")], f"{prefix}/Sqrt")
        y = b.op("Mul", [b.op("Div", [xf, rs], f"{prefix}/Div"), b.weight(wname, w.astype(np.float32))], f"{prefix}/Mul")
        return self.to_dt(y, f"{prefix}/Cast_out")

    def residual_norm(self, x: str, delta: str | None, w: np.ndarray, prefix: str, wname: str, add_name: str) -> tuple[str, str]:
        """(rms_norm(x + delta), x + delta); delta None: (rms_norm(x), x). Fused: one
        SkipSimplifiedLayerNormalization `{prefix}/SkipSimplifiedLayerNormalization` (output 3 is
        the sum); else the Add `add_name` and rms_norm."""
        b = self.b
        if delta is None:
            return self.rms_norm(x, w, prefix, wname), x
        if not self.fused:
            x = b.op("Add", [x, delta], add_name)
            return self.rms_norm(x, w, prefix, wname), x
        y, _, _, total = b.op("SkipSimplifiedLayerNormalization", [x, delta, b.weight(wname, w.astype(np.float32))],
                              f"{prefix}/SkipSimplifiedLayerNormalization", outputs=[True, False, False, True],
                              domain="com.microsoft", epsilon=float(self.s.rms_eps))
        return y, total

    def matmul(self, x: str, w: np.ndarray, prefix: str, wname: str) -> str:
        return self.b.op("MatMul", [x, self.b.weight(wname, w.astype(self.dt))], f"{prefix}/MatMul")

    def gelu_erf(self, x: str, prefix: str) -> str:
        """x/2 (1 + erf(x/√2)): the exact GELU, as ORT's Gelu fusion expects it."""
        b = self.b
        e = b.op("Erf", [b.op("Div", [x, b.const(np.sqrt(2.0), np.float32)], f"{prefix}/Div")], f"{prefix}/Erf")
        half = b.op("Mul", [x, b.const(0.5, np.float32)], f"{prefix}/Mul_half")
        return b.op("Mul", [half, b.op("Add", [e, b.const(1.0, np.float32)], f"{prefix}/Add")], f"{prefix}/Mul")

    def activation(self, x: str, prefix: str) -> str:
        b = self.b
        if self.s.activation == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x], f"{prefix}/Sigmoid")], f"{prefix}/Mul")
        # tanh GELU: x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))
        c = lambda v: b.const(v, self.dt)  # noqa: E731
        x3 = b.op("Mul", [b.op("Mul", [x, x], f"{prefix}/Mul_sq"), x], f"{prefix}/Mul_cube")
        inner = b.op("Add", [x, b.op("Mul", [x3, c(0.044715)], f"{prefix}/Mul_c")], f"{prefix}/Add_inner")
        th = b.op("Tanh", [b.op("Mul", [inner, c(np.sqrt(2 / np.pi))], f"{prefix}/Mul_k")], f"{prefix}/Tanh")
        half = b.op("Mul", [x, c(0.5)], f"{prefix}/Mul_half")
        return b.op("Mul", [half, b.op("Add", [th, c(1.0)], f"{prefix}/Add_one")], f"{prefix}/Mul")

    # ----------------------------------------------------------------- graph parts
    def inputs(self) -> dict:
        b, s = self.b, self.s
        kv = onnx_dtype(self.dt)
        io = {
            "ids": b.input("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            "pos": b.input("position_ids", TensorProto.INT64, ["batch", "tokens"]),
            "mask": b.input("attention_mask", TensorProto.INT64, ["batch", "past_plus_tokens"]),
            "past": [],
        }
        for i in range(s.num_layers):
            io["past"].append(tuple(
                b.input(f"past_key_values.{i}.{kind}", kv, ["batch", s.num_kv_heads, "past", s.head_dim])
                for kind in ("key", "value")
            ))
        return io

    def masks(self, mask: str, pos: str) -> dict:
        """Additive score masks, computed once per call and shared by the layers:

        ("past", w), ("new", w): [B, 1, G*T, P] and [B, 1, G*T, T] over the past slots and this
        call's tokens, for window w (0 = global);
        (part, w): [B, 1, G*T, c] for a baked part with positions in a sliding-window layer (the
        template prefix, a whole document under --method full);
        ("heads", w): [B, 1, G*T, 1] for Nectar heads (MLP pseudo-key or quadrature nodes) in a
        sliding-window layer: queries at or past context_len − 1 + w see no document key, so the
        heads get no weight there (heads.NectarContext does the same in torch).
        """
        b, s = self.b, self.s
        p = "/model/masks"
        kpos = b.op("Add", [b.op("CumSum", [mask, b.const(1)], f"{p}/CumSum"), b.const(s.context_len - 1)], f"{p}/key_positions")
        qpos = b.op("Unsqueeze", [pos, b.const([-1])], f"{p}/query_positions")  # [B, T, 1]
        diff = b.op("Sub", [qpos, b.op("Unsqueeze", [kpos, b.const([1])], f"{p}/Unsqueeze_k")], f"{p}/distance")  # [B,T,S]
        real = b.op("Equal", [b.op("Unsqueeze", [mask, b.const([1])], f"{p}/Unsqueeze_m"), b.const(1)], f"{p}/real_key")
        causal = b.op("And", [real, b.op("GreaterOrEqual", [diff, b.const(0)], f"{p}/causal")], f"{p}/visible")
        out = {}
        for window in sorted(set(s.layer_windows)):
            vis = causal
            if window:
                vis = b.op("And", [causal, b.op("Less", [diff, b.const(window)], f"{p}/w{window}/Less")], f"{p}/w{window}/And")
            local = self._bias_from(vis, f"{p}/local_w{window}")  # [B, 1, G*T, S]
            out[("past", window)], out[("new", window)] = b.op(
                "Split", [local, self.split_sizes(["past", "new"])], f"{p}/local_w{window}/Split", outputs=2, axis=-1)
        for w in sorted({w for w, c in zip(s.layer_windows, self.ctx) if w and _has_heads(c)}):
            bound = b.const(s.context_len - 1 + w)
            out[("heads", w)] = self._bias_from(b.op("Less", [qpos, bound], f"{p}/heads_w{w}/Less"), f"{p}/heads_w{w}")
        for li, c in enumerate(self.ctx):
            for part in c.baked:
                if part.positions is None or not s.layer_windows[li]:
                    continue
                key = (part.name, s.layer_windows[li])
                if key in out:
                    continue
                d = b.op("Sub", [qpos, self.positions_init(part)], f"{p}/{part.name}_w{key[1]}/distance")
                vis = b.op("Less", [d, b.const(key[1])], f"{p}/{part.name}_w{key[1]}/Less")
                out[key] = self._bias_from(vis, f"{p}/{part.name}_w{key[1]}")
        return out

    def split_sizes(self, sizes: list[int | str]) -> str:
        """The sizes input of a Split over a layer's score columns: ints for baked parts, retained
        keys and the heads' pseudo-key, "past" (P = S − T) and "new" (T) for the local keys, known
        only per call. Computed once per distinct layout and shared."""
        b = self.b
        key = ("split", tuple(sizes))
        if key not in self._cache:
            p = f"/model/split_sizes.{len(self._cache)}"
            t_len = b.op("Slice", [self.shape_bt(), b.const([1]), b.const([2]), b.const([0])], f"{p}/new/Slice")
            if "past" in sizes:
                s_len = b.op("Slice", [b.op("Shape", ["attention_mask"], f"{p}/Shape"), b.const([1]), b.const([2]), b.const([0])],
                             f"{p}/Slice")
                p_len = b.op("Sub", [s_len, t_len], f"{p}/past/Sub")
            dyn = {"past": p_len if "past" in sizes else None, "new": t_len}
            parts = [dyn[x] if isinstance(x, str) else b.const([x]) for x in sizes]
            self._cache[key] = b.op("Concat", parts, f"{p}/Concat", axis=0)
        return self._cache[key]

    def positions_init(self, part: BakedKV) -> str:
        name = f"model.context.{part.name}.positions"
        return name if self.b.has(name) else self.b.weight(name, part.positions.astype(np.int64))

    def shape_bt(self) -> str:
        """[B, T] of this call, computed once."""
        if not self.b.has("/model/shape_bt/Shape/output_0"):
            self.b.op("Shape", ["input_ids"], "/model/shape_bt/Shape")
        return "/model/shape_bt/Shape/output_0"

    def batch_dim(self) -> str:
        """[B] of this call, computed once."""
        if not self.b.has("/model/batch/Slice/output_0"):
            self.b.op("Slice", [self.shape_bt(), self.b.const([0]), self.b.const([1]), self.b.const([0])], "/model/batch/Slice")
        return "/model/batch/Slice/output_0"

    def _bias_from(self, vis: str, p: str) -> str:
        """bool [B, T, K] -> fp32 additive bias [B, 1, G*T, K] (0 visible, NEG hidden)."""
        b = self.b
        bias = b.op("Where", [vis, b.const(0.0, np.float32), b.const(NEG, np.float32)], f"{p}/Where")
        bias = b.op("Unsqueeze", [bias, b.const([1])], f"{p}/Unsqueeze")  # [B, 1, T, K]
        return b.op("Tile", [bias, b.const([1, 1, self.s.group, 1])], f"{p}/Tile")  # rows g*T + t

    def rope_tables(self, pos: str) -> list[tuple[str, ...]]:
        """Per RoPE table: cos, sin [B, 1, T, D] fp32 (NeoX layout: halves duplicated). Fused:
        cos, sin [B*T, D/2] — RotaryEmbedding's cache holding just this call's B*T positions — and
        the cache rows [B, T] (0 … B*T−1) that the op looks up; the same fp32 angles either way."""
        b = self.b
        posf = b.op("Cast", [b.op("Unsqueeze", [pos, b.const([-1])], "/model/rope/Unsqueeze")], "/model/rope/Cast", to=TensorProto.FLOAT)
        rows = None
        if self.fused:
            count = b.op("ReduceProd", [self.shape_bt()], "/model/rope/rows/ReduceProd", keepdims=0)
            rows = b.op("Reshape", [b.op("Range", [b.const(0), count, b.const(1)], "/model/rope/rows/Range"), self.shape_bt()],
                        "/model/rope/rows/Reshape")
        out = []
        for r, inv in enumerate(self.s.inv_freqs):
            p = f"/model/rope.{r}"
            ang = b.op("Mul", [posf, b.weight(f"model.rope.{r}.inv_freq", inv.astype(np.float32))], f"{p}/Mul")  # [B,T,D/2]
            if self.fused:
                ang = b.op("Reshape", [ang, b.const([-1, len(inv)])], f"{p}/Reshape")
                out.append((b.op("Cos", [ang], f"{p}/Cos"), b.op("Sin", [ang], f"{p}/Sin"), rows))
                continue
            ang = b.op("Unsqueeze", [b.op("Concat", [ang, ang], f"{p}/Concat", axis=-1), b.const([1])], f"{p}/Unsqueeze")
            out.append((b.op("Cos", [ang], f"{p}/Cos"), b.op("Sin", [ang], f"{p}/Sin")))
        return out

    def rotate_half(self, d: int) -> str:
        """R [D, D] with x @ R = concat(−x[D/2:], x[:D/2]): products by ±1 and 0, so exact."""
        r = np.zeros((d, d), np.float32)
        h = d // 2
        r[np.arange(h) + h, np.arange(h)] = -1.0
        r[np.arange(h), np.arange(h) + h] = 1.0
        name = f"model.rope.rotate_half_{d}"
        return name if self.b.has(name) else self.b.weight(name, r)

    def embed(self, ids: str) -> str:
        b, p = self.b, "/model/embed"
        # The embedding is stored once, transposed [hidden, V], and shared with the tied LM head.
        e = b.op("Gather", [b.weight("model.embed_tokens.weight_t", self.w.embed_t.astype(self.dt)), ids], f"{p}/Gather", axis=1)
        x = b.op("Transpose", [e], f"{p}/Transpose", perm=[1, 2, 0])  # [H, B, T] -> [B, T, H]
        if self.s.embed_scale:
            x = b.op("Mul", [x, b.const(self.s.embed_scale, self.dt)], f"{p}/Mul_scale")
        return x

    def layer(self, i: int, x: str, delta: str | None, io: dict, masks: dict, ropes: list, presents: list) -> tuple[str, str]:
        """One decoder layer on the residual stream x + delta (delta None for the first layer:
        the residual Adds are deferred so that each can fuse with the norm after it); returns
        (x, delta) for the next layer."""
        s, w, b = self.s, self.w.layers[i], self.b
        p, wn = f"/model/layers.{i}", f"model.layers.{i}"
        add_name = f"/model/layers.{i - 1}/mlp_residual/Add"
        h, x = self.residual_norm(x, delta, w.input_norm, f"{p}/input_norm", f"{wn}.input_norm.weight", add_name)
        q, k, v = self.qkv(i, h, ropes[s.layer_rope[i]])
        pk, pv = io["past"][i]
        presents.append((k, v))
        o = self.attention_op(self, i, q, [pk, k], [pv, v], masks)  # [B, Hkv, G*T, D] fp32
        o = self.to_dt(o, f"{p}/attn/Cast_o")
        o = b.op("Reshape", [o, b.const([0, s.num_heads, -1, s.head_dim])], f"{p}/attn/o_heads/Reshape")  # [B,Hq,T,D]
        o = b.op("Transpose", [o], f"{p}/attn/o_heads/Transpose", perm=[0, 2, 1, 3])
        o = b.op("Reshape", [o, b.const([0, 0, -1])], f"{p}/attn/o_flat/Reshape")
        a = self.matmul(o, w.o_proj, f"{p}/attn/o_proj", f"{wn}.attn.o_proj.weight")
        if s.sandwich_norms:
            a = self.rms_norm(a, w.post_attn_norm, f"{p}/post_attn_norm", f"{wn}.post_attn_norm.weight")
        pre = w.pre_ff_norm if s.sandwich_norms else w.post_attn_norm
        h, x = self.residual_norm(x, a, pre, f"{p}/pre_ff_norm", f"{wn}.pre_ff_norm.weight", f"{p}/attn_residual/Add")
        gu = self.matmul(h, w.gate_up, f"{p}/mlp/gate_up_proj", f"{wn}.mlp.gate_up_proj.weight")
        gate, up = b.op("Split", [gu, b.const([w.down.shape[0]] * 2)], f"{p}/mlp/Split", outputs=2, axis=-1)
        m = b.op("Mul", [self.activation(gate, f"{p}/mlp/act"), up], f"{p}/mlp/Mul")
        m = self.matmul(m, w.down, f"{p}/mlp/down_proj", f"{wn}.mlp.down_proj.weight")
        if s.sandwich_norms:
            m = self.rms_norm(m, w.post_ff_norm, f"{p}/post_ff_norm", f"{wn}.post_ff_norm.weight")
        return x, m

    def qkv(self, i: int, h: str, rope: tuple[str, ...]) -> tuple[str, str, str]:
        """-> q [B, Hkv, G*T, D] fp32 (post-RoPE, unscaled), k, v [B, Hkv, T, D] (kv dtype)."""
        s, w, b = self.s, self.w.layers[i], self.b
        p, wn = f"/model/layers.{i}/attn", f"model.layers.{i}"
        hq, hkv, d = s.num_heads, s.num_kv_heads, s.head_dim
        y = self.matmul(h, w.qkv, f"{p}/qkv_proj", f"{wn}.attn.qkv_proj.weight")
        if w.qkv_bias is not None:
            y = b.op("Add", [y, b.weight(f"{wn}.attn.qkv_proj.bias", w.qkv_bias.astype(self.dt))], f"{p}/qkv_proj/Add")
        y = b.op("Reshape", [y, b.const([0, 0, hq + 2 * hkv, d])], f"{p}/qkv_heads/Reshape")
        y = b.op("Transpose", [y], f"{p}/qkv_heads/Transpose", perm=[0, 2, 1, 3])  # [B, Hq+2Hkv, T, D]
        qk, v = b.op("Split", [y, b.const([hq + hkv, hkv])], f"{p}/qk_v/Split", outputs=2, axis=1)
        qk = self.f32(qk, f"{p}/qk/Cast")
        if s.qk_norm:
            q_, k_ = b.op("Split", [qk, b.const([hq, hkv])], f"{p}/qk_norm/Split", outputs=2, axis=1)
            q_ = self.rms_norm(q_, w.q_norm, f"{p}/q_norm", f"{wn}.attn.q_norm.weight")
            k_ = self.rms_norm(k_, w.k_norm, f"{p}/k_norm", f"{wn}.attn.k_norm.weight")
            qk = b.op("Concat", [q_, k_], f"{p}/qk_norm/Concat", axis=1)
            qk = self.f32(qk, f"{p}/qk_norm/Cast")
        if self.fused:
            cos, sin, rows = rope
            qk = b.op("RotaryEmbedding", [qk, rows, cos, sin], f"{p}/qk_rope/RotaryEmbedding", domain="com.microsoft",
                      interleaved=0)
        else:
            cos, sin = rope
            rot = b.op("MatMul", [qk, self.rotate_half(d)], f"{p}/qk_rope/rotate_half/MatMul")  # [-x2, x1], exactly
            qk = b.op("Add", [b.op("Mul", [qk, cos], f"{p}/qk_rope/Mul_cos"), b.op("Mul", [rot, sin], f"{p}/qk_rope/Mul_sin")],
                      f"{p}/qk_rope/Add")
        q, k = b.op("Split", [qk, b.const([hq, hkv])], f"{p}/q_k/Split", outputs=2, axis=1)
        q = b.op("Reshape", [q, b.const([0, hkv, -1, d])], f"{p}/q_groups/Reshape")  # [B, Hkv, G*T, D]
        return q, self.to_dt(k, f"{p}/k/Cast"), v

    def build(self, graph_name: str = "nectar_decoder"):
        s, b = self.s, self.b
        io = self.inputs()
        masks = self.masks(io["mask"], io["pos"])
        ropes = self.rope_tables(io["pos"])
        x = self.embed(io["ids"])
        presents: list = []
        delta = None
        for i in range(s.num_layers):
            x, delta = self.layer(i, x, delta, io, masks, ropes, presents)
        x = b.op("Add", [x, delta], f"/model/layers.{s.num_layers - 1}/mlp_residual/Add")
        last = b.op("Slice", [x, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([1])], "/model/last_token/Slice")
        h = self.rms_norm(last, self.w.final_norm, "/model/final_norm", "model.norm.weight")
        if self.w.lm_head is None:
            logits = b.op("MatMul", [h, "model.embed_tokens.weight_t"], "/model/lm_head/MatMul")
        else:
            logits = self.matmul(h, self.w.lm_head, "/model/lm_head", "model.lm_head.weight")
        logits = b.op("Cast", [logits], "/model/logits/Cast", to=TensorProto.FLOAT) if self.dt != np.float32 else logits
        b.output(b.rename(logits, "logits"), TensorProto.FLOAT, ["batch", 1, s.vocab_size])
        kv = onnx_dtype(self.dt)
        for i, (k, v) in enumerate(presents):
            for kind, t in (("key", k), ("value", v)):
                b.output(b.rename(t, f"present.{i}.{kind}"), kv, ["batch", s.num_kv_heads, "tokens", s.head_dim])
        return b.model(graph_name)


def _has_heads(ctx) -> bool:
    """Whether a layer's context holds Nectar heads (an MLP pseudo-key or quadrature nodes)."""
    return ctx.heads is not None or any(part.name == "nodes" for part in ctx.baked)
