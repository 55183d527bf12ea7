"""Gemma 3: the LLaMA decoder with sandwich norms around attention and MLP.

Everything else that differs is a config flag (ModelConfig): (1 + w) RMSNorm, q/k RMSNorm,
embeddings scaled by sqrt(hidden), tanh-GELU, interleaved sliding-window and global layers
with their own RoPE bases, scale = query_pre_attn_scalar ** -0.5.
"""

from __future__ import annotations

import torch

from .cache import LayerCache
from .config import ModelConfig
from .layers import RMSNorm
from .llama import Decoder, DecoderBlock


class GemmaBlock(DecoderBlock):
    """x + post_norm(attn(pre_norm(x))), then x + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache, tables: dict | None = None) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pos, cache, tables))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaDecoder(Decoder):
    block_cls = GemmaBlock
