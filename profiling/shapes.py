"""Model shapes to profile without weights, and the profile's options (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("bf16", "fp16", "fp32")

# name -> ModelConfig keyword arguments (family llama). max_position is raised to fit long n.
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, rms_eps=1e-5, rope=dict(theta=100000.0), tie_embeddings=True),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, rms_eps=1e-5, tie_embeddings=True,
                        rope=dict(theta=500000.0, kind="llama3", factor=32.0, original_max_position=8192)),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rms_eps=1e-5, tie_embeddings=False,
                      rope=dict(theta=500000.0, kind="llama3", factor=8.0, original_max_position=8192)),
    "tiny": dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, rms_eps=1e-6, tie_embeddings=True),
}


@dataclass(frozen=True)
class ProfileConfig:
    model: str | None = None
    shape: str | None = "smollm2-135m"
    device: str = "cpu"
    backend: str = "torch"
    n: tuple[int, ...] = (1024, 8192, 32768, 131072)
    batch: tuple[int, ...] = (1, 16)
    dtype: str = "fp32"
    methods: tuple[str, ...] = ("nectar", "full")
    variant: str = "mlp"
    width: int = 256
    local_len: int = 64
    steps: int = 200
    warmup: int = 20
    bundles: tuple[str, ...] = ()  # --backend ort: exported bundles to time (each brings its method and n)
    threads: int | None = None  # --backend ort: CPU threads (default: all cores)
