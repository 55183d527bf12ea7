"""Weights from GGUF files (dequantized with `gguf`) and HF directories (config.json + safetensors);
a GGUF's quantization grids as well (read_gguf_weight_grids: what quantized exports keep exactly).

Each source maps its tensor names onto ours through a declarative table; every expected key must
be present exactly once with the expected shape, and no tensor may be left over.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nectar_runtime.errors import NectarError

from .config import ModelConfig, config_from_gguf_metadata, config_from_hf
from .gguf_grids import QuantGrid, read_gguf_grids
from .llama import Decoder
from .registry import DECODERS

# GGUF (llama.cpp) per-block tensor names -> ours, per family. "{i}" is the block index.
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_BLOCK_NAMES = {
    "llama": {**_GGUF_BLOCK, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_GGUF_BLOCK,
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
GGUF_TOP_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# llama.cpp stores Gemma norm weights as (1 + w); our RMSNorm adds the 1 itself.
GGUF_NORM_SHIFT = {"llama": 0.0, "gemma3": 1.0}
# llama.cpp permutes q/k rows of Llama-architecture files for its RoPE layout; undo it.
GGUF_PERMUTED_QK = {"llama"}


@dataclass(frozen=True)
class LoadedModel:
    """A decoder with where it came from: `weights_sha256` identifies the exact weights."""

    model: Decoder
    config: ModelConfig
    path: Path
    weights_sha256: str
    source_format: str  # "gguf" | "hf"


def file_sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """A .gguf file or an HF directory -> LoadedModel (eval mode, on `device`, in `dtype`)."""
    p = Path(path)
    if p.is_dir():
        cfg, state, files = _read_hf(p)
        fmt = "hf"
    elif p.is_file():
        cfg, state = read_gguf(p)
        files, fmt = [p], "gguf"
    else:
        raise NectarError(f"{p}: no such file or directory; pass a .gguf file, an HF model directory or a model name")
    model = build_model(cfg, state, str(p))
    model = model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, cfg, p, file_sha256(files), fmt)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Skip the modules' random initialization while they are built on the meta device (the file's
    tensors replace every parameter): on meta tensors it runs through torch._refs, whose first use
    imports torch._dynamo, ~1 s on this repo's CPU (more on a cold file cache) for nothing."""

    SKIP = frozenset({"normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in self.SKIP:
            t = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(t, torch.Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str) -> Decoder:
    """Instantiate the family's decoder and load `state` strictly (keys and shapes)."""
    with torch.device("meta"), _SkipInit():
        model = DECODERS[cfg.family](cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise NectarError(
            f"{source}: weights do not match a {cfg.family} model "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'…' if len(extra) > 3 else ''})"
        )
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise NectarError(f"{source}: tensor {k} has shape {tuple(state[k].shape)}, expected {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for block in model.layers:  # built on meta: recompute the (non-weight) RoPE tables
        block.self_attn.init_rope()
    return model


# ---------------------------------------------------------------- GGUF


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config from the metadata and dequantized fp32 tensors under our names."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    from nectar_runtime.gguf_metadata import read_gguf_tensor_table

    meta, table = read_gguf_tensor_table(path)  # our struct walk: gguf.GGUFReader takes ~2 s here
    meta = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}
    cfg = config_from_gguf_metadata(meta, str(path))
    names = {t.name for t in table}
    cfg = cfg.with_(
        tie_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
    )
    block_names = GGUF_BLOCK_NAMES[cfg.family]
    shift = GGUF_NORM_SHIFT[cfg.family]
    permute = meta.get("general.architecture") in GGUF_PERMUTED_QK
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint8, mode="r")
    state = {}
    for t in table:
        if t.offset + t.n_bytes > size:
            raise NectarError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end); re-download it")
        ours = _gguf_name(t.name, block_names)
        if ours is None:
            raise NectarError(f"{path}: unexpected tensor {t.name!r} for a {cfg.family} model")
        qtype = GGMLQuantizationType(t.ggml_type)
        rows = int(np.prod(t.dims[1:]))  # bytes as [rows, row bytes], the layout dequantize expects
        try:
            arr = dequantize(data[t.offset : t.offset + t.n_bytes].reshape(rows, -1), qtype)
        except Exception as e:
            raise NectarError(f"{path}: cannot dequantize {t.name} ({qtype.name}: {e})") from None
        arr = np.array(arr, dtype=np.float32).reshape(tuple(reversed(t.dims)))
        if shift and ours.endswith("norm.weight"):
            arr = arr - shift
        if permute and (".q_proj." in ours or ".k_proj." in ours):
            heads = cfg.num_heads if ".q_proj." in ours else cfg.num_kv_heads
            arr = _unpermute_qk(arr, heads)
        state[ours] = torch.from_numpy(arr)
    return cfg, state


def read_gguf_weight_grids(path: Path) -> dict[str, QuantGrid]:
    """{our name: QuantGrid} of the GGUF's 2-D weights that carry a quantization grid (gguf_grids.py),
    rows in our order (llama's q/k permutation undone, as read_gguf does for the floats)."""
    from nectar_runtime.gguf_metadata import read_gguf_tensor_table

    meta, table = read_gguf_tensor_table(path)
    cfg = config_from_gguf_metadata({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in meta.items()}, str(path))
    block_names = GGUF_BLOCK_NAMES[cfg.family]
    names = {t.name: ours for t in table if (ours := _gguf_name(t.name, block_names)) is not None}
    grids = read_gguf_grids(path, names, table)
    if meta.get("general.architecture") in GGUF_PERMUTED_QK:
        for ours, grid in grids.items():
            if ".q_proj." in ours or ".k_proj." in ours:
                heads = cfg.num_heads if ".q_proj." in ours else cfg.num_kv_heads
                grids[ours] = grid.rows(_unpermute_qk(np.arange(grid.shape[0]), heads))
    return grids


def _gguf_name(name: str, block_names: dict[str, str]) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        base = block_names.get(m.group(2))
        return f"layers.{m.group(1)}.{base}.{m.group(3)}" if base else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows [heads, 2, D/2] interleaved back to [heads, D/2·2]."""
    d2 = w.shape[0] // heads // 2
    return w.reshape(heads, d2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- HF directories

_HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _read_hf(d: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], list[Path]]:
    from safetensors import safe_open

    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise NectarError(f"{d}: no config.json; pass an HF model directory (config.json + *.safetensors)")
    cfg = config_from_hf(cfg_path)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise NectarError(f"{d}: no *.safetensors weights (pickled .bin weights are not loaded, for safety)")
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    state[_hf_name(k)] = sf.get_tensor(k).float()
        except Exception as e:
            raise NectarError(f"{f}: unreadable safetensors file ({e})") from None
    if "lm_head.weight" in state and cfg.tie_embeddings:
        if torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]):
            del state["lm_head.weight"]
        else:
            cfg = cfg.with_(tie_embeddings=False)
    return cfg, state, files


def _hf_name(k: str) -> str:
    for p in _HF_PREFIXES:
        if k.startswith(p):
            return k[len(p) :]
    return k
