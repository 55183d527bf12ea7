"""What stands for the document inside an exported graph, per layer: "context parts".

One small abstraction with three implementations (taken from a model + artifact in torch, handed
to the graph writer as numpy):

- `BakedKV`: exact keys/values stored as constants. Their scores join the local tokens' scores in
  one softmax. Used for the whole document (`--method full`), for the few template-prefix tokens
  in front of it (`--method nectar`), and for quadrature heads (learned nodes + a bias per node:
  a learned compact cache is attention over constants too).
- `MLPHeads`: a Nectar target + score network, standardization folded into the weights, merged
  with the exact part by log-sum-exp: w = σ(g(q) − lse_exact), o = w·f(q) + (1 − w)·o_exact.
- `RetainedHeads`: stored document keys/values (fp32, or int8 + scales) of a few KV heads of a layer
  with MLP heads; for those heads the attention's (o, lse) over them replaces (f, g) before the merge.

Shapes per layer: k/v `[Hkv, c, D]`, positions `[c]`, bias `[Hkv, 1, c]`; MLP weights are
stacked over KV heads `[Hkv, ...]` and applied to queries grouped as `[B, Hkv, G*T, D]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BakedKV:
    """Exact attention over constant keys/values. `positions` (absolute, for sliding-window
    layers) may be None when every query sees every baked key; `bias` is added to the scores."""

    name: str  # "document" | "prefix" | "nodes": part of the node/weight names
    k: np.ndarray  # [Hkv, c, D], post-RoPE
    v: np.ndarray  # [Hkv, c, D]
    positions: np.ndarray | None = None  # [c] int64
    bias: np.ndarray | None = None  # [Hkv, 1, c] fp32

    @property
    def length(self) -> int:
        return self.k.shape[1]


GELU_ONE = 0.8413447460685429  # gelu(1) = Φ(1), the constant unit's activation


@dataclass(frozen=True)
class MLPHeads:
    """A layer's MLP heads with standardization folded in, per KV head:

    z = q @ wa + ba           wa: [Hkv, D, (h + 1) + (hs + 1) + D]  ->  split (z_target, z_score, skip)
    f = gelu(gelu(z_target) @ w2) @ w3 + skip          w2: [Hkv, h + 1, h + 1],   w3: [Hkv, h + 1, D]
    g = gelu(gelu(z_score) @ w2_lse) @ w3_lse          w2_lse: [Hkv, hs + 1, hs + 1], w3_lse: [Hkv, hs + 1, 1]

    Each network's last hidden unit is constant (pre-activation 1, so gelu(1) after each layer): its
    weight rows carry the next layer's biases, so layers 2 and 3 need no bias add. Past the shared
    input matmul the two networks are separate matmuls (not one block-diagonal one): quantized bundles
    read no stored zeros, and keep the score network's middle and output weights fp32 (its error moves
    the merge weight σ(g − lse_loc) of every output dimension at once; quantize.py). Its first layer
    lies in `wa`, quantized with the target network's when `wa` is.
    """

    wa: np.ndarray
    ba: np.ndarray  # [Hkv, 1, (h + 1) + (hs + 1) + D]
    w2: np.ndarray
    w3: np.ndarray
    w2_lse: np.ndarray
    w3_lse: np.ndarray

    @property
    def hidden(self) -> int:
        return self.w2.shape[1]  # h + 1

    @property
    def hidden_lse(self) -> int:
        return self.w2_lse.shape[1]  # hs + 1


@dataclass(frozen=True)
class RetainedHeads:
    """Exact document keys/values for the KV heads `heads` (ascending) of a global layer."""

    heads: tuple[int, ...]
    k: np.ndarray  # [R, c, D], post-RoPE: float, or int8 with the scales below
    v: np.ndarray  # [R, c, D]
    k_scale: np.ndarray | None = None  # [R, c, 1] fp32 for int8 k (one scale per head and token)
    v_scale: np.ndarray | None = None
    # a token subset (retained.py, token budget): the head's network serves the other tokens, merged by
    # log-sum-exp with the kept tokens' exact attention
    subset: bool = False


@dataclass(frozen=True)
class LayerContext:
    """Everything standing for the document in one layer."""

    baked: tuple[BakedKV, ...] = ()
    heads: MLPHeads | None = None
    retained: RetainedHeads | None = None  # only beside `heads`


def fold_mlp_heads(group, sel: slice) -> MLPHeads:
    """Fold one layer's modules `sel` of an `MLPGroup` (torch) into an `MLPHeads` (fp64 math,
    stored fp32): x = (q − μ)/σ enters the first layers, o_std/o_mean and l_std/l_mean the last."""
    import torch

    def t(name):
        return getattr(group, name)[sel].detach().to(torch.float64).cpu().numpy()

    q_mean, q_std = t("q_mean"), t("q_std")  # [M, 1, D], [M, 1, 1]
    o_mean, o_std, l_mean, l_std = t("o_mean"), t("o_std"), t("l_mean"), t("l_std")  # [M,1,D],[M,1,1],[M,1],[M,1]
    w1, b1, w2, b2, w3, b3, skip = (t(n) for n in ("w1", "b1", "w2", "b2", "w3", "b3", "skip"))
    s1, sb1, s2, sb2, s3, sb3 = (t(n) for n in ("s1", "sb1", "s2", "sb2", "s3", "sb3"))
    m, d, _ = w1.shape

    def standardize_in(w, b):  # (q − μ)/σ @ w + b = q @ (w/σ) + (b − (μ/σ) @ w)
        return w / q_std, b - (q_mean / q_std) @ w

    w1f, b1f = standardize_in(w1, b1)
    s1f, sb1f = standardize_in(s1, sb1)
    skf, skb = standardize_in(skip, np.zeros((m, 1, d)))
    one_w, one_b = np.zeros((m, d, 1)), np.ones((m, 1, 1))  # the constant unit: pre-activation 1
    wa = np.concatenate([w1f, one_w, s1f, one_w, skf * o_std], axis=2)
    ba = np.concatenate([b1f, one_b, sb1f, one_b, skb * o_std], axis=2)

    def constant_unit_layer(w, b):  # [M, k, k'], [M, 1, k'] -> [M, k + 1, k' + 1]: bias row, unit kept at 1
        k, k2 = w.shape[1:]
        out = np.zeros((m, k + 1, k2 + 1))
        out[:, :k, :k2], out[:, k, :k2], out[:, k, k2] = w, b[:, 0] / GELU_ONE, 1.0 / GELU_ONE
        return out

    def output_layer(w, b):  # [M, k, n], [M, 1, n] -> [M, k + 1, n]: the bias as the constant unit's row
        return np.concatenate([w, b / GELU_ONE], axis=1)

    w2f, s2f = constant_unit_layer(w2, b2), constant_unit_layer(s2, sb2)
    w3f = output_layer(w3 * o_std, b3 * o_std + o_mean)
    s3f = output_layer(s3 * l_std[..., None], sb3 * l_std[..., None] + l_mean[..., None])
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return MLPHeads(f32(wa), f32(ba), f32(w2f), f32(w3f), f32(s2f), f32(s3f))


def quadrature_nodes(group, sel: slice) -> BakedKV:
    """One layer's quadrature modules as baked KV with a per-node score bias."""
    k = group.keys[sel].detach().float().cpu().numpy()
    v = group.values[sel].detach().float().cpu().numpy()
    bias = group.bias[sel].detach().float().cpu().numpy()  # [Hkv, 1, m]
    return BakedKV("nodes", k, v, None, bias)


def exact_kv(ctx_attention, name: str) -> BakedKV:
    """An `ExactContextAttention` (batch 1) of one layer as baked KV."""
    k = ctx_attention.k[0].detach().float().cpu().numpy()
    v = ctx_attention.v[0].detach().float().cpu().numpy()
    pos = ctx_attention.positions[0].detach().cpu().numpy().astype(np.int64)  # used by sliding-window layers only
    return BakedKV(name, k, v, pos)
