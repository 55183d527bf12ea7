"""Retained heads: document attention kept for the few KV heads Nectar serves worst.

A handful of retrieval-like heads (sharp attention over a query-dependent set of document
tokens) keep a large held-out error whatever the network width (docs/results.md). Keeping the
document's keys and values for those heads only costs n·2·D·2 bytes per head in fp16 (1/(L·Hkv) of
the document KV) or n·2·(D + 2) in int8 with a per-token scale, and serves them by attention over that
stored KV; every other head stays Nectar.

Ranking: per module (layer l, KV head j) the error that reaches the merged output, Σ w²‖f(q) − o_ctx‖²
over the given queries (w = σ(lse_ctx − lse_loc), the document's share of the output).

Token budget (`retain_tokens` m): a retained head may keep only m document tokens S, the ones with the
largest weight any training probe query gives them in full attention (max over queries of
w·softmax_doc(q·k)): decode then reads R·m stored keys whatever the document's length. The head's
network is then fitted to the rest of the document R (the document tokens not in S; `complement_targets`:
o and lse over R) — the heads and tokens are chosen after the short probe fit, before the one final fit
(`TokenBudgetChoice`) — and decode merges the two disjoint parts exactly, as it merges document and local tokens:
lse = logaddexp(lse_S, g_R), o = e^(lse_S − lse)·o_S + e^(g_R − lse)·f_R (RetainedHeadsContext).
`subset_error` measures what the budget costs on held-out probes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nectar_models.attention import ExactContextAttention

from .collect import QuerySet
from .config import FitConfig
from .fit import heldout_chunk
from .heads import NectarContext, NectarHeads, nectar_contexts


@torch.no_grad()
def module_error_mass(heads: NectarHeads, qs: QuerySet, chunk: int = 8192) -> torch.Tensor:
    """Share-weighted squared output error per module over `qs` -> [L, Hkv] fp64 (CPU)."""
    spec = heads.spec
    out = torch.zeros(spec.num_layers, spec.kv_heads, dtype=torch.float64)
    for layer in range(spec.num_layers):
        for s in range(0, qs.n, chunk):
            o_hat, _, o, lse, share = heldout_chunk(heads, qs, layer, slice(s, s + chunk))
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



@torch.no_grad()
def select_tokens(doc: list[ExactContextAttention], modules: list[tuple[int, int]], qs: QuerySet, m: int,
                  chunk: int = 4096) -> dict[int, torch.Tensor]:
    """Per layer with retained heads: document token indices [R_l, m] (ascending, heads in ascending
    order) — per head the m tokens of largest max-over-queries full-attention weight
    w·softmax_doc(q·k·scale) over the query rows of `qs` (its G query heads' rows of every probe token)."""
    out: dict[int, torch.Tensor] = {}
    for layer in sorted({l for l, _ in modules}):
        k = doc[layer].k[0].float()  # [Hkv, n, D]
        picks = []
        for j in sorted(h for l, h in modules if l == layer):
            best = torch.zeros(k.shape[1], device=k.device)
            for s in range(0, qs.n, chunk):
                q = qs.q[layer][s:s + chunk, j].float().to(k.device)  # [S, G, D]
                share = torch.sigmoid(qs.lse[layer][s:s + chunk, j] - qs.lse_loc[layer][s:s + chunk, j]).to(k.device)  # [S, G]
                sc = torch.einsum("sgd,nd->sgn", q, k[j]) * doc[layer].scale
                wt = torch.softmax(sc, -1) * share[..., None]
                wt = torch.nan_to_num(wt, nan=0.0)  # a row no document key reaches (never in global layers)
                best = torch.maximum(best, wt.flatten(0, 1).amax(0))
            picks.append(torch.sort(torch.topk(best, min(m, k.shape[1])).indices).values)
        out[layer] = torch.stack(picks)
    return out


@torch.no_grad()
def complement_targets(doc: list[ExactContextAttention], modules: list[tuple[int, int]], tokens: dict[int, torch.Tensor],
                       qs: QuerySet, chunk: int = 4096) -> QuerySet:
    """`qs` with the recorded targets of each retained module (layer l, KV head j) replaced by exact
    attention over the document tokens it does not keep: o, lse over the document tokens not in tokens[l][r] (fp32 math,
    stored in qs's dtype); every other module's targets are shared, not copied."""
    o, lse = list(qs.o), list(qs.lse)
    for layer in sorted({l for l, _ in modules}):
        o[layer], lse[layer] = o[layer].clone(), lse[layer].clone()
        k, v = doc[layer].k[0].float(), doc[layer].v[0].float()  # [Hkv, n, D]
        for r, j in enumerate(sorted(h for l, h in modules if l == layer)):
            rest = torch.ones(k.shape[1], dtype=torch.bool, device=k.device)
            rest[tokens[layer][r].to(k.device)] = False
            kr, vr = k[j][rest], v[j][rest]  # [n − c, D]
            for s in range(0, qs.n, chunk):
                q = qs.q[layer][s:s + chunk, j].float().to(k.device)  # [S, G, D]
                sc = torch.einsum("sgd,nd->sgn", q, kr) * doc[layer].scale
                lr = torch.logsumexp(sc, -1)
                o[layer][s:s + chunk, j] = torch.einsum("sgn,nd->sgd", torch.exp(sc - lr[..., None]), vr).to(o[layer].dtype).to(o[layer].device)
                lse[layer][s:s + chunk, j] = lr.to(lse[layer].dtype).to(lse[layer].device)
    return QuerySet(qs.q, o, lse, qs.lse_loc, qs.probe_index, qs.positions)


class TokenBudgetChoice:
    """`fit_heads`'s retarget hook for retained heads under a token budget: with the probe fit's heads,
    rank the modules (held-out error mass), keep the `count` worst (global layers), pick each one's
    `tokens` document tokens (`select_tokens`, training queries) and hand back both query sets with
    those modules' targets over the tokens not kept (`complement_targets`), so that one final fit
    trains their networks for what they will serve. Afterwards: `mass`, `modules`, `tokens`."""

    def __init__(self, doc: list[ExactContextAttention], count: int, tokens: int, windows=None):
        self.doc, self.count, self.budget, self.windows = doc, count, tokens, windows
        self.mass = self.modules = self.tokens = None

    def __call__(self, probe_heads: NectarHeads, qs_train: QuerySet, qs_held: QuerySet) -> tuple[QuerySet, QuerySet]:
        self.mass = module_error_mass(probe_heads, qs_held)
        self.modules = worst_modules(self.mass, self.count, self.windows)
        self.tokens = select_tokens(self.doc, self.modules, qs_train, self.budget)
        return (complement_targets(self.doc, self.modules, self.tokens, qs_train),
                complement_targets(self.doc, self.modules, self.tokens, qs_held))


def token_budget_choice(doc: list[ExactContextAttention], fit_cfg: FitConfig, windows=None) -> TokenBudgetChoice | None:
    """`fit_heads`'s retarget hook when `fit_cfg` retains heads that keep fewer tokens than the document
    has (doc: the document's contexts, template prefix excluded); None otherwise."""
    n_doc = doc[0].length
    c = retained_tokens(n_doc, fit_cfg.retain_tokens)
    return TokenBudgetChoice(doc, fit_cfg.retain_heads, c, windows) if fit_cfg.retain_heads and c < n_doc else None


def retain_after_fit(doc: list[ExactContextAttention], heads: NectarHeads, qs_held: QuerySet, fit_cfg: FitConfig,
                     start: int, windows=None, choice: TokenBudgetChoice | None = None) -> tuple["RetainedKV", torch.Tensor]:
    """(the retained heads' stored KV, the module error mass that chose them): the heads and tokens
    `choice` picked during the fit, or, every token kept, the `fit_cfg.retain_heads` worst-served
    modules of the fitted `heads` on `qs_held`."""
    if choice is not None:
        mass, modules, tokens = choice.mass, choice.modules, choice.tokens
    else:
        mass, tokens = module_error_mass(heads, qs_held), None
        modules = worst_modules(mass, fit_cfg.retain_heads, windows)
    return RetainedKV.from_document(doc, modules, start, fit_cfg.retain_dtype, tokens), mass


@torch.no_grad()
def subset_error(heads: NectarHeads, retained: "RetainedKV", qs: QuerySet, chunk: int = 4096) -> dict[str, float]:
    """How the retained heads serve `qs` against exact attention over the whole document, as decode
    serves them (stored rounding; under a token budget the kept tokens merged with the network for
    the rest): {"o": Σ w²‖o_served − o‖² / Σ w²‖o‖², "lse": Σ w·|lse_served − lse| / Σ w} over
    every retained head's query rows (w = σ(lse − lse_loc), the document's share)."""
    served = retained_contexts(nectar_contexts(heads), retained, heads.spec.scale)
    num = den = lnum = lden = 0.0
    for layer in retained.keys:
        idx = torch.tensor(retained.heads_of(layer))
        for s in range(0, qs.n, chunk):
            rows = slice(s, s + chunk)
            q = qs.q[layer][rows].float().permute(1, 2, 0, 3)[None]  # [1, Hkv, G, S, D]
            dev = retained.keys[layer].device
            o_hat, l_hat = served[layer](q.to(dev), qs.positions[rows][None].to(dev))
            o_hat, l_hat = o_hat[0, idx.to(dev)].permute(2, 0, 1, 3).cpu(), l_hat[0, idx.to(dev)].permute(2, 0, 1).cpu()
            o = qs.o[layer][rows][:, idx].float().cpu()  # [S, R, G, D]
            lse = qs.lse[layer][rows][:, idx].float().cpu()
            w = torch.sigmoid(lse - qs.lse_loc[layer][rows][:, idx].float().cpu())
            ok = torch.isfinite(lse)
            num += float(torch.where(ok, w.square() * (o_hat - o).square().sum(-1), 0.0).sum())
            den += float(torch.where(ok, w.square() * o.square().sum(-1), 0.0).sum())
            lnum += float(torch.where(ok, w * (l_hat - lse).abs(), 0.0).sum())
            lden += float(torch.where(ok, w, 0.0).sum())
    return {"o": num / den if den else 0.0, "lse": lnum / lden if lden else 0.0}


def encode_kv(x: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """x: [R, c, D] -> stored tensors. float16: {"": x in fp16}; int8: {"q": int8 [R, c, D],
    "scale": fp16 [R, c, 1]}, symmetric, one scale per (head, token) (as the noise-floor study's
    int8 rounding of the document cache, docs/results.md)."""
    if dtype == "float16":
        return {"": x.detach().to(torch.float16).contiguous().cpu()}
    scale = (x.detach().abs().amax(-1, keepdim=True).float() / 127).to(torch.float16)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(x.detach().float() / safe).clamp_(-127, 127).to(torch.int8)
    return {"q": q.contiguous().cpu(), "scale": scale.contiguous().cpu()}


def decode_kv(parts: dict[str, torch.Tensor], device="cpu") -> torch.Tensor:
    """The stored tensors of `encode_kv` -> fp32 [R, c, D] on `device`."""
    if "" in parts:
        return parts[""].float().to(device)
    return (parts["q"].float() * parts["scale"].float()).to(device)


@dataclass
class RetainedKV:
    """The document keys/values kept for `modules`: per layer `keys[l]`, `values[l]`: fp32
    [R_l, c, D] for its retained heads in ascending head order (as stored: rounded to `dtype`), c
    document tokens (post-RoPE, as the model cached them): every token, at absolute positions
    start … start + c − 1, or with a token budget per head the tokens `tokens[l]` [R_l, c] (document
    indices, ascending); `stored`: the safetensors tensors they decode from (`layers.{l}.tokens`
    int32 among them when a budget applied)."""

    modules: list[tuple[int, int]]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    start: int
    dtype: str
    stored: dict[str, torch.Tensor]
    tokens: dict[int, torch.Tensor] | None = None

    @property
    def length(self) -> int:
        """c: document tokens stored per retained head."""
        return next(iter(self.keys.values())).shape[1] if self.keys else 0

    def heads_of(self, layer: int) -> list[int]:
        return [j for l, j in self.modules if l == layer]

    def nbytes(self) -> int:
        """Bytes of the stored tensors (on disk, without the safetensors header)."""
        return sum(t.numel() * t.element_size() for t in self.stored.values())

    @classmethod
    def from_document(cls, doc: list[ExactContextAttention], modules: list[tuple[int, int]], start: int,
                      dtype: str = "float16", tokens: dict[int, torch.Tensor] | None = None) -> "RetainedKV":
        """doc: the document's exact per-layer contexts (template prefix excluded, batch 1); `tokens`:
        per layer the kept document indices [R_l, c] (`select_tokens`), None for every token."""
        modules = sorted(modules)  # heads_of / from_state read them in this order
        stored = {}
        for layer in sorted({l for l, _ in modules}):
            idx = torch.tensor([j for l, j in modules if l == layer], device=doc[layer].k.device)
            for kind, x in (("key", doc[layer].k), ("value", doc[layer].v)):
                x = x[0].index_select(0, idx)  # [R_l, n, D]
                if tokens is not None:
                    t = tokens[layer].to(x.device)
                    x = torch.gather(x, 1, t[..., None].expand(-1, -1, x.shape[-1]))
                for part, t in encode_kv(x, dtype).items():
                    stored[_name(layer, kind, part)] = t
            if tokens is not None:
                stored[f"layers.{layer}.tokens"] = tokens[layer].to(torch.int32).contiguous().cpu()
        return cls.from_state(modules, stored, start, dtype, doc[0].k.device)

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors for safetensors: layers.{l}.{key,value} (fp16), or layers.{l}.{key,value}.{q,scale} (int8),
        and layers.{l}.tokens (int32) under a token budget."""
        return dict(self.stored)

    @classmethod
    def from_state(cls, modules: list[tuple[int, int]], state: dict[str, torch.Tensor], start: int,
                   dtype: str = "float16", device="cpu") -> "RetainedKV":
        layers = sorted({l for l, _ in modules})
        parts = ("",) if dtype == "float16" else ("q", "scale")
        kv = {kind: {l: decode_kv({p: state[_name(l, kind, p)] for p in parts}, device) for l in layers}
              for kind in ("key", "value")}
        stored = {_name(l, kind, p): state[_name(l, kind, p)] for l in layers for kind in ("key", "value") for p in parts}
        tokens = None
        if layers and f"layers.{layers[0]}.tokens" in state:
            tokens = {l: state[f"layers.{l}.tokens"].long() for l in layers}
            stored.update({f"layers.{l}.tokens": state[f"layers.{l}.tokens"] for l in layers})
        return cls(sorted(modules), kv["key"], kv["value"], start, dtype, stored, tokens)


def _name(layer: int, kind: str, part: str) -> str:
    return f"layers.{layer}.{kind}" + (f".{part}" if part else "")


def stored_shapes(layer_heads: int, c: int, d: int, dtype: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per stored part of one layer's keys (or values): (shape, dtype)."""
    if dtype == "float16":
        return {"": ((layer_heads, c, d), torch.float16)}
    return {"q": ((layer_heads, c, d), torch.int8), "scale": ((layer_heads, c, 1), torch.float16)}


class RetainedHeadsContext:
    """One layer's document part: Nectar for every KV head except `retained`, attention over their stored KV for those.

    nectar: the layer's NectarContext; exact: ExactContextAttention over the document with k/v
    holding only the retained heads, `[1, R, c, D]`, in the order of `retained`. `subset` (a token
    budget, c < n: the retained heads' networks were fitted to the other n − c tokens): the kept
    tokens' exact attention (o_S, lse_S) and the network's (f_R, g_R) for the rest are merged by
    log-sum-exp, lse = logaddexp(lse_S, g_R), o = e^(lse_S − lse)·o_S + e^(g_R − lse)·f_R."""

    def __init__(self, nectar: NectarContext, exact: ExactContextAttention, retained: list[int], subset: bool = False):
        self.nectar, self.exact, self.retained, self.subset = nectar, exact, retained, subset
        self.index = torch.tensor(retained, device=exact.k.device)

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, Hkv, G, T, D] -> o [B, Hkv, G, T, D], lse [B, Hkv, G, T]. The stored KV is fp32, so the
        retained heads' queries are too (a model cast to bf16/fp16 gets its dtype back in o)."""
        o, lse = self.nectar(q, q_pos)
        idx = self.index if self.index.device == q.device else self.index.to(q.device)
        oe, le = self.exact(q.index_select(1, idx).float(), q_pos)
        if self.subset:
            f, g = o.index_select(1, idx).float(), lse.index_select(1, idx).float()
            both = torch.logaddexp(le, g)
            oe, le = torch.exp(le - both)[..., None] * oe + torch.exp(g - both)[..., None] * f, both
        o, lse = o.clone(), lse.clone()
        o[:, idx], lse[:, idx] = oe.to(o.dtype), le.to(lse.dtype)
        return o, lse


def retained_contexts(served: list[NectarContext], retained: RetainedKV | None, scale: float) -> list:
    """Per layer: the Nectar context, or a RetainedHeadsContext where some of its heads are retained."""
    out = list(served)
    if retained is None:
        return out
    for layer, k in retained.keys.items():
        # Positions only mask sliding windows, and retained heads are in global layers: a token subset
        # (whose positions differ per head) is masked by none, as all n would be.
        pos = torch.arange(retained.start, retained.start + k.shape[1], device=k.device)
        exact = ExactContextAttention(k[None], retained.values[layer][None], pos, 0, scale)
        out[layer] = RetainedHeadsContext(served[layer], exact, retained.heads_of(layer), subset=retained.tokens is not None)
    return out


def retained_tokens(n: int, budget: int) -> int:
    """Document tokens kept per retained head: n, or the token budget when it is smaller (0: no budget)."""
    if budget is None:  # "auto" must be resolved first (FitConfig.auto_retain_tokens): None is not "all"
        raise ValueError("retain_tokens is unresolved (auto); resolve it with FitConfig.auto_retain_tokens first")
    return min(n, budget) if budget else n


def retained_bytes(n: int, head_dim: int, count: int, dtype: str = "float16", tokens: int = 0) -> int:
    """Stored bytes of the document keys and values of `count` retained heads (n document tokens;
    `tokens`: the per-head token budget, 0 for all n): fp16 values, or int8 values + one fp16 scale
    per token and head; under a budget smaller than n also the kept tokens' int32 indices."""
    if not count:
        return 0
    per_vector = 2 * head_dim if dtype == "float16" else head_dim + 2
    c = retained_tokens(n, tokens)
    return count * c * (2 * per_vector + (4 if c < n else 0))
