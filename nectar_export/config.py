"""Fitting options as plain dataclasses, importable without torch (the CLI builds from them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

VARIANTS = ("mlp", "quadrature")
ALLOCATIONS = ("uniform", "adaptive")
WEIGHT_FLOOR = 0.02
QUERY_DTYPES = ("float16", "float32")
RETAIN_DTYPES = ("int8", "float16")  # storage of retained heads' document KV (retained.py)
# Defaults that depend on the device a fit runs on (None in FitConfig / `nectar fit --probe-scale`).
# On a GPU: 4,800 steps of 1,024 samples per module and the full probe set (the quality of
# docs/results.md's defaults table). On a CPU, so that a ~4K-token manual fits within 15 minutes on
# 2 AVX2 cores (fp32 matmuls): half the probes and an eighth of the training samples (1,200 steps of
# 512). Measured on ten manuals with the retained-heads default (H100 standing in, fp32 training):
# agreement 0.962-0.977, KL 0.004-0.037, semantic similarity >= 0.90 on 3 of 10 (GPU defaults: 0.973-0.991,
# 0.0025-0.0117, 8 of 10; docs/results.md, "The CPU defaults against the targets").
DEFAULT_STEPS = {"cuda": 4800, "cpu": 1200}
DEFAULT_BATCH = {"cuda": 1024, "cpu": 512}
DEFAULT_PROBE_SCALE = {"cuda": 1.0, "cpu": 0.5}  # ProbeConfig.scaled factor when `nectar fit` gets none
AUTO_RETAIN_SHARE = 0.2  # of the retainable KV heads, for --retain-heads auto
AUTO_RETAIN_MAX_BUDGET = 0.5  # auto keeps at least this share of the budget for the networks
# The default budget (budget_fraction of the fp16 KV) counts at most BUDGET_TOKENS tokens, so the artifact, and
# with it the decode cost, stops growing past a 4,096-token document. --retain-tokens auto keeps every document
# token of the retained heads up to the same count (`budget_tokens` when set otherwise). Since 2026-11-25 (docs/results.md, "Every token of the
# retained heads, under a capped budget"): on six ~7K-token documents the cap with 4,096 retained tokens gave
# lower KL than the uncapped 45%-of-n rule on all six, at about half the artifact bytes; keeping every token
# (up to 4,096) raised exact match on the manuals. Before: 2,048 or 45% of n, and no cap.
BUDGET_TOKENS = 4096
AUTO_RETAIN_TOKENS = BUDGET_TOKENS


@dataclass(frozen=True)
class FitConfig:
    variant: str = "mlp"
    allocation: str = "adaptive"  # beat uniform on 6/6 manuals in KL (docs/results.md)
    budget_fraction: float = 0.24  # of the fp16 KV bytes of the first budget_tokens tokens, unless budget_mb is set (≤ 25%: issue 3)
    budget_mb: float | None = None
    # the default budget counts at most this many tokens' KV (BUDGET_TOKENS); 0: every token of the document
    budget_tokens: int = BUDGET_TOKENS
    steps: int | None = None  # None: DEFAULT_STEPS of the device the fit runs on (`for_device`)
    batch: int | None = None  # samples (query vectors) per module per step; None: DEFAULT_BATCH of the device
    lr: float = 2e-3
    warmup: int = 50
    weighting: str = "share"  # "share" | "none"
    lse_weight: float = 0.5
    probe_steps: int = 150  # short fit that decides the adaptive allocation
    width_multiple: int = 16
    train_dtype: str = "auto"  # "auto" (bf16 where the device has bf16 matmuls) | "bfloat16" | "float32": matmuls while training
    # Storage of the recorded queries and attention outputs (the largest part of a fit's memory; lse stays fp32).
    # fp16 rounds normal values by ≤ 2^-11 relative, far below the heads' ~0.15 error, at half the memory.
    query_dtype: str = "float16"  # "float16" | "float32"
    linear_init: bool = True  # skip + output bias start at the weighted least-squares linear fit
    # End-to-end KL fine-tuning of all heads after the per-module fit (distill.py). Off by default:
    # on the development manuals it did not lower the held-out KL (docs/results.md).
    distill_steps: int = 0
    distill_lr: float = 1e-4
    distill_tokens: int = 4096  # probe tokens (batch × longest probe) per distillation step
    # KV heads whose document keys/values the artifact keeps (retained.py): the ones the heads serve
    # worst. Their bytes count in the budget. Every backend serves them (torch, the fused CUDA step, ONNX,
    # TensorRT graphs with one NectarRetainedAttention plugin node per such layer). None = auto (`auto_retain_heads`):
    # AUTO_RETAIN_SHARE of the KV heads of global-attention layers, rounded down (18 on SmolLM2: agreement
    # 0.949-0.969 -> 0.973-0.991 on ten manuals, docs/results.md; +3-10% CPU decode time at n = 7,000 since
    # quantized bundles read their int8 KV through MatMulNBits, docs/benchmarks.md); none where the fit
    # cannot retain (quadrature, distillation, on-policy) or fewer than one head would result.
    retain_heads: int | None = None
    # "int8" (+ an fp16 scale per token and head: about half the bytes, so the budget holds larger networks;
    # on the six manuals 18 int8 heads beat 18 fp16 heads, docs/results.md) | "float16"
    retain_dtype: str = "int8"
    # Per retained head, keep only this many document tokens (0: all n): the ones the training probes'
    # queries weigh most (retained.select_tokens); the head's network serves the others. Decode then reads
    # retain_heads·retain_tokens stored keys per token. None = auto (`auto_retain_tokens`): every token up
    # to budget_tokens (4,096), so decode reads at most 18 × 4,096 stored keys per token on SmolLM2.
    retain_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS} (got {self.variant!r})")
        if self.warmup < 1 or self.probe_steps < 1:
            raise ValueError(f"warmup and probe_steps must be ≥ 1 (got {self.warmup}, {self.probe_steps})")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}")
        if self.weighting not in ("share", "none"):
            raise ValueError("weighting must be 'share' or 'none'")
        if self.train_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError("train_dtype must be 'auto', 'bfloat16' or 'float32'")
        if self.query_dtype not in QUERY_DTYPES:
            raise ValueError(f"query_dtype must be one of {QUERY_DTYPES}")
        for name in ("steps", "batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1 (got {getattr(self, name)})")
        for name in ("lr", "distill_lr"):  # NaN fails `> 0` too
            if not (0 < getattr(self, name) < math.inf):
                raise ValueError(f"{name} must be a positive number (got {getattr(self, name)})")
        if self.distill_steps < 0:
            raise ValueError(f"distill_steps must be ≥ 0 (got {self.distill_steps})")
        if self.distill_tokens < 1:
            raise ValueError(f"distill_tokens must be ≥ 1 (got {self.distill_tokens})")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32) (got {self.seed})")
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise ValueError(f"budget_mb must be positive (got {self.budget_mb}); leave it out to use budget_fraction")
        if self.retain_heads is not None and self.retain_heads < 0:
            raise ValueError(f"retain_heads must be ≥ 0 or auto (got {self.retain_heads})")
        if self.budget_tokens < 0:
            raise ValueError(f"budget_tokens must be ≥ 0 (got {self.budget_tokens}; 0 counts every document token)")
        if self.retain_tokens is not None and self.retain_tokens < 0:
            raise ValueError(f"retain_tokens must be ≥ 0 or auto (got {self.retain_tokens}; 0 keeps every document token)")
        if self.retain_dtype not in RETAIN_DTYPES:
            raise ValueError(f"retain_dtype must be 'float16' or 'int8' (got {self.retain_dtype!r})")
        if self.retain_heads and self.distill_steps:
            raise ValueError("retain_heads with distill_steps: distillation would tune the networks of heads that "
                             "are then replaced; use one or the other")
        if self.retain_heads and self.variant != "mlp":
            raise ValueError("retain_heads needs the mlp variant (quadrature heads have no retained-head path)")
        if not 0 < self.budget_fraction <= 4:  # NaN fails this too
            raise ValueError("budget_fraction must be in (0, 4]")

    def auto_retain_tokens(self, n_doc: int) -> "FitConfig":
        """This config with `retain_tokens` resolved for a document of `n_doc` tokens: unchanged if set,
        else every token up to the budget's token count (`budget_tokens`; AUTO_RETAIN_TOKENS when that is 0)."""
        if self.retain_tokens is not None:
            return self
        return replace(self, retain_tokens=min(n_doc, self.budget_tokens or AUTO_RETAIN_TOKENS))

    def auto_retain_heads(self, eligible: int, head_bytes: int, budget_bytes: float, on_policy: bool = False) -> "FitConfig":
        """This config with `retain_heads` resolved: unchanged if set, else AUTO_RETAIN_SHARE of the
        `eligible` KV heads (global-attention layers) rounded down, as many as keep their `head_bytes`
        each within AUTO_RETAIN_MAX_BUDGET of `budget_bytes`; 0 where retention does not apply (a
        quadrature variant, distillation, an on-policy refit)."""
        if self.retain_heads is not None:
            return self
        k = 0 if self.variant != "mlp" or self.distill_steps or on_policy else int(AUTO_RETAIN_SHARE * eligible)
        if head_bytes > 0:
            k = min(k, int(AUTO_RETAIN_MAX_BUDGET * budget_bytes // head_bytes))
        return replace(self, retain_heads=max(k, 0))

    def for_device(self, device_type: str) -> "FitConfig":
        """This config with `steps` and `batch` resolved (None -> DEFAULT_STEPS / DEFAULT_BATCH of
        device_type, CPU's for other devices) and `probe_steps` at most `steps`."""
        kind = device_type if device_type in DEFAULT_STEPS else "cpu"
        steps = self.steps or DEFAULT_STEPS[kind]
        # the allocation probe is never longer than the fit itself: a quick `--steps 40` stays quick
        return replace(self, steps=steps, batch=self.batch or DEFAULT_BATCH[kind], probe_steps=min(self.probe_steps, steps))

    def to_dict(self) -> dict:
        return asdict(self)


def default_probe_scale(device_type: str) -> float:
    """The probe-count factor `nectar fit` uses on `device_type` when --probe-scale is not given."""
    return DEFAULT_PROBE_SCALE.get(device_type, DEFAULT_PROBE_SCALE["cpu"])
