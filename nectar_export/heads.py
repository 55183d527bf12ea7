"""Nectar heads: for every (layer, KV head) a target network f(q) ≈ o_ctx(q) and a score network
g(q) ≈ lse_ctx(q), shared by the G query heads of the group.

All modules are evaluated together: modules of equal width form a group whose weights are
stacked `[M_g, ...]` and applied with one batched matmul per weight (never a loop over heads).

Variants:
- `mlp`: f = Linear(h→D)∘GELU∘Linear(h→h)∘GELU∘Linear(D→h) plus a linear skip D→D;
  g = a narrower MLP D→h/4→1. Inputs/outputs are standardized with per-module statistics.
- `quadrature`: m learned nodes (key, value, bias) per module; softmax attention over them gives
  both o and lse — a learned compact cache, initialized from the document's own keys/values.

Shapes: module inputs `x: [M, N, D]` (N queries), outputs `o: [M, N, D]`, `lse: [M, N]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nectar_kernels.weights import score_width

from .config import VARIANTS


@dataclass(frozen=True)
class HeadsSpec:
    """What to build: `widths[l]` is layer l's hidden width (mlp) or node count (quadrature)."""

    variant: str
    num_layers: int
    kv_heads: int
    head_dim: int
    widths: tuple[int, ...]
    scale: float  # the model's attention scale (quadrature scores use it)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if len(self.widths) != self.num_layers or min(self.widths) < 1:
            raise ValueError("widths: one positive width per layer")

    def params_per_module(self, width: int) -> int:
        return GROUPS[self.variant].params_per_module(width, self.head_dim)

    def total_params(self) -> int:
        return sum(self.params_per_module(w) for w in self.widths) * self.kv_heads


def _stacked(m: int, fan_in: int, fan_out: int) -> nn.Parameter:
    w = torch.empty(m, fan_in, fan_out)
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(w, -bound, bound)
    return nn.Parameter(w)


class MLPGroup(nn.Module):
    """M modules of one width: standardized q -> (o, lse)."""

    def __init__(self, m: int, d: int, h: int):
        super().__init__()
        hs = score_width(h)
        self.w1, self.b1 = _stacked(m, d, h), nn.Parameter(torch.zeros(m, 1, h))
        self.w2, self.b2 = _stacked(m, h, h), nn.Parameter(torch.zeros(m, 1, h))
        self.w3, self.b3 = nn.Parameter(torch.zeros(m, h, d)), nn.Parameter(torch.zeros(m, 1, d))
        self.skip = _stacked(m, d, d)
        self.s1, self.sb1 = _stacked(m, d, hs), nn.Parameter(torch.zeros(m, 1, hs))
        self.s2, self.sb2 = _stacked(m, hs, hs), nn.Parameter(torch.zeros(m, 1, hs))
        self.s3, self.sb3 = nn.Parameter(torch.zeros(m, hs, 1)), nn.Parameter(torch.zeros(m, 1, 1))
        # standardization: x = (q - q_mean) / q_std; o = o_std * f + o_mean; lse = l_std * g + l_mean
        for name, shape in (("q_mean", (m, 1, d)), ("q_std", (m, 1, 1)), ("o_mean", (m, 1, d)),
                            ("o_std", (m, 1, 1)), ("l_mean", (m, 1)), ("l_std", (m, 1))):
            self.register_buffer(name, torch.zeros(shape) if "mean" in name else torch.ones(shape))

    @classmethod
    def from_spec(cls, m: int, width: int, spec: HeadsSpec) -> MLPGroup:
        """`m` modules of hidden width `width` for `spec`."""
        return cls(m, spec.head_dim, width)

    @staticmethod
    def params_per_module(width: int, d: int) -> int:
        """Parameters and standardization statistics of one module of hidden width `width`, head dim `d`."""
        hs = score_width(width)
        target = d * width + width + width * width + width + width * d + d + d * d
        score = d * hs + hs + hs * hs + hs + hs + 1
        return target + score + 2 * d + 4  # + standardization statistics

    def forward(self, q: torch.Tensor, sel: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [M', N, D] for the modules `sel` of this group -> (o: [M', N, D], lse: [M', N])."""
        x = (q - self.q_mean[sel]) / self.q_std[sel]
        h = F.gelu(torch.baddbmm(self.b1[sel], x, self.w1[sel]))
        h = F.gelu(torch.baddbmm(self.b2[sel], h, self.w2[sel]))
        f = torch.baddbmm(self.b3[sel], h, self.w3[sel]) + torch.bmm(x, self.skip[sel])
        s = F.gelu(torch.baddbmm(self.sb1[sel], x, self.s1[sel]))
        s = F.gelu(torch.baddbmm(self.sb2[sel], s, self.s2[sel]))
        g = torch.baddbmm(self.sb3[sel], s, self.s3[sel])[..., 0]
        return f * self.o_std[sel] + self.o_mean[sel], g * self.l_std[sel] + self.l_mean[sel]


class QuadratureGroup(nn.Module):
    """M modules of m nodes each: o = softmax(q·K·scale + b) V, lse = logsumexp(q·K·scale + b)."""

    def __init__(self, m: int, d: int, nodes: int, scale: float):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(m, nodes, d) * 0.1)
        self.values = nn.Parameter(torch.zeros(m, nodes, d))
        self.bias = nn.Parameter(torch.zeros(m, 1, nodes))
        self.scale = scale

    @classmethod
    def from_spec(cls, m: int, width: int, spec: HeadsSpec) -> QuadratureGroup:
        """`m` modules of `width` nodes each for `spec`."""
        return cls(m, spec.head_dim, width, spec.scale)

    @staticmethod
    def params_per_module(width: int, d: int) -> int:
        """Parameters of one module of `width` nodes, head dim `d`: keys, values [width, d], bias [width]."""
        return width * (2 * d + 1)

    def forward(self, q: torch.Tensor, sel: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.baddbmm(self.bias[sel], q, self.keys[sel].transpose(1, 2), alpha=self.scale)  # [M', N, m]
        lse = torch.logsumexp(s, dim=-1)
        o = torch.bmm(torch.softmax(s, dim=-1), self.values[sel])
        return o, lse


# variant -> its group class: from_spec(m, width, spec) builds M modules, params_per_module(width, d) counts one
GROUPS = {"mlp": MLPGroup, "quadrature": QuadratureGroup}


class NectarHeads(nn.Module):
    """All modules of all layers. Module index of (layer l, kv head j) is l * kv_heads + j."""

    def __init__(self, spec: HeadsSpec):
        super().__init__()
        self.spec = spec
        widths = sorted(set(spec.widths))
        self.group_widths = widths
        self.groups = nn.ModuleList()
        # layer -> (group index, position of its first module inside the group)
        self.layer_slot: list[tuple[int, int]] = [(-1, -1)] * spec.num_layers
        for gi, w in enumerate(widths):
            layers = [l for l in range(spec.num_layers) if spec.widths[l] == w]
            for k, l in enumerate(layers):
                self.layer_slot[l] = (gi, k * spec.kv_heads)
            m = len(layers) * spec.kv_heads
            self.groups.append(GROUPS[spec.variant].from_spec(m, w, spec))
        self.group_layers = [[l for l in range(spec.num_layers) if spec.widths[l] == w] for w in widths]

    def forward_group(self, gi: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [M_g, N, D] for all modules of group gi (layer-major) -> (o, lse)."""
        return self.groups[gi](q)

    def forward_layer(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [Hkv, N, D] -> o: [Hkv, N, D], lse: [Hkv, N] for one layer's modules."""
        gi, start = self.layer_slot[layer]
        return self.groups[gi](q, slice(start, start + self.spec.kv_heads))


class NectarContext:
    """One layer's document part served by Nectar heads (implements models' ContextAttention).

    `visible_before`: in a sliding-window layer, queries at positions ≥ this see no document key
    (the last one, at context_len − 1, is a window behind): their lse is −inf, so the merge gives
    the document no weight there, as exact attention would."""

    def __init__(self, heads: NectarHeads, layer: int, visible_before: int | None = None):
        self.heads, self.layer, self.visible_before = heads, layer, visible_before

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, Hkv, G, T, D], q_pos: [B, T] -> o [B, Hkv, G, T, D], lse [B, Hkv, G, T]."""
        b, hkv, g, t, d = q.shape
        x = q.permute(1, 0, 2, 3, 4).reshape(hkv, b * g * t, d).to(torch.float32)  # [Hkv, B*G*T, D]
        o, lse = self.heads.forward_layer(self.layer, x)
        o = o.view(hkv, b, g, t, d).permute(1, 0, 2, 3, 4).to(q.dtype)
        lse = lse.view(hkv, b, g, t).permute(1, 0, 2, 3)
        if self.visible_before is not None:
            lse = lse.masked_fill((q_pos >= self.visible_before)[:, None, None, :], float("-inf"))
        return o, lse


def visible_before(windows, context_len: int | None) -> list[int | None]:
    """Per layer: the first query position that sees no document key (sliding-window layers,
    window w: context_len − 1 + w), None for global layers or without context_len."""
    return [context_len - 1 + w if w and context_len is not None else None for w in windows]


def nectar_contexts(heads: NectarHeads, windows=None, context_len: int | None = None) -> list[NectarContext]:
    """Per layer a NectarContext; with the model's layer windows and the context length, sliding-
    window layers stop serving the document where exact attention would no longer see it."""
    bounds = visible_before(windows or (0,) * heads.spec.num_layers, context_len)
    return [NectarContext(heads, l, bounds[l]) for l in range(heads.spec.num_layers)]
