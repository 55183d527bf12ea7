"""StreamingLLM as a baseline method: keep a few "attention sink" tokens plus the most recent ones.

A StreamingLLM cache of the document keeps its first `sinks` tokens and its last
`n_keep - sinks` tokens, at their original positions. Cached keys are post-RoPE, so the subset
is plain indexing of k, v and positions; the result is again an `ExactContextAttention` per
layer, usable wherever the full context is. Comparing at equal memory: `kv_bytes` is the size of
an n-token fp16 cache, `streaming_tokens_for_bytes` its inverse.
"""

from __future__ import annotations

import torch

from nectar_models.attention import ExactContextAttention
from nectar_models.config import ModelConfig


def kv_bytes(n: int, cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache of n tokens: all layers, keys and values, `dtype_bytes` per number."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype_bytes * n


def streaming_tokens_for_bytes(target_bytes: int, cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """The most tokens whose KV cache (as `kv_bytes` counts it) fits in `target_bytes`."""
    return int(target_bytes) // kv_bytes(1, cfg, dtype_bytes)


def streaming_indices(n: int, n_keep: int, sinks: int = 4) -> torch.Tensor:
    """Indices (sorted) of the kept tokens among n: the first `sinks`, then the last `n_keep - sinks`."""
    if n_keep < 0 or sinks < 0:
        raise ValueError(f"n_keep and sinks must be >= 0, got n_keep={n_keep}, sinks={sinks}")
    if n_keep >= n:
        return torch.arange(n)
    head = min(sinks, n_keep)
    return torch.cat([torch.arange(head), torch.arange(n - (n_keep - head), n)])


def streaming_contexts(full_contexts: list, n_keep: int, sinks: int = 4) -> list[ExactContextAttention]:
    """The StreamingLLM subset of each layer's exact document context (window and scale kept).

    full_contexts: per layer an `ExactContextAttention` (k, v: [1, Hkv, n, D], positions [1, n]),
    as `model.prefill_document(ids).contexts()` returns. n_keep >= n keeps everything.
    """
    out = []
    for c in full_contexts:
        idx = streaming_indices(c.length, n_keep, sinks).to(c.k.device)
        k, v = c.k.index_select(2, idx), c.v.index_select(2, idx)  # [1, Hkv, n_keep, D]
        out.append(ExactContextAttention(k, v, c.positions[0].index_select(0, idx), c.window, c.scale))
    return out
