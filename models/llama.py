"""The LLaMA-family decoder (Llama 3.x, SmolLM2, Qwen2/2.5, Qwen3), read top to bottom.

Other families subclass `DecoderBlock` and override only what differs (see gemma.py).
Attention is computed as local part + context part merged by log-sum-exp (attention.py).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from .attention import attention_with_lse, chunked_attention_with_lse, merge_attention, sdpa_local, visibility
from .cache import KVCache, LayerCache, new_cache
from .config import ModelConfig
from .layers import GatedMLP, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq


@lru_cache(maxsize=None)
def _shared_inv_freq(rope, head_dim: int) -> torch.Tensor:
    """One fp32 inverse-frequency table per (RoPE config, head dim), shared by all layers using it."""
    with torch.device("cpu"):
        return rope_inv_freq(rope, head_dim)


class Attention(nn.Module):
    """Multi-head attention with GQA, optional q/k RMSNorm, and the split context/local cache."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h, self.hkv, self.d, self.g = h, hkv, d, h // hkv
        self.window, self.scale = cfg.layer_windows[layer], cfg.scale
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None
        self.rope = cfg.rope_for_layer(layer)
        self.init_rope()

    def init_rope(self) -> None:
        """fp32 inverse frequencies; a plain attribute so `.to(dtype)` never rounds them."""
        self.inv_freq = _shared_inv_freq(self.rope, self.d)

    def rope_tables(self, pos: torch.Tensor, device, tables: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `pos`; `tables` (one dict per forward pass) shares them between layers
        that use the same RoPE table, so they are computed once per pass, not once per layer."""
        key = id(self.inv_freq)
        if tables is None or key not in tables:
            cs = rope_cos_sin(self.inv_freq.to(device), pos.clamp(max=1 << 24))
            if tables is None:
                return cs
            tables[key] = cs
        return tables[key]

    def project_qkv(self, x: torch.Tensor, pos: torch.Tensor, tables: dict | None = None):
        """x: [B, T, hidden], pos: [B, T] -> q: [B, Hkv, G, T, D], k, v: [B, Hkv, T, D] (post-RoPE)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.hkv, self.d).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope_tables(pos, x.device, tables)
        # q and k through one RoPE call (element-wise, so bit-identical to two): fewer small ops.
        q, k = apply_rope(torch.cat([q, k], dim=1), cos, sin).split([self.h, self.hkv], dim=1)
        # Query head h belongs to KV head h // G (HF's repeat_kv order).
        return q.view(b, self.hkv, self.g, t, self.d), k, v

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache, tables: dict | None = None) -> torch.Tensor:
        """x: [B, T, hidden], pos: [B, T] -> [B, T, hidden]; appends this step's k, v to cache.local."""
        b, t, _ = x.shape
        q, k, v = self.project_qkv(x, pos, tables)
        cache.local.append(k, v, pos)
        lk, lv, lpos = cache.local.view()
        if cache.context is None:
            o = sdpa_local(q, lk, lv, visibility(pos, lpos, self.window), self.scale)
        else:
            if t == 1:
                # The usual decode step: every local key is visible, so no mask to build or apply
                # (checked on CPU only, where reading the flag back costs no device sync).
                if not self.window and pos.device.type == "cpu" and bool((lpos <= pos).all()):
                    vis = None
                else:
                    vis = visibility(pos, lpos, self.window)
                o_loc, lse_loc = attention_with_lse(q, lk, lv, self.scale, vis)
            else:
                o_loc, lse_loc = chunked_attention_with_lse(q, lk, lv, self.scale, pos, lpos, self.window)
            o_ctx, lse_ctx = cache.context(q, pos)
            o = merge_attention(o_ctx, lse_ctx, o_loc, lse_loc)
        if t == 1:  # [B, H, 1, D] and [B, 1, H, D] hold the same element order
            o = o.reshape(b, 1, self.h * self.d)
        else:
            o = o.reshape(b, self.h, t, self.d).transpose(1, 2).reshape(b, t, self.h * self.d)  # [B, T, H*D]
        return self.o_proj(o)


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, cache: LayerCache, tables: dict | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), pos, cache, tables)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token embedding, blocks, final norm, LM head. `block_cls` is the family's block."""

    block_cls = DecoderBlock

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.block_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        if self.config.embed_scale:
            # Gemma scales by sqrt(hidden) rounded to the activation dtype, as the reference does.
            x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        return x

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """ids, pos: [B, T] -> logits [B, T, V] fp32 ([B, 1, V] if last_only). Appends to the cache."""
        x = self.final_hidden(ids, pos, cache, last_only)
        return self.lm_head(x).float()

    def final_hidden(
        self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """ids, pos: [B, T] -> the final-norm hidden states [B, T, hidden] ([B, 1, hidden] if last_only)."""
        x = self.embed(ids)
        tables: dict = {}  # RoPE cos/sin of this pass, shared by layers with the same table
        for block, lc in zip(self.layers, cache.layers):
            x = block(x, pos, lc, tables)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    def new_cache(self, batch: int = 1, capacity: int = 256, contexts=None, context_len: int = 0) -> KVCache:
        p = self.embed_tokens.weight
        c = self.config
        return new_cache(c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, p.dtype, p.device, contexts, context_len)

    @torch.no_grad()  # not inference_mode: the returned buffers are written to later
    def prefill_document(self, ids: torch.Tensor, chunk: int = 1024) -> KVCache:
        """ids: [1, n] -> a cache whose context part is the exact document KV (local part empty)."""
        n = ids.shape[1]
        cache = self.new_cache(1, n)
        for s in range(0, n, chunk):
            part = ids[:, s : s + chunk]
            pos = torch.arange(s, s + part.shape[1], device=ids.device)[None]
            self.forward(part, pos, cache, last_only=True)
        return cache.freeze_local_as_context(self.config.layer_windows, self.config.scale)
