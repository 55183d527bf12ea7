"""Tiny random HF models of each family, saved as HF directories (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def tiny_hf_configs():
    import transformers as T

    return {
        "llama": T.LlamaConfig(**_COMMON, tie_word_embeddings=True),
        "llama3-scaled": T.LlamaConfig(**_COMMON, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}),
        "qwen2": T.Qwen2Config(**_COMMON, tie_word_embeddings=False),
        "qwen3": T.Qwen3Config(**_COMMON, tie_word_embeddings=True),
        "gemma3": T.Gemma3TextConfig(**{**_COMMON, "num_hidden_layers": 7}, sliding_window=8,
                                     query_pre_attn_scalar=24),
    }


def save_tiny(name: str, out: Path, seed: int = 0) -> Path:
    """Build the tiny model `name` with random weights (norms randomized too) and save it."""
    import transformers as T

    torch.manual_seed(seed)
    cfg = tiny_hf_configs()[name]
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))  # not the init value, so a dropped offset shows
    model.save_pretrained(out)
    return out
