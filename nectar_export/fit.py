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

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .collect import QuerySet
from .config import WEIGHT_FLOOR, FitConfig
from .heads import HeadsSpec, NectarHeads

class ModuleData:
    """Training tensors re-laid out per width group: [M_g, S, ...] with S = tokens × G samples; q and
    o keep the QuerySet's storage dtype (fp16 by default) and are cast per minibatch."""

    def __init__(self, qs: QuerySet, layers: list[int]):
        def stack(xs):  # [N, Hkv, G, ...] per layer -> [L*Hkv, N*G, ...]
            # filled layer by layer: no [L, N, Hkv, G, ...] intermediate, whose copy would double the
            # peak memory of the largest tensors of a fit (the queries and targets of every layer)
            n, hkv, g, *rest = xs[layers[0]].shape
            out = torch.empty(len(layers) * hkv, n * g, *rest, dtype=xs[layers[0]].dtype, device=xs[layers[0]].device)
            for i, l in enumerate(layers):
                out[i * hkv : (i + 1) * hkv] = xs[l].transpose(0, 1).reshape(hkv, n * g, *rest)
            return out

        self.q, self.o, lse = stack(qs.q), stack(qs.o), stack(qs.lse)
        # A sliding-window layer's query past the window sees no document key (o = 0, lse = −inf):
        # nothing to learn there (at inference the context part is switched off by position,
        # heads.NectarContext), so such samples get weight 0 and a finite placeholder target.
        self.seen = torch.isfinite(lse)  # [M, S]
        self.lse = torch.where(self.seen, lse, torch.zeros_like(lse))
        self.share = torch.sigmoid(lse - stack(qs.lse_loc))  # 0 where unseen

    def weights(self, rows: torch.Tensor | slice, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
        w, seen = self.share[:, rows], self.seen[:, rows].to(self.share.dtype)
        if weighting == "none":
            return seen, seen
        return (w.square() + WEIGHT_FLOOR) * seen, (w * (1 - w) + WEIGHT_FLOOR) * seen


@torch.no_grad()
def init_statistics(heads: NectarHeads, data: list[ModuleData], doc_kv: list | None, chunk: int = 8) -> None:
    """Standardization statistics (mlp) or document-key initialization (quadrature).

    Per module, in chunks of `chunk` modules: the centred and squared temporaries of the whole
    training set at once would add twice its size to the fit's peak memory."""
    for gi, (group, d) in enumerate(zip(heads.groups, data)):
        if heads.spec.variant == "mlp":
            for a in range(0, d.q.shape[0], chunk):
                sl = slice(a, min(d.q.shape[0], a + chunk))
                q, o, lse = d.q[sl].float(), d.o[sl].float(), d.lse[sl]  # stored fp16 by default
                q_mean = q.mean(1, keepdim=True)
                group.q_mean[sl] = q_mean
                group.q_std[sl] = (q - q_mean).square().mean((1, 2), keepdim=True).sqrt().clamp_min(1e-4)
                seen = d.seen[sl].to(o.dtype)[..., None]  # targets over the samples that see the document
                count = seen.sum(1, keepdim=True).clamp_min(1)  # [c, 1, 1]
                o_mean = (o * seen).sum(1, keepdim=True) / count
                group.o_mean[sl] = o_mean
                group.o_std[sl] = ((((o - o_mean) * seen).square().sum(1, keepdim=True) / count).mean(2, keepdim=True)
                                   .sqrt().clamp_min(1e-4))
                l_mean = (lse * seen[..., 0]).sum(1, keepdim=True) / count[..., 0]
                l_var = ((lse - l_mean) * seen[..., 0]).square().sum(1, keepdim=True) / (count[..., 0] - 1).clamp_min(1)
                group.l_mean[sl] = l_mean
                group.l_std[sl] = l_var.sqrt().clamp_min(1e-3)
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
        x = (d.q[sl].float() - group.q_mean[sl]) / group.q_std[sl]  # [c, S, D]
        y = (d.o[sl].float() - group.o_mean[sl]) / group.o_std[sl]  # [c, S, D]
        w = weight[sl] / weight[sl].mean(1, keepdim=True).clamp_min(1e-12)  # [c, S]; all-zero: a module no sample reaches
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
    o_hat, l_hat = heads.forward_group(gi, d.q[:, rows].float())
    o_hat, l_hat = o_hat.float(), l_hat.float()  # losses in fp32 (under bf16 autocast too)
    o, lse = d.o[:, rows].float(), d.lse[:, rows]
    wo, wl = d.weights(rows, weighting)
    err = (o_hat - o).square().sum(-1)  # [M, S]
    rel = (wo * err).sum(1) / (wo * o.square().sum(-1)).sum(1).clamp_min(1e-12)
    # a sliding-window module's minibatch may hold no sample that sees the document: weight 0, loss 0
    lmse = (wl * (l_hat - lse).square()).sum(1) / wl.sum(1).clamp_min(1e-12)
    return rel, lmse


def train_dtype(name: str, device: torch.device) -> torch.dtype:
    """The matmul dtype of training: "auto" is bfloat16 where the device has bf16 matmuls (CUDA with
    bf16; CPUs where oneDNN has them: AVX-512, natively with AVX512-BF16/AMX), else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def draw_rows(cfg: FitConfig, n_samples: int, steps: int) -> torch.Tensor:
    """[steps, batch] sample rows of every step, drawn in order from one seeded CPU generator: the
    same rows on CPU and GPU, eager or graphed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    b = min(cfg.batch, n_samples)
    return torch.stack([torch.randint(0, n_samples, (b,), generator=gen) for _ in range(steps)])


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 0 at `steps`."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def use_graph(device: torch.device) -> bool:
    """Training steps run as one replayed CUDA graph on CUDA (NECTAR_FIT_GRAPH=0: eager)."""
    return device.type == "cuda" and os.environ.get("NECTAR_FIT_GRAPH", "1") != "0"


def train_heads(heads: NectarHeads, data: list[ModuleData], cfg: FitConfig, steps: int, desc: str = "train heads",
                progress: bool = True, graph: bool | None = None) -> list[float]:
    """One optimisation over all modules of all groups (Adam, warmup + cosine). Returns loss curve.

    Parameters, optimizer state and losses are fp32; with bfloat16 `cfg.train_dtype` the matmuls of
    the forward and backward run under autocast (weights are stored as fp16 in the artifact anyway).
    On CUDA (`graph` None: `use_graph`) the whole step runs as one CUDA graph (`train_heads_graphed`);
    elsewhere eagerly, one step at a time. Both draw the same rows (`draw_rows`)."""
    dev = data[0].q.device
    if graph if graph is not None else use_graph(dev):
        return train_heads_graphed(heads, data, cfg, steps, desc, progress)
    dtype = train_dtype(cfg.train_dtype, dev)
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, steps))
    all_rows = draw_rows(cfg, data[0].q.shape[1], steps)
    curve = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for i in bar:
        rows = all_rows[i].to(dev)
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


def train_heads_graphed(heads: NectarHeads, data: list[ModuleData], cfg: FitConfig, steps: int,
                        desc: str = "train heads", progress: bool = True, capture: bool | None = None,
                        warmup_steps: int = 2) -> list[float]:
    """`train_heads` with no host work per step: every step's rows and learning rate sit in device
    tables read at a device step counter, Adam is one fused kernel (`FusedAdam`) with a tensor learning
    rate, and the loss curve stays on the device (read every `_BAR_EVERY` steps for the bar). On CUDA
    (`capture` None) the first `warmup_steps` steps run eagerly on a side stream (real steps, which
    also set up autograd's and cuBLAS's lazy state off the capture stream), then one step (forward,
    backward, Adam) is captured as a CUDA graph and replayed for the rest. The same math as the eager
    loop; Adam's fused kernel and the fp32 learning rate round differently (grep on the H100: loss
    curves within 1.7e-3 relative, the same held-out error to 4 digits; docs/benchmarks.md)."""
    dev = data[0].q.device
    cuda = dev.type == "cuda"
    capture = cuda if capture is None else capture
    dtype = train_dtype(cfg.train_dtype, dev)
    norm = heads.spec.num_layers * heads.spec.kv_heads
    all_rows = draw_rows(cfg, data[0].q.shape[1], steps).to(dev)
    lr_table = torch.tensor([cfg.lr * lr_factor(s, cfg.warmup, steps) for s in range(steps)], dtype=torch.float32,
                            device=dev)
    it = torch.zeros(1, dtype=torch.long, device=dev)  # the step counter, advanced by the step itself
    lr = lr_table[:1].clone()
    opt = FusedAdam(list(heads.parameters()), lr)
    curve = torch.zeros(steps, dtype=torch.float32, device=dev)

    def step():
        rows = all_rows.index_select(0, it)[0]
        lr.copy_(lr_table.index_select(0, it))
        total = None
        for gi, d in enumerate(data):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
                rel, lmse = group_losses(heads, gi, d, rows, cfg.weighting)
            total = (rel.sum() if total is None else total + rel.sum()) + cfg.lse_weight * lmse.sum()  # eager's order
        total.backward()
        opt.step()
        curve.index_copy_(0, it, (total.detach() / norm).view(1))
        it.add_(1)

    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress)

    def report(done: int) -> None:
        if progress and done > bar.n:
            bar.update(done - bar.n)
            if done >= 25:
                bar.set_postfix(loss=f"{curve[done - 25 : done].mean().item():.4f}")

    eager = min(steps, warmup_steps) if capture else steps
    side = torch.cuda.Stream() if capture else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for i in range(eager):
            opt.zero_grad(set_to_none=True)
            step()
            if not capture and (i + 1) % _BAR_EVERY == 0:
                report(i + 1)
    if side is not None:
        torch.cuda.current_stream().wait_stream(side)
    if eager < steps:
        g = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(g):
            step()
        for i in range(eager, steps):
            g.replay()
            if (i + 1) % _BAR_EVERY == 0:
                report(i + 1)
        opt.zero_grad(set_to_none=True)  # the graph's gradient buffers: the heads keep no grads
    report(steps)
    bar.close()
    return curve.tolist()


class FusedAdam:
    """Adam with torch.optim.Adam's defaults (betas 0.9, 0.999, eps 1e-8, no weight decay) as one
    `torch._fused_adam_` call over all parameters: the kernel of `torch.optim.Adam(fused=True,
    capturable=True)` (the same results, tests/export/test_fit.py), state and step counts on the
    parameters' device, `lr` a 1-element tensor read by the kernel (capturable in a CUDA graph).
    Without torch.optim's wrapper, whose first step imports torch._dynamo (~1 s on this repo's CPU;
    nothing else in a CUDA `nectar fit` imports it)."""

    def __init__(self, params: list[torch.Tensor], lr: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        pick = lambda xs: [xs[i] for i in live]  # noqa: E731
        steps = pick(self.steps)
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(pick(self.params), [self.params[i].grad for i in live], pick(self.exp_avg),
                           pick(self.exp_avg_sq), [], steps, amsgrad=False, lr=self.lr, beta1=self.betas[0],
                           beta2=self.betas[1], weight_decay=0.0, eps=self.eps, maximize=False, grad_scale=None,
                           found_inf=None)


_BAR_EVERY = 200  # graphed training reads its loss curve (one sync) this often


@torch.no_grad()
def heldout_chunk(heads: NectarHeads, qs: QuerySet, layer: int, rows: slice):
    """One layer's predictions next to the recorded targets for the query rows `rows`, laid out per
    module: o_hat, o [Hkv, S, D]; l_hat, lse, share [Hkv, S] (S = rows × G, fp32)."""
    q = qs.q[layer][rows].float()  # [N, Hkv, G, D]
    n, hkv, g, d = q.shape
    o_hat, l_hat = heads.forward_layer(layer, q.permute(1, 0, 2, 3).reshape(hkv, n * g, d))
    o = qs.o[layer][rows].float().permute(1, 0, 2, 3).reshape(hkv, n * g, d)
    lse = qs.lse[layer][rows].permute(1, 0, 2).reshape(hkv, n * g)
    share = torch.sigmoid(lse - qs.lse_loc[layer][rows].permute(1, 0, 2).reshape(hkv, n * g))
    return o_hat, l_hat, o, lse, share


def layer_errors(heads: NectarHeads, qs: QuerySet, chunk: int = 8192) -> dict[str, list[float]]:
    """Held-out fidelity per layer: relative o error, share-weighted relative o error, lse MAE.
    The per-chunk sums stay on the device until one transfer at the end (summed on the host in
    float64, chunk by chunk, as before)."""
    spec = heads.spec
    sums = []  # per layer: per chunk [6] (e, o², share²·e, share²·o², |lse error|, samples scored)
    for layer in range(spec.num_layers):
        parts = []
        for s in range(0, qs.n, chunk):
            o_hat, l_hat, o, lse, share = heldout_chunk(heads, qs, layer, slice(s, s + chunk))
            seen = torch.isfinite(lse)  # past a sliding window no document key is seen: not scored
            e = torch.where(seen, (o_hat - o).square().sum(-1), 0.0)
            o2 = torch.where(seen, o.square().sum(-1), 0.0)
            parts.append(torch.stack([e.sum(), o2.sum(), (share.square() * e).sum(), (share.square() * o2).sum(),
                                      torch.where(seen, (l_hat - lse).abs(), 0.0).sum(), seen.sum().float()]))
        sums.append(torch.stack(parts) if parts else torch.zeros(0, 6, device=qs.q[layer].device))
    host = [x.tolist() for x in torch.cat(sums).cpu().split([len(x) for x in sums])]
    rel, wrel, lmae = [], [], []
    for per_chunk in host:
        num = den = wnum = wden = labs = count = 0.0
        for e, o2, we, wo2, la, c in per_chunk:
            num, den, wnum, wden, labs, count = num + e, den + o2, wnum + we, wden + wo2, labs + la, count + c
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
              doc_kv: list | None = None, progress: bool = True, retarget=None) -> FitResult:
    """Choose widths (uniform or adaptive), build, initialize and train all heads.

    `retarget(probe_heads, qs_train, qs_held) -> (qs_train, qs_held)`: called once with the heads of a
    short probe fit (the adaptive allocation's, or one of `probe_steps` at uniform widths) to replace
    the sets the final fit trains and is scored on (retained heads under a token budget: their
    networks serve only the tokens not kept)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    num_layers = len(qs_train.q)
    device = qs_train.q[0].device
    cfg = cfg.for_device(device.type)
    widths = uniform = uniform_widths(spec_for, num_layers, budget_params, cfg.width_multiple)
    probe = None
    if cfg.allocation == "adaptive" or retarget is not None:
        heads, data = build_heads(spec_for(widths), qs_train, cfg, doc_kv, device)
        train_heads(heads, data, cfg, cfg.probe_steps, desc="allocation probe", progress=progress)  # ≤ steps: for_device
        if cfg.allocation == "adaptive":
            errs = layer_errors(heads, qs_held)
            key = "o_rel_error_weighted" if cfg.weighting == "share" else "o_rel_error"
            widths = adaptive_widths(spec_for, errs[key], budget_params, cfg.width_multiple)
            probe = {"uniform_widths": list(uniform), "errors": errs[key]}
        del data  # the probe's copy of the training data must go before the final one is built
        if retarget is not None:
            qs_train, qs_held = retarget(heads.eval(), qs_train, qs_held)
        del heads
    torch.manual_seed(cfg.seed)
    heads, data = build_heads(spec_for(widths), qs_train, cfg, doc_kv, device)
    curve = train_heads(heads, data, cfg, cfg.steps, progress=progress)
    heads.eval()
    return FitResult(heads, widths, curve, layer_errors(heads, qs_held), probe, time.time() - t0)
