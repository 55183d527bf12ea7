"""Training all Nectar heads at once, and choosing their sizes within a byte budget.

Losses per module (layer l, KV head j), on minibatches of recorded queries:
- target: relative squared error Σ w²‖f(q) − o_ctx‖² / Σ w²‖o_ctx‖², weighted by the document's
  share w = σ(lse_ctx − lse_loc) of the merged output (an error in f reaches the model scaled by w);
- score: weighted squared error of g(q) − lse_ctx, weight w(1 − w) (the slope of the merge weight).
With `weighting="none"` all weights are 1. Both are reported per layer on held-out probes.

By default the skip map and output bias start at the weighted least-squares linear fit
(`linear_init`), and the matmuls run in bf16 where the device has it natively (`train_dtype`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .collect import QuerySet
from .config import WEIGHT_FLOOR, FitConfig
from .heads import HeadsSpec, NectarHeads

class ModuleData:
    """Training tensors re-laid out per width group: [M_g, S, ...] with S = tokens × G samples."""

    def __init__(self, qs: QuerySet, layers: list[int]):
        def stack(xs):  # [N, Hkv, G, ...] per layer -> [L*Hkv, N*G, ...]
            x = torch.stack([xs[l] for l in layers])  # [L, N, Hkv, G, ...]
            x = x.transpose(1, 2)  # [L, Hkv, N, G, ...]
            return x.reshape(x.shape[0] * x.shape[1], x.shape[2] * x.shape[3], *x.shape[4:]).contiguous()

        self.q, self.o, self.lse = stack(qs.q), stack(qs.o), stack(qs.lse)
        share = torch.sigmoid(stack(qs.lse) - stack(qs.lse_loc))
        self.share = share

    def weights(self, rows: torch.Tensor | slice, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.share[:, rows]
        if weighting == "none":
            one = torch.ones_like(w)
            return one, one
        return w.square() + WEIGHT_FLOOR, w * (1 - w) + WEIGHT_FLOOR


def init_statistics(heads: NectarHeads, data: list[ModuleData], doc_kv: list | None) -> None:
    """Standardization statistics (mlp) or document-key initialization (quadrature)."""
    for gi, (group, d) in enumerate(zip(heads.groups, data)):
        if heads.spec.variant == "mlp":
            group.q_mean.copy_(d.q.mean(1, keepdim=True))
            group.q_std.copy_((d.q - group.q_mean).square().mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4))
            group.o_mean.copy_(d.o.mean(1, keepdim=True))
            group.o_std.copy_((d.o - group.o_mean).square().mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4))
            group.l_mean.copy_(d.lse.mean(1, keepdim=True))
            group.l_std.copy_(d.lse.std(1, keepdim=True).clamp_min(1e-3))
        elif doc_kv is not None:
            _init_nodes_from_document(group, heads.group_layers[gi], doc_kv, heads.spec)


@torch.no_grad()
def init_linear_part(group, d: "ModuleData", weighting: str, ridge: float = 1e-3, chunk: int = 8) -> None:
    """Skip (D→D) and output bias b3 := the weighted least-squares linear map from standardized q to
    standardized o (the target loss's weights), so training starts from the best linear predictor and the
    MLP learns only the nonlinear residual (w3 is zero at init). Solved per module: [D+1, D+1] systems."""
    m, s, dd = d.q.shape
    weight = d.weights(slice(None), weighting)[0]  # [M, S], the target loss's weights
    for a in range(0, m, chunk):
        sl = slice(a, min(m, a + chunk))
        x = (d.q[sl] - group.q_mean[sl]) / group.q_std[sl]  # [c, S, D]
        y = (d.o[sl] - group.o_mean[sl]) / group.o_std[sl]  # [c, S, D]
        w = weight[sl] / weight[sl].mean(1, keepdim=True)  # [c, S]
        xa = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # [c, S, D+1]
        gram = xa.transpose(1, 2) @ (w[..., None] * xa) / s  # [c, D+1, D+1]
        rhs = xa.transpose(1, 2) @ (w[..., None] * y) / s  # [c, D+1, D]
        gram += ridge * torch.eye(dd + 1, device=x.device)
        beta = torch.linalg.solve(gram.double(), rhs.double()).float()
        group.skip.data[sl] = beta[:, :dd]
        group.b3.data[sl] = beta[:, dd:]


def _init_nodes_from_document(group, layers: list[int], doc_kv: list, spec: HeadsSpec) -> None:
    """Nodes start as evenly spaced document keys/values (token 0, the attention sink, included)."""
    nodes = group.keys.shape[1]
    for k, layer in enumerate(layers):
        dk, dv = doc_kv[layer]  # [1, Hkv, n, D]
        n = dk.shape[2]
        pick = torch.linspace(0, n - 1, nodes).round().long()
        sl = slice(k * spec.kv_heads, (k + 1) * spec.kv_heads)
        group.keys.data[sl] = dk[0][:, pick].float()
        group.values.data[sl] = dv[0][:, pick].float()
        group.bias.data[sl] = math.log(n / nodes)


def group_losses(heads: NectarHeads, gi: int, d: ModuleData, rows, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-module (relative target loss [M_g], weighted lse MSE [M_g]) on the sample rows."""
    o_hat, l_hat = heads.forward_group(gi, d.q[:, rows])
    o_hat, l_hat = o_hat.float(), l_hat.float()  # losses in fp32 (under bf16 autocast too)
    o, lse = d.o[:, rows], d.lse[:, rows]
    wo, wl = d.weights(rows, weighting)
    err = (o_hat - o).square().sum(-1)  # [M, S]
    rel = (wo * err).sum(1) / (wo * o.square().sum(-1)).sum(1).clamp_min(1e-12)
    lmse = (wl * (l_hat - lse).square()).sum(1) / wl.sum(1)
    return rel, lmse


def train_dtype(name: str, device: torch.device) -> torch.dtype:
    """The matmul dtype of training: "auto" is bfloat16 where the device computes it natively
    (CUDA with bf16, CPUs with AVX512-BF16/AMX through oneDNN), else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def train_heads(heads: NectarHeads, data: list[ModuleData], cfg: FitConfig, steps: int, desc: str = "train heads",
                progress: bool = True) -> list[float]:
    """One optimisation over all modules of all groups (Adam, warmup + cosine). Returns loss curve.

    Parameters, optimizer state and losses are fp32; with bfloat16 `cfg.train_dtype` the matmuls of
    the forward and backward run under autocast (weights are stored as fp16 in the artifact anyway)."""
    gen = torch.Generator().manual_seed(cfg.seed)  # CPU generator: same rows on CPU and GPU
    dev = data[0].q.device
    dtype = train_dtype(cfg.train_dtype, dev)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    n_samples = data[0].q.shape[1]
    curve = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for _ in bar:
        rows = torch.randint(0, n_samples, (min(cfg.batch, n_samples),), generator=gen).to(dev)
        total = 0.0
        for gi, d in enumerate(data):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                rel, lmse = group_losses(heads, gi, d, rows, cfg.weighting)
            total = total + rel.sum() + cfg.lse_weight * lmse.sum()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        sched.step()
        curve.append(total.item() / (heads.spec.num_layers * heads.spec.kv_heads))
        if len(curve) % 25 == 0:
            bar.set_postfix(loss=f"{sum(curve[-25:]) / 25:.4f}")
    return curve


@torch.no_grad()
def layer_errors(heads: NectarHeads, qs: QuerySet, chunk: int = 8192) -> dict[str, list[float]]:
    """Held-out fidelity per layer: relative o error, share-weighted relative o error, lse MAE."""
    spec = heads.spec
    rel, wrel, lmae = [], [], []
    for layer in range(spec.num_layers):
        num = den = wnum = wden = labs = 0.0
        count = 0
        for s in range(0, qs.n, chunk):
            q = qs.q[layer][s : s + chunk]  # [N, Hkv, G, D]
            n, hkv, g, d = q.shape
            x = q.permute(1, 0, 2, 3).reshape(hkv, n * g, d)
            o_hat, l_hat = heads.forward_layer(layer, x)
            o = qs.o[layer][s : s + chunk].permute(1, 0, 2, 3).reshape(hkv, n * g, d)
            lse = qs.lse[layer][s : s + chunk].permute(1, 0, 2).reshape(hkv, n * g)
            share = torch.sigmoid(lse - qs.lse_loc[layer][s : s + chunk].permute(1, 0, 2).reshape(hkv, n * g))
            e, o2 = (o_hat - o).square().sum(-1), o.square().sum(-1)
            num, den = num + e.sum().item(), den + o2.sum().item()
            wnum, wden = wnum + (share.square() * e).sum().item(), wden + (share.square() * o2).sum().item()
            labs += (l_hat - lse).abs().sum().item()
            count += lse.numel()
        rel.append(math.sqrt(num / max(den, 1e-12)))
        wrel.append(math.sqrt(wnum / max(wden, 1e-12)))
        lmae.append(labs / max(count, 1))
    return {"o_rel_error": rel, "o_rel_error_weighted": wrel, "lse_abs_error": lmae}


def uniform_widths(spec_for, num_layers: int, budget_params: int, multiple: int) -> tuple[int, ...]:
    """Largest common width whose heads fit in `budget_params` (spec_for(widths) -> HeadsSpec)."""
    w = multiple
    while spec_for((w + multiple,) * num_layers).total_params() <= budget_params:
        w += multiple
    return (w,) * num_layers


def adaptive_widths(spec_for, errors: list[float], budget_params: int, multiple: int,
                    levels: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)) -> tuple[int, ...]:
    """Widths ∝ a few levels of per-layer error at equal total parameters (±one width step).

    A layer's level is its error relative to the median (clipped to the levels); a common
    base width is then the largest that fits the budget.
    """
    med = sorted(errors)[len(errors) // 2] or 1e-9
    lv = [min(levels, key=lambda x: abs(math.log(x) - math.log(max(e / med, 1e-9)))) for e in errors]
    base = multiple
    def widths(b):
        return tuple(max(multiple, int(round(b * f / multiple)) * multiple) for f in lv)
    while spec_for(widths(base + multiple)).total_params() <= budget_params:
        base += multiple
    return widths(base)


def build_heads(spec: HeadsSpec, qs: QuerySet, cfg: FitConfig, doc_kv: list | None, device) -> tuple[NectarHeads, list[ModuleData]]:
    """Heads of `spec` with their training data per width group, initialized (statistics, linear part)."""
    heads = NectarHeads(spec).to(device)
    data = [ModuleData(qs, ls) for ls in heads.group_layers]
    init_statistics(heads, data, doc_kv)
    if cfg.linear_init and spec.variant == "mlp":
        for group, d in zip(heads.groups, data):
            init_linear_part(group, d, cfg.weighting)
    return heads, data


@dataclass
class FitResult:
    heads: NectarHeads
    widths: tuple[int, ...]
    train_curve: list[float]
    heldout: dict
    allocation_probe: dict | None
    seconds: float


def fit_heads(qs_train: QuerySet, qs_held: QuerySet, spec_for, budget_params: int, cfg: FitConfig,
              doc_kv: list | None = None, progress: bool = True) -> FitResult:
    """Choose widths (uniform or adaptive), build, initialize and train all heads."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    num_layers = len(qs_train.q)
    device = qs_train.q[0].device
    widths = uniform_widths(spec_for, num_layers, budget_params, cfg.width_multiple)
    probe = None
    if cfg.allocation == "adaptive":
        heads, data = build_heads(spec_for(widths), qs_train, cfg, doc_kv, device)
        train_heads(heads, data, cfg, cfg.probe_steps, desc="allocation probe", progress=progress)
        errs = layer_errors(heads, qs_held)
        key = "o_rel_error_weighted" if cfg.weighting == "share" else "o_rel_error"
        widths = adaptive_widths(spec_for, errs[key], budget_params, cfg.width_multiple)
        probe = {"uniform_widths": list(uniform_widths(spec_for, num_layers, budget_params, cfg.width_multiple)),
                 "errors": errs[key]}
    torch.manual_seed(cfg.seed)
    heads, data = build_heads(spec_for(widths), qs_train, cfg, doc_kv, device)
    curve = train_heads(heads, data, cfg, cfg.steps, progress=progress)
    heads.eval()
    return FitResult(heads, widths, curve, layer_errors(heads, qs_held), probe, time.time() - t0)
