"""ModelConfig: one frozen description of a decoder, built from GGUF metadata or an HF config.json.

Families differ by capability flags here (qk_norm, sandwich_norms, embed_scale, ...), not by
architecture-name checks scattered through the model code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from nectar_runtime.errors import NectarError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type. `kind`: "default" | "llama3" | "linear"."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "llama3", "linear"):
            raise NectarError(f"unsupported RoPE scaling type {self.kind!r}: use default, llama3 or linear")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and family flags of a decoder.

    `family` picks the block implementation ("llama" covers Llama, SmolLM2, Qwen2/2.5, Qwen3;
    "gemma3" is Gemma 3). `layer_windows[i]` is the sliding window of layer i, or 0 for global.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None  # sliding-window layers (Gemma 3)
    layer_windows: tuple[int, ...] = ()
    attention_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # extra post-attention / post-MLP norms (Gemma 3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + w): 1.0 for Gemma
    embed_scale: bool = False  # multiply embeddings by sqrt(hidden_size) (Gemma)
    activation: str = "silu"  # "silu" | "gelu_tanh"
    attn_scale: float | None = None  # None -> head_dim ** -0.5
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise NectarError(f"unsupported model family {self.family!r}: supported are {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise NectarError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise NectarError(f"unsupported activation {self.activation!r}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise NectarError("layer_windows must have one entry per layer")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def rope_for_layer(self, i: int) -> RopeConfig:
        return self.rope_local if (self.layer_windows[i] and self.rope_local) else self.rope

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


FAMILIES = ("llama", "gemma3")

# HF model_type / GGUF general.architecture -> family
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


def _family(arch: str, source: str) -> str:
    if arch not in ARCHITECTURES:
        raise NectarError(
            f"{source}: unsupported architecture {arch!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[arch]


def _rope_from_hf(p: dict | None, fallback_theta: float) -> RopeConfig:
    p = p or {}
    kind = p.get("rope_type", p.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(p.get("rope_theta", fallback_theta)),
        kind=kind,
        factor=float(p.get("factor", 1.0)),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position=int(p.get("original_max_position_embeddings", 8192)),
    )


def config_from_hf(path: Path) -> ModelConfig:
    """ModelConfig from an HF `config.json` (transformers 4.x `rope_theta/rope_scaling` or 5.x `rope_parameters`)."""
    try:
        c = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NectarError(f"{path}: cannot read config.json ({e}); pass an HF model directory") from None
    c = c.get("text_config", c)  # multimodal wrappers keep the decoder here
    arch = c.get("model_type", "")
    family = _family(arch, str(path))
    n_layers = int(c["num_hidden_layers"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    theta = float(c.get("rope_theta", 10000.0))
    rp = c.get("rope_parameters")
    common = dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        head_dim=head_dim,
        max_position=int(c.get("max_position_embeddings", 8192)),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", family == "gemma3")),
        bos_token_id=_first(c.get("bos_token_id")),
        eos_token_id=_first(c.get("eos_token_id")),
        name=str(c.get("_name_or_path", "")),
    )
    if family == "gemma3":
        types = c.get("layer_types") or [
            "full_attention" if (i + 1) % c.get("sliding_window_pattern", 6) == 0 else "sliding_attention"
            for i in range(n_layers)
        ]
        window = int(c.get("sliding_window") or 0)
        if rp and "full_attention" in rp:
            rope, rope_local = _rope_from_hf(rp["full_attention"], 1e6), _rope_from_hf(rp["sliding_attention"], 1e4)
        else:
            rope = _rope_from_hf(c.get("rope_scaling"), float(c.get("rope_theta", 1e6)))
            rope_local = RopeConfig(theta=float(c.get("rope_local_base_freq", 1e4)))
        return ModelConfig(
            family=family,
            **common,
            rope=rope,
            rope_local=rope_local,
            layer_windows=tuple(window if t == "sliding_attention" else 0 for t in types),
            attention_bias=bool(c.get("attention_bias", False)),
            qk_norm=True,
            sandwich_norms=True,
            norm_offset=1.0,
            embed_scale=True,
            activation="gelu_tanh",
            attn_scale=float(c.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        )
    rope = _rope_from_hf(rp, theta) if rp else _rope_from_hf(c.get("rope_scaling"), theta)
    # Qwen2 configs carry `sliding_window` with a `use_sliding_window` switch; Mistral's have no switch
    # and a window shorter than the context (4,096 in v0.1) is on
    window = int(c.get("sliding_window") or 0)
    if window and c.get("use_sliding_window", window < common["max_position"]):
        raise NectarError(f"{path}: sliding-window attention ({window} tokens) in a {arch} model is not supported; "
                          "use a model with global attention")
    return ModelConfig(
        family=family,
        **common,
        rope=rope,
        attention_bias=bool(c.get("attention_bias", arch == "qwen2")),
        qk_norm=arch == "qwen3",
    )


def _first(x):
    return x[0] if isinstance(x, list) and x else x


def config_from_gguf_metadata(meta: dict, source: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (llama.cpp key names), `meta` as plain Python values."""
    arch = meta.get("general.architecture", "")
    family = _family(arch, source)

    def get(key, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise NectarError(f"{source}: GGUF metadata lacks '{arch}.{key}'; the file is incomplete or not a decoder")
        return v

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    n_layers = int(get("block_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    n_kv = int(n_kv[0] if isinstance(n_kv, list) else n_kv)
    vocab = int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", [])))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    rope = RopeConfig(
        theta=float(get("rope.freq_base", 10000.0)),
        kind="linear" if scaling == "linear" else "default",
        factor=float(meta.get(f"{arch}.rope.scaling.factor", 1.0)),
    )
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position=int(get("context_length")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        name=str(meta.get("general.name", "")),
    )
    if family == "gemma3":
        window = int(get("attention.sliding_window"))
        pattern = 6
        return ModelConfig(
            family=family,
            **common,
            rope=rope,
            rope_local=RopeConfig(theta=10000.0),
            layer_windows=tuple(0 if (i + 1) % pattern == 0 else window for i in range(n_layers)),
            qk_norm=True,
            sandwich_norms=True,
            norm_offset=1.0,
            embed_scale=True,
            activation="gelu_tanh",
            attn_scale=head_dim**-0.5,
            tie_embeddings=True,
        )
    return ModelConfig(family=family, **common, rope=rope, attention_bias=False, qk_norm=arch == "qwen3")
