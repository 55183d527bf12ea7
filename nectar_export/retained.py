"""Retained heads: exact document attention kept for the few KV heads Nectar serves worst.

A handful of retrieval-like heads (sharp attention over a query-dependent set of document
tokens) keep a large held-out error whatever the network width (docs/results.md). Keeping the
document's exact keys and values for those heads only costs n·2·D·2 bytes per head (fp16), 1/(L·Hkv)
of the document KV, and serves them exactly; every other head stays Nectar.

Ranking: per module (layer l, KV head j) the error that reaches the merged output, Σ w²‖f(q) − o_ctx‖²
over the given queries (w = σ(lse_ctx − lse_loc), the document's share of the output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nectar_models.attention import ExactContextAttention

from .collect import QuerySet
from .heads import NectarContext, NectarHeads


@torch.no_grad()
def module_error_mass(heads: NectarHeads, qs: QuerySet, chunk: int = 8192) -> torch.Tensor:
    """Share-weighted squared output error per module over `qs` -> [L, Hkv] fp64 (CPU)."""
    spec = heads.spec
    out = torch.zeros(spec.num_layers, spec.kv_heads, dtype=torch.float64)
    for layer in range(spec.num_layers):
        for s in range(0, qs.n, chunk):
            q = qs.q[layer][s : s + chunk].float()  # [N, Hkv, G, D]
            n, hkv, g, d = q.shape
            o_hat, _ = heads.forward_layer(layer, q.permute(1, 0, 2, 3).reshape(hkv, n * g, d))
            o = qs.o[layer][s : s + chunk].float().permute(1, 0, 2, 3).reshape(hkv, n * g, d)
            lse = qs.lse[layer][s : s + chunk].permute(1, 0, 2).reshape(hkv, n * g)
            share = torch.sigmoid(lse - qs.lse_loc[layer][s : s + chunk].permute(1, 0, 2).reshape(hkv, n * g))
            e = torch.where(torch.isfinite(lse), share.square() * (o_hat - o).square().sum(-1), 0.0)
            out[layer] += e.sum(-1).double().cpu()
    return out


def worst_modules(mass: torch.Tensor, k: int, windows=None) -> list[tuple[int, int]]:
    """The k (layer, KV head) pairs of largest error mass, sorted by layer then head. Only global
    layers are eligible (`windows[l]` = 0): a sliding-window layer sees a few hundred document
    tokens at most, and the exported graph keeps retained heads on the global-attention path only."""
    mass = mass.clone()
    for l, w in enumerate(windows or ()):
        if w:
            mass[l] = -1.0
    eligible = int((mass >= 0).sum())
    if k > eligible:
        raise ValueError(f"cannot retain {k} heads: the model has {eligible} KV heads in global-attention layers")
    flat = torch.argsort(mass.flatten(), descending=True)[:k].tolist()
    hkv = mass.shape[1]
    return sorted((i // hkv, i % hkv) for i in flat)


@dataclass
class RetainedKV:
    """The exact document keys/values kept for `modules`: per layer `keys[l]`, `values[l]`:
    [R_l, c, D] for its retained heads in ascending head order, c document tokens at absolute
    positions start … start + c − 1 (post-RoPE, as the model cached them)."""

    modules: list[tuple[int, int]]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    start: int

    def heads_of(self, layer: int) -> list[int]:
        return [j for l, j in self.modules if l == layer]

    def nbytes(self) -> int:
        """Bytes on disk (fp16)."""
        return sum(2 * (self.keys[l].numel() + self.values[l].numel()) for l in self.keys)

    @classmethod
    def from_document(cls, doc: list[ExactContextAttention], modules: list[tuple[int, int]], start: int) -> "RetainedKV":
        """doc: the document's exact per-layer contexts (template prefix excluded, batch 1)."""
        keys, values = {}, {}
        for layer in sorted({l for l, _ in modules}):
            idx = torch.tensor([j for l, j in modules if l == layer], device=doc[layer].k.device)
            keys[layer] = doc[layer].k[0].index_select(0, idx).contiguous()
            values[layer] = doc[layer].v[0].index_select(0, idx).contiguous()
        return cls(sorted(modules), keys, values, start)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for safetensors (fp16): layers.{l}.key / layers.{l}.value."""
        out = {}
        for l in self.keys:
            out[f"layers.{l}.key"] = self.keys[l].detach().to(torch.float16).contiguous().cpu()
            out[f"layers.{l}.value"] = self.values[l].detach().to(torch.float16).contiguous().cpu()
        return out

    @classmethod
    def from_state(cls, modules: list[tuple[int, int]], state: dict[str, torch.Tensor], start: int, device="cpu") -> "RetainedKV":
        layers = sorted({l for l, _ in modules})
        keys = {l: state[f"layers.{l}.key"].float().to(device) for l in layers}
        values = {l: state[f"layers.{l}.value"].float().to(device) for l in layers}
        return cls(sorted(modules), keys, values, start)


class RetainedHeadsContext:
    """One layer's document part: Nectar for every KV head except `retained`, exact attention for those.

    nectar: the layer's NectarContext; exact: ExactContextAttention over the document with k/v
    holding only the retained heads, `[1, R, n, D]`, in the order of `retained`."""

    def __init__(self, nectar: NectarContext, exact: ExactContextAttention, retained: list[int]):
        self.nectar, self.exact, self.retained = nectar, exact, retained

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, Hkv, G, T, D] -> o [B, Hkv, G, T, D], lse [B, Hkv, G, T]."""
        o, lse = self.nectar(q, q_pos)
        idx = torch.tensor(self.retained, device=q.device)
        oe, le = self.exact(q.index_select(1, idx), q_pos)
        o, lse = o.clone(), lse.clone()
        o[:, idx], lse[:, idx] = oe.to(o.dtype), le.to(lse.dtype)
        return o, lse


def retained_contexts(served: list[NectarContext], retained: RetainedKV | None, scale: float) -> list:
    """Per layer: the Nectar context, or a RetainedHeadsContext where some of its heads are retained."""
    out = list(served)
    if retained is None:
        return out
    for layer, k in retained.keys.items():
        pos = torch.arange(retained.start, retained.start + k.shape[1], device=k.device)
        exact = ExactContextAttention(k[None], retained.values[layer][None], pos, 0, scale)
        out[layer] = RetainedHeadsContext(served[layer], exact, retained.heads_of(layer))
    return out


def retained_bytes(n: int, head_dim: int, count: int) -> int:
    """fp16 bytes of the document keys and values of `count` retained heads (n document tokens)."""
    return count * n * 2 * head_dim * 2
