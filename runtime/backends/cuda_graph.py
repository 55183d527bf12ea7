"""A fused decode step over flat weights, replayed as one CUDA graph per token (gpt-fast style).

Used for both methods alike, so their latencies compare like for like:
- `full`: the document's exact KV (shared by the batch, read once per step by split-KV flash
  decoding) merged with the local tokens' attention;
- `nectar`: each layer's fitted heads, local attention and the merge in one Triton launch.

Per layer a step is: residual add + RMSNorm (1 kernel) → fused q|k|v projection (1 GEMM) → RoPE +
KV-cache write (1 kernel) → attention (1 kernel for Nectar, 2 for full attention) → o-projection
(1 GEMM) → residual add + RMSNorm (1 kernel) → fused gate|up GEMM → SiLU·up (1 kernel) →
down-projection (1 GEMM), whose output the next layer's first kernel adds to the residual.
For small models (hidden ≤ SMALL_HIDDEN) on CUDA the projections are fused Triton GEMVs instead:
[add + RMSNorm + q|k|v + RoPE + KV write] → attention → o-proj → [add + RMSNorm + gate|up + SiLU·up]
→ down-proj: 5 launches a layer for Nectar (6 for full attention), then [add + RMSNorm + LM head].
A fused layer (`_forward_fused`, off by default: StepOptions.fused_layer) does it in 3 launches —
the o-projection in the attention kernel's epilogue and the whole MLP in one launch, both adding
into fp32 accumulators by atomics — but measured slower inside the graph on the H100.
On Hopper these launch with PDL (kernels/_triton_pdl.py): each kernel is scheduled and prefetches
its weights into L2 while the previous one still runs, which hides the launch gaps (H100, SmolLM2
step: 0.68 ms without, 0.63 ms with; what remains is each kernel's own latency, docs/benchmarks.md).
On CPU the same step runs through plain torch ops.

Imported lazily (it imports torch): nothing in nectar_runtime imports it at module load.
Supports LLaMA-family decoders without q/k norms or sliding windows (Llama 3, SmolLM2, Qwen2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NectarError
from .base import PAD_POSITION

MAX_PREFILL_CHUNK = 64  # the fused Nectar kernel is built for short local prefills
SMALL_HIDDEN = 1024  # hidden sizes up to this take the fused-GEMV path on CUDA


@dataclass(frozen=True)
class StepOptions:
    """Which variant of the decode step a FusedDecoder runs, passed in at construction
    (`FusedDecoder(..., options=)`, `from_decoder`, `random`, `full_backend`,
    `nectar_backend_from_artifact`; `FusedDecoder.set_options` between benchmark trials).
    The defaults are the measured fastest.

    fused_layer: the fused layer for small models at ≤ fused_layer_max_rows rows (B*T; decode at
      batch ≤ 4): the whole MLP in one launch and, with fused_oproj, the o-projection in the
      attention kernel's epilogue (3 launches a layer; else 4). Off by default: inside the
      CUDA-graph step on the H100 it measured slower than the 5-launch layer (SmolLM2 shape,
      n = 1K, batch 1: 0.743 ms with 3 launches, 0.618 with 4, 0.562 with 5; docs/benchmarks.md,
      gpu-profile). Only then are W_o / W_down copied transposed (a third of the layer weights).
    fused_layer_max_rows: the most rows (B*T) a step may have to take the fused layer (the fused
      MLP's Triton kernel takes up to kernels/fused.py: ROW_KERNEL_MAX_ROWS = 4 rows).
    fused_oproj: within the fused layer, the o-projection in the attention kernel's epilogue;
      False keeps it a separate GEMV.
    deferred_merge: deferred merge (mlp heads, decode rows, 5-launch layer): the Nectar kernel
      writes its parts' shares and the o-projection GEMV merges them in its prologue
      (kernels/triton_nectar.py: nectar_layer_shares, kernels/fused.py: merge_gemv); False merges
      inside the attention kernel.

    `from_env()` builds them from NECTAR_FUSED_LAYER / NECTAR_FUSED_OPROJ / NECTAR_DEFERRED_MERGE,
    the one place those are read; the entry points that build a step for users (answer_backend,
    artifact_backend, `nectar profile`) call it once.
    """

    fused_layer: bool = False
    fused_layer_max_rows: int = 4
    fused_oproj: bool = True
    deferred_merge: bool = True

    def __post_init__(self):
        for name in ("fused_layer", "fused_oproj", "deferred_merge"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False (got {getattr(self, name)!r})")
        rows = self.fused_layer_max_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"fused_layer_max_rows must be an int ≥ 1 (got {rows!r})")

    # environment variable -> field; "0" turns a field off, any other value on, unset keeps the default
    ENV: ClassVar[dict[str, str]] = {"NECTAR_FUSED_LAYER": "fused_layer", "NECTAR_FUSED_OPROJ": "fused_oproj",
                                     "NECTAR_DEFERRED_MERGE": "deferred_merge"}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "StepOptions":
        """The defaults, overridden by NECTAR_FUSED_LAYER=1, NECTAR_FUSED_OPROJ=0,
        NECTAR_DEFERRED_MERGE=0 ("0" off, anything else on). environ: os.environ if None."""
        env = os.environ if environ is None else environ
        return cls(**{field: env[var] != "0" for var, field in cls.ENV.items() if var in env})


CAPACITY_QUANTUM = 128  # local cache slots are allocated in multiples of this (reuse across resets)


@dataclass
class LayerWeights:
    ln1: torch.Tensor  # [hidden] fp32, offset + weight
    wqkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, Hq * D]
    ln2: torch.Tensor
    wgu: torch.Tensor  # [2 * I, hidden] = [gate; up]
    wd: torch.Tensor  # [hidden, I]
    wo_t: torch.Tensor | None = None  # [Hq * D, hidden] = wo transposed (small models: fused o-projection)
    wd_t: torch.Tensor | None = None  # [I, hidden] = wd transposed (small models: fused MLP)


@dataclass
class DecodeState:
    """Static buffers of one batch: every layer's local KV, and where this step writes.

    k, v: [L, B, Hkv, C, D]; slot: [B] int32 first slot this step writes; kv_len = slot + T;
    kv_start: [B] int32 first valid slot (left padding)."""

    k: torch.Tensor
    v: torch.Tensor
    slot: torch.Tensor
    kv_len: torch.Tensor
    kv_start: torch.Tensor
    length: int = 0  # host copy of the slots used

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


@dataclass
class RetainedLayer:
    """One layer's retained heads on the fused step (nectar fit --retain-heads): their document part is
    attention over stored keys/values instead of (or, under a token budget, beside) their networks.

    kv: [R] KV-head indices; qh: [R*G] their query heads (KV head-major); k, v: [R, c, D] fp32 stored
    post-RoPE keys/values; subset: the heads' networks serve the c tokens not kept (merged by log-sum-exp),
    with their packed weights heads_w / heads_b: [R, P] fp32 (mlp, `width`)."""

    kv: torch.Tensor
    qh: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    subset: bool
    heads_w: torch.Tensor | None = None
    heads_b: torch.Tensor | None = None
    width: int = 0


def check_supported(cfg) -> None:
    if cfg.family != "llama" or cfg.qk_norm or any(cfg.layer_windows) or cfg.embed_scale or cfg.activation != "silu":
        raise NectarError(f"the fused CUDA-graph decoder supports LLaMA-family models without q/k norms or "
                          f"sliding windows (Llama 3, SmolLM2, Qwen2); {cfg.name or cfg.family} is not one")


class FusedDecoder:
    """Decode step of a LLaMA-family model on flat weights; the document part is set apart.

    document: None | ("full", ks, vs) with ks[l], vs[l]: [1, Hkv, n, D] | ("nectar", packed) with
    packed[l] = (heads_w, heads_b, variant, width) from nectar_kernels.weights.
    options: which variant of the step runs (StepOptions; None = the defaults).
    """

    def __init__(self, cfg, embed: torch.Tensor, layers: list[LayerWeights], norm: torch.Tensor,
                 lm_head: torch.Tensor, inv_freq: torch.Tensor, options: StepOptions | None = None):
        check_supported(cfg)
        self.cfg, self.embed, self.layers, self.norm, self.lm_head = cfg, embed, layers, norm, lm_head
        self.inv_freq = inv_freq
        self.document = None
        self.context_len = 0
        self._workspaces: dict = {}
        # Small models are launch-bound: their projections run as fused Triton GEMVs (norm, residual
        # add, SiLU·up inside; 6 launches a layer for Nectar). Larger ones keep cuBLAS, which
        # streams big weights closer to the bandwidth limit.
        self.small_model = cfg.hidden_size <= SMALL_HIDDEN and not cfg.attention_bias
        self.set_options(StepOptions() if options is None else options)
        self.prefix = None  # (k, v): [L, Hkv, P, D], exact KV placed in the local cache's first slots
        self.retained: dict[int, RetainedLayer] = {}  # layer -> its retained heads (set_retained)

    def set_options(self, options: StepOptions) -> None:
        """Run later steps with these options (benchmarks switch them between trials; a GraphedStep
        captured before keeps the step it captured)."""
        if not isinstance(options, StepOptions):
            raise TypeError(f"options must be a StepOptions, got {type(options).__name__}")
        self.options = options
        if self.small_model and options.fused_layer:  # only then: the copies cost a third of the layer weights
            self._transpose_for_fused()

    @property
    def device(self):
        return self.embed.device

    @property
    def dtype(self):
        return self.embed.dtype

    # ---------------------------------------------------------------- building
    @classmethod
    def from_decoder(cls, model, options: StepOptions | None = None) -> "FusedDecoder":
        """Concatenate a nectar_models Decoder's weights (q|k|v and gate|up) into flat tensors."""
        from nectar_models.layers import rope_inv_freq

        cfg = model.config
        check_supported(cfg)
        layers = []
        with torch.no_grad():
            for blk in model.layers:
                a, m = blk.self_attn, blk.mlp
                bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if cfg.attention_bias else None
                layers.append(LayerWeights(
                    (cfg.norm_offset + blk.input_layernorm.weight.float()).contiguous(),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).contiguous(), bias,
                    a.o_proj.weight, (cfg.norm_offset + blk.post_attention_layernorm.weight.float()).contiguous(),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]).contiguous(), m.down_proj.weight))
            emb = model.embed_tokens.weight
            return cls(cfg, emb, layers, (cfg.norm_offset + model.norm.weight.float()).contiguous(),
                       model.lm_head.weight, rope_inv_freq(cfg.rope, cfg.head_dim).to(emb.device), options)

    @classmethod
    def random(cls, cfg, dtype, device, seed: int = 0, options: StepOptions | None = None) -> "FusedDecoder":
        """Random weights of `cfg`'s shapes (latency profiles of models we hold no weights for)."""
        from nectar_models.layers import rope_inv_freq

        check_supported(cfg)
        g = torch.Generator(device=device).manual_seed(seed)
        h, d, hq, hkv, inter = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size

        def w(rows, cols):
            return (torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32) * cols**-0.5).to(dtype)

        def norm():
            return 1 + 0.1 * torch.randn(h, generator=g, device=device)

        layers = [LayerWeights(norm(), w((hq + 2 * hkv) * d, h), None, w(h, hq * d), norm(), w(2 * inter, h), w(h, inter))
                  for _ in range(cfg.num_layers)]
        emb = w(cfg.vocab_size, h)
        return cls(cfg, emb, layers, norm(), emb if cfg.tie_embeddings else w(cfg.vocab_size, h),
                   rope_inv_freq(cfg.rope, d).to(device), options)

    def set_full_document(self, ks: list, vs: list, n: int) -> None:
        """ks[l], vs[l]: [1, Hkv, n, D] post-RoPE document KV of layer l, shared by the batch."""
        self.document, self.context_len = ("full", ks, vs), n

    def set_nectar_document(self, packed: list, n: int, prefix=None) -> None:
        """packed[l] = (heads_w, heads_b, variant, width); prefix = (k, v) [L, Hkv, P, D] exact KV
        of the template prefix (positions 0..P-1), kept in the local cache's first P slots."""
        self.document, self.context_len, self.prefix = ("nectar", packed), n, prefix

    def set_retained(self, layers: dict[int, tuple[list[int], torch.Tensor, torch.Tensor]], subset: bool) -> None:
        """Retained heads over the Nectar document: layers[l] = (KV heads, k, v) with k, v: [R, c, D] their
        stored document keys/values (post-RoPE). subset: a token budget (their networks serve the other
        tokens); else the stored KV replaces their networks. The Triton kernels still run every head; a
        retained head's rows are then recomputed in torch ops (`_retained_attention`), which CUDA graphs
        capture like the rest of the step."""
        from nectar_kernels.retained import retained_query_heads

        if self.document is None or self.document[0] != "nectar":
            raise NectarError("retained heads need the Nectar document set first (set_nectar_document)")
        g = self.cfg.num_heads // self.cfg.num_kv_heads
        self.retained = {}
        for layer, (kv, k, v) in layers.items():
            hw, hb, variant, width = self.document[1][layer]
            if variant != "mlp":
                raise NectarError("retained heads need mlp heads (quadrature heads have no retained-head path)")
            idx = torch.tensor(kv, device=self.device, dtype=torch.long)
            qh = retained_query_heads(idx, g)
            self.retained[layer] = RetainedLayer(
                idx, qh, k.to(self.device, torch.float32), v.to(self.device, torch.float32), subset,
                hw.index_select(0, idx).float() if subset else None, hb.index_select(0, idx).float() if subset else None,
                int(width))

    # ---------------------------------------------------------------- running
    def precompile(self, batches, ts: tuple[int, ...] = (1,)) -> int:
        """Compile, all at once on a thread pool, the Triton kernel variants that steps of each
        batch size in `batches` and T = each of ts will launch (CUDA only; returns how many
        distinct variants, 0 elsewhere). The steps run once with their launches recorded
        (nectar_kernels.launch.recording) on scratch buffers; the decoder's state is not touched.
        Without it the first steps compile them one after another (a first `nectar fit` on a GPU
        spent ~10 s there). Variants already compiled cost only a cache lookup."""
        if self.device.type != "cuda":
            return 0
        from nectar_kernels.launch import compile_recorded, recording

        calls: list = []
        for batch in sorted(set(batches)):
            for t in ts:
                st = self.new_state(batch, -(-t // CAPACITY_QUANTUM) * CAPACITY_QUANTUM)
                st.kv_len.fill_(t)
                ids = torch.zeros(batch, t, dtype=torch.long, device=self.device)
                pos = (self.context_len + torch.arange(t, device=self.device)).expand(batch, t).contiguous()
                with recording(calls), torch.inference_mode():
                    self.forward(ids, pos, st)
        return compile_recorded(calls)

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        c, dev = self.cfg, self.device
        p = 0 if self.prefix is None else self.prefix[0].shape[2]
        shape = (c.num_layers, batch, c.num_kv_heads, p + capacity, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=dev)
        v = torch.zeros_like(k)
        if p:
            k[:, :, :, :p] = self.prefix[0][:, None].to(self.dtype)
            v[:, :, :, :p] = self.prefix[1][:, None].to(self.dtype)
        z = torch.zeros(batch, dtype=torch.int32, device=dev)
        return DecodeState(k, v, z + p, z + p, z.clone(), length=p)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, st: DecodeState, fused: bool | None = None) -> torch.Tensor:
        """ids, pos: [B, T] (device; pos < 0 marks left padding, never written to the cache);
        writes this step's KV at st.slot .. st.slot + T - 1 and attends over st.kv_start ..
        st.kv_len - 1 (the caller sets st.slot, st.kv_len = slot + T).
        Returns the last token's logits [B, V] fp32. Capturable in a CUDA graph (no host syncs).
        fused: None = the fused layer where `fused_layer` allows it; True forces it (a small
        model; its attention runs the Triton kernels, on CPU only under Triton's interpreter);
        False forbids it."""
        c = self.cfg
        b, t = ids.shape
        hq, hkv, d, hid = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        from nectar_kernels.fused import (ROW_KERNEL_MAX_ROWS, add_rmsnorm, gemv, merge_gemv, qkv_rope, rmsnorm,
                                          rope_store, silu_mul)

        x = F.embedding(ids, self.embed).view(b * t, hid)  # [B*T, hidden], the residual stream
        q = torch.empty(b, hq, t, d, dtype=self.dtype, device=self.device)
        o = torch.empty(b, t, hq, d, dtype=self.dtype, device=self.device)  # o-proj reads [B*T, Hq*D]
        # fp32 weights take the fused GEMVs only for decode rows (exact fp32 FMAs); wider fp32 steps
        # (prefill, batch 16 when `nectar fit` generates probes) go to cuBLAS rather than the Triton
        # GEMV's IEEE-fp32 dots (H100, batch 16: 7.4 vs 8.1 ms a step with the split-KV kernel
        # still in fp32 Triton; benchmarks/probe_gen.py; that kernel now yields to cuBLAS too).
        small = self.small_model and x.device.type == "cuda" and (
            self.dtype != torch.float32 or b * t <= ROW_KERNEL_MAX_ROWS)
        if fused or (fused is None and small and self.fused_layer(b * t)):
            return self._forward_fused(x, pos, st, b, t)
        other = torch.empty_like(x) if small else None  # the residual stream ping-pongs between x and other
        delta = None  # the last sub-block's output, added to x by the next fused add + RMSNorm
        for i, lw in enumerate(self.layers):
            if small:  # add + RMSNorm + q|k|v + RoPE + KV-cache write in one launch
                qkv_rope(x, lw.wqkv, delta, lw.ln1, c.rms_eps, other, pos, self.inv_freq, st.slot, q, st.k[i],
                         st.v[i], hq, hkv)
                if delta is not None:
                    x, other = other, x
            else:
                h = rmsnorm(x, lw.ln1, c.rms_eps) if delta is None else add_rmsnorm(x, delta, lw.ln1, c.rms_eps)
                qkv = F.linear(h, lw.wqkv, lw.bqkv)  # [B*T, (Hq + 2 Hkv) * D]
                rope_store(qkv, pos, self.inv_freq, st.slot, q, st.k[i], st.v[i], hq, hkv)
            shares = self.attention_shares(i, q, st) if small else None
            if shares is None:
                self.attention(i, q, st, o.transpose(1, 2))
            if small:  # o-proj (merging the shares); then add + RMSNorm + gate|up + SiLU·up; down-proj
                attn = gemv(o.view(b * t, hq * d), lw.wo) if shares is None else merge_gemv(shares, lw.wo, self.dtype)
                a = gemv(x, lw.wgu, attn, lw.ln2, c.rms_eps, other, glu=True)
                x, other = other, x
                delta = gemv(a, lw.wd)
            else:
                h = add_rmsnorm(x, F.linear(o.view(b * t, hq * d), lw.wo), lw.ln2, c.rms_eps)
                delta = F.linear(silu_mul(F.linear(h, lw.wgu)), lw.wd)
        if small:  # last rows only: add + final RMSNorm + LM head in one launch (strided rows)
            last = x.view(b, t, hid)[:, -1]
            logits = gemv(last, self.lm_head, delta.view(b, t, hid)[:, -1], self.norm, c.rms_eps,
                          other.view(b, t, hid)[:, -1])
            return logits.float()
        x.add_(delta)
        last = x.view(b, t, hid)[:, -1].contiguous()
        return F.linear(rmsnorm(last, self.norm, c.rms_eps), self.lm_head).float()

    def fused_layer(self, rows: int) -> bool:
        """Whether a CUDA step of `rows` = B*T rows runs the fused layer (small models only; off
        unless options.fused_layer)."""
        o = self.options
        return (o.fused_layer and self.small_model and rows <= o.fused_layer_max_rows and self.layers[0].wo_t is not None
                and not self.retained)  # the fused layer projects o in the attention launch: no room to fix rows

    def _transpose_for_fused(self) -> None:
        """The fused o-projection and MLP read W_o and W_down transposed (row slices)."""
        for lw in self.layers:
            if lw.wo_t is None:
                lw.wo_t = lw.wo.t().contiguous()
            if lw.wd_t is None:
                lw.wd_t = lw.wd.t().contiguous()

    def _forward_fused(self, x: torch.Tensor, pos: torch.Tensor, st: DecodeState, b: int, t: int) -> torch.Tensor:
        """The decode step of a small model at ≤ options.fused_layer_max_rows rows, 3 launches a layer:

            [add + RMSNorm + q|k|v + RoPE + KV write; zero acc_a]
            → [attention (Nectar heads + local + merge, or the merge of full attention after its
               split-KV document launch) + o-projection into acc_a; zero acc_m]
            → [add + RMSNorm + gate|up + SiLU·up + down-projection into acc_m]

        then [add + final RMSNorm + LM head]. The residual stream stays in the model dtype
        (ping-pong between x and other); acc_a / acc_m are fp32 [B*T, hidden] deltas summed by
        atomics (nondeterministic summation order), each zeroed by the launch before the one that
        adds into it (after its PDL wait, so no extra launch)."""
        c = self.cfg
        hq, hkv, d, hid = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        from nectar_kernels.fused import gemv, mlp_fused, qkv_rope

        self._transpose_for_fused()  # no-op once done (forced `fused=True` with options.fused_layer off)

        q = torch.empty(b, hq, t, d, dtype=self.dtype, device=self.device)
        o = torch.empty(b, t, hq, d, dtype=self.dtype, device=self.device)
        other = torch.empty_like(x)
        acc_a = torch.empty(b * t, hid, dtype=torch.float32, device=self.device)
        acc_m = torch.empty_like(acc_a)
        oproj = self.options.fused_oproj
        delta = None
        for i, lw in enumerate(self.layers):
            qkv_rope(x, lw.wqkv, delta, lw.ln1, c.rms_eps, other, pos, self.inv_freq, st.slot, q, st.k[i], st.v[i],
                     hq, hkv, zero=acc_a if oproj else None)
            if delta is not None:
                x, other = other, x
            if oproj:
                self.attention(i, q, st, o.transpose(1, 2), o_proj=(lw.wo_t, acc_a), zero=acc_m)
                mlp_fused(x, acc_a, lw.ln2, c.rms_eps, other, lw.wgu, lw.wd_t, acc_m)
            else:  # attention, then the o-projection GEMV (its output the MLP's residual delta)
                self.attention(i, q, st, o.transpose(1, 2), zero=acc_m)
                mlp_fused(x, gemv(o.view(b * t, hq * d), lw.wo), lw.ln2, c.rms_eps, other, lw.wgu, lw.wd_t, acc_m)
            x, other = other, x
            delta = acc_m
        last = x.view(b, t, hid)[:, -1]
        return gemv(last, self.lm_head, delta.view(b, t, hid)[:, -1], self.norm, c.rms_eps,
                    other.view(b, t, hid)[:, -1]).float()

    def attention(self, i: int, q: torch.Tensor, st: DecodeState, out: torch.Tensor, o_proj=None, zero=None) -> None:
        """q: [B, Hq, T, D] -> out: [B, Hq, T, D] (a strided view), layer i. o_proj = (WoT, acc),
        zero: the fused o-projection and accumulator zeroing of the attention launch (CUDA only)."""
        scale = self.cfg.scale
        kl, vl = st.k[i], st.v[i]
        kind = self.document[0] if self.document else None
        if kind is None:
            raise NectarError("the fused decoder needs a document part (full KV or Nectar heads)")
        if q.device.type == "cuda" or o_proj is not None or zero is not None:
            from nectar_kernels.triton_nectar import full_layer_attention, nectar_layer_attention

            if kind == "nectar":
                hw, hb, variant, width = self.document[1][i]
                ws = self._workspace(q, kl.shape[1], o_proj is not None) if variant == "mlp" else None
                nectar_layer_attention(q, kl, vl, st.kv_len, hw, hb, variant, width, scale, st.kv_start, out=out,
                                       workspace=ws, o_proj=o_proj, zero=zero)
            else:
                full_layer_attention(q, self.document[1][i], self.document[2][i], kl, vl, st.kv_len, scale,
                                     st.kv_start, out=out, o_proj=o_proj, zero=zero)
        else:
            out.copy_(_cpu_attention(self.document, i, q, kl, vl, st, scale))
        if i in self.retained:
            if o_proj is not None:
                raise NectarError("the fused o-projection cannot serve retained heads")  # fused_layer() keeps it off
            self._retained_attention(self.retained[i], q, st.k[i], st.v[i], st, out)

    def _retained_attention(self, rl: RetainedLayer, q: torch.Tensor, kl: torch.Tensor, vl: torch.Tensor,
                            st: DecodeState, out: torch.Tensor) -> None:
        """Overwrite the retained heads' rows of `out` [B, Hq, T, D]: their document part (stored KV, or
        under a token budget the kept tokens merged with the network's rest), merged with their local
        attention over kl / vl [B, Hkv, C, D]. fp32, as the torch backend's RetainedHeadsContext
        (nectar_kernels.retained, shared with the TensorRT plugin)."""
        from nectar_kernels.retained import retained_rows

        o = retained_rows(q, kl, vl, st.kv_len, st.kv_start, rl.k, rl.v, rl.kv, self.cfg.scale, rl.subset,
                          rl.heads_w, rl.heads_b, rl.width, q_heads=rl.qh)
        out.index_copy_(1, rl.qh, o.to(out.dtype))

    def attention_shares(self, i: int, q: torch.Tensor, st: DecodeState):
        """Layer i's Nectar attention with its merge deferred to the o-projection (NectarShares),
        or None where that path does not apply (not CUDA, not mlp heads, more rows than the row
        GEMV takes, or options.deferred_merge off): then `attention` writes o."""
        from nectar_kernels.fused import ROW_KERNEL_MAX_K, ROW_KERNEL_MAX_ROWS

        b, hq, t, d = q.shape
        if (q.device.type != "cuda" or not self.document or self.document[0] != "nectar"
                or b * t > ROW_KERNEL_MAX_ROWS or hq * d > ROW_KERNEL_MAX_K or i in self.retained
                or not self.options.deferred_merge):
            return None
        hw, hb, variant, width = self.document[1][i]
        if variant != "mlp":
            return None
        from nectar_kernels.triton_nectar import nectar_layer_shares, shares_numel

        need = shares_numel(b, hq, t, d, max(int(p[3]) for p in self.document[1]))
        key = ("shares", tuple(q.shape), need)
        if key not in self._workspaces:  # one buffer for all layers, sized for the widest
            self._workspaces[key] = torch.empty(need, device=q.device, dtype=torch.float32)
        return nectar_layer_shares(q, st.k[i], st.v[i], st.kv_len, hw, hb, width, self.cfg.scale, st.kv_start,
                                   workspace=self._workspaces[key])

    def _workspace(self, q: torch.Tensor, kv_heads: int, o_proj: bool = False) -> torch.Tensor:
        """The fused Nectar kernel's zeroed workspace, one per step shape, shared by all layers
        (each launch leaves it zeroed; launches on one stream never overlap)."""
        from nectar_kernels.triton_nectar import OPROJ_TUNING, workspace_numel

        rpb = OPROJ_TUNING["rows_per_block"] if o_proj else None
        key = (tuple(q.shape), rpb)
        if key not in self._workspaces:
            self._workspaces[key] = torch.zeros(
                workspace_numel(q.shape[0], q.shape[1], kv_heads, q.shape[2], q.shape[3], rpb),
                device=q.device, dtype=torch.float32)
        return self._workspaces[key]


def _cpu_attention(document, i, q, kl, vl, st, scale):
    from nectar_kernels.reference import local_attention_reference, nectar_layer_attention_reference

    if document[0] == "nectar":
        hw, hb, variant, width = document[1][i]
        return nectar_layer_attention_reference(q, kl, vl, st.kv_len, hw, hb, variant, width, scale, st.kv_start)
    from nectar_models.attention import attention_with_lse, merge_attention

    b, hq, t, d = q.shape
    hkv = kl.shape[1]
    qg = q.view(b, hkv, hq // hkv, t, d)
    o_doc, lse_doc = attention_with_lse(qg, document[1][i], document[2][i], scale, None)  # [B, Hkv, G, T, ...]
    o_loc, lse_loc = local_attention_reference(q.float(), kl, vl, st.kv_len, st.kv_start, scale)
    return merge_attention(o_doc.reshape(b, hq, t, d), lse_doc.reshape(b, hq, t), o_loc.to(q.dtype), lse_loc)


class GraphedStep:
    """One decode step (T = 1) captured once as a CUDA graph over static ids/pos buffers and
    replayed per token. The caller sets state.slot / state.kv_len before each replay."""

    def __init__(self, dec: FusedDecoder, st: DecodeState, warmup: int = 2):
        b = st.k.shape[1]
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dec.device)
        self.pos = torch.full((b, 1), dec.context_len, dtype=torch.long, device=dec.device)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(warmup):  # compiles the Triton kernels, creates cuBLAS handles
                dec.forward(self.ids, self.pos, st)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = dec.forward(self.ids, self.pos, st)

    def __call__(self, ids: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:
            self.ids.copy_(ids, non_blocking=True)
            self.pos.copy_(pos, non_blocking=True)
        self.graph.replay()
        return self.logits


class CudaGraphBackend:
    """A `DecoderBackend` over a FusedDecoder: prefill in chunks of ≤ 64 tokens, then one CUDA-graph
    replay per generated token (on CPU: the same step, eagerly)."""

    def __init__(self, dec: FusedDecoder):
        self.dec = dec
        self.context_len = dec.context_len
        self.max_local_len = dec.cfg.max_position - dec.context_len
        self.state = None
        self.graph = None
        self.lengths = None

    def reset(self, batch: int, capacity: int) -> None:
        """A new batch. The cache buffers and the captured graph are kept when the batch size is the
        same and the capacity fits: nothing stale is read, since a row attends only to slots below
        its kv_len, which the new batch writes before reading (the exact prefix slots are never
        written). New buffers round the capacity up to CAPACITY_QUANTUM."""
        st = self.state
        if st is None or st.k.shape[1] != batch or st.capacity - st.length < capacity:
            self.state = self.dec.new_state(batch, -(-capacity // CAPACITY_QUANTUM) * CAPACITY_QUANTUM)
            self.graph = None
        self.lengths = None  # [B] slots used per row (host copy)

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        st, dev = self.state, self.dec.device
        if self.lengths is None:
            if ids.shape[1] > 1:  # whole prefill chunks: one compiled kernel variant (T is a constexpr)
                extra = -ids.shape[1] % MAX_PREFILL_CHUNK
                ids = np.pad(ids, ((0, 0), (extra, 0)))
                positions = np.pad(positions, ((0, 0), (extra, 0)), constant_values=PAD_POSITION)
            # first (prompt) step: left padding is never written to the cache (position < 0), and
            # each row starts where its real tokens follow the prefix contiguously.
            self.lengths = st.length - (positions == PAD_POSITION).sum(1).astype(np.int64)
        b, t = ids.shape
        if int(self.lengths.max()) + t > st.capacity:
            raise NectarError(f"local cache full: {st.capacity} slots; reset with a larger capacity")
        ids_t, pos_t = torch.from_numpy(ids).to(dev), torch.from_numpy(positions).to(dev)
        with torch.inference_mode():
            if t == 1 and dev.type == "cuda":
                self._set_slots(self.lengths, 1)
                if self.graph is None:
                    self.graph = GraphedStep(self.dec, st)
                logits = self.graph(ids_t, pos_t)
                self.lengths = self.lengths + 1
            else:
                for c0 in range(0, t, MAX_PREFILL_CHUNK):
                    c1 = min(t, c0 + MAX_PREFILL_CHUNK)
                    self._set_slots(self.lengths, c1 - c0)
                    logits = self.dec.forward(ids_t[:, c0:c1].contiguous(), pos_t[:, c0:c1].contiguous(), st)
                    self.lengths = self.lengths + (c1 - c0)
        return logits.cpu().numpy()

    def precompile(self, batches) -> int:
        """Compile the kernels of this backend's steps for these batch sizes ahead, in parallel:
        prefill chunks (T = MAX_PREFILL_CHUNK) and decode (T = 1). See FusedDecoder.precompile."""
        return self.dec.precompile(batches, (1, MAX_PREFILL_CHUNK))

    def _set_slots(self, lengths: np.ndarray, t: int) -> None:
        self.state.slot.copy_(torch.from_numpy(lengths.astype(np.int32)))
        self.state.kv_len.copy_(torch.from_numpy((lengths + t).astype(np.int32)))


def full_backend(model, contexts: list, n: int, options: StepOptions | None = None) -> CudaGraphBackend:
    """A nectar_models Decoder with the exact document KV (contexts[l].k / .v: [1, Hkv, n, D],
    positions 0..n-1) served by the fused step: split-KV flash decoding over the document.
    options: the step's StepOptions (None = the defaults)."""
    dec = FusedDecoder.from_decoder(model, options)
    dec.set_full_document([c.k for c in contexts], [c.v for c in contexts], n)
    return CudaGraphBackend(dec)


def nectar_backend_from_artifact(oa, dtype=None, weight_dtype=None,
                                 options: StepOptions | None = None) -> CudaGraphBackend:
    """An OpenArtifact (nectar_export.pipeline) served by the fused decoder: heads packed per layer,
    the exact template prefix in the local cache's first slots. options: the step's StepOptions
    (None = the defaults)."""
    from nectar_kernels.weights import pack_layer

    model = oa.base.model
    if dtype is not None:
        model.to(dtype)
    dec = FusedDecoder.from_decoder(model, options)
    heads = oa.heads
    packed = [pack_layer(heads, l, weight_dtype) for l in range(heads.spec.num_layers)]
    prefix = None
    if oa.ctx.prefix_len:
        cache = model.prefill_document(torch.tensor([oa.ctx.context_ids[: oa.ctx.prefix_len]], device=dec.device))
        prefix = (torch.stack([c.k[0] for c in cache.contexts()]), torch.stack([c.v[0] for c in cache.contexts()]))
    dec.set_nectar_document(packed, oa.ctx.n, prefix)
    if oa.retained is not None:
        r = oa.retained
        dec.set_retained({l: (r.heads_of(l), r.keys[l], r.values[l]) for l in r.keys}, subset=r.tokens is not None)
    return CudaGraphBackend(dec)
