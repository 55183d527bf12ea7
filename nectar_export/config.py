"""Fitting options as plain dataclasses, importable without torch (the CLI builds from them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

VARIANTS = ("mlp", "quadrature")
ALLOCATIONS = ("uniform", "adaptive")
WEIGHT_FLOOR = 0.02


@dataclass(frozen=True)
class FitConfig:
    variant: str = "mlp"
    allocation: str = "adaptive"  # beat uniform on 6/6 manuals in KL (docs/results.md)
    budget_fraction: float = 0.20  # of the document's fp16 KV bytes, unless budget_mb is set
    budget_mb: float | None = None
    steps: int = 2400  # bf16 training makes 2,400 steps cost what 1,200 fp32 steps did (docs/results.md)
    batch: int = 1024  # samples (query vectors) per module per step
    lr: float = 2e-3
    warmup: int = 50
    weighting: str = "share"  # "share" | "none"
    lse_weight: float = 0.5
    probe_steps: int = 150  # short fit that decides the adaptive allocation
    width_multiple: int = 16
    train_dtype: str = "auto"  # "auto" (bf16 where native) | "bfloat16" | "float32": matmuls while training
    linear_init: bool = True  # skip + output bias start at the weighted least-squares linear fit
    seed: int = 0

    def __post_init__(self):
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}")
        if self.weighting not in ("share", "none"):
            raise ValueError("weighting must be 'share' or 'none'")
        if self.train_dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError("train_dtype must be 'auto', 'bfloat16' or 'float32'")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps, batch and lr must be positive")
        if not 0 < self.budget_fraction <= 4:
            raise ValueError("budget_fraction must be in (0, 4]")

    def to_dict(self) -> dict:
        return asdict(self)
