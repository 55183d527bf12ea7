"""Read a nectar_models decoder (torch) and an artifact into what the graph writer takes (numpy).

The model definition stays the single source of truth: weights, RoPE tables and context KV come
from the same modules the torch backend runs, so the exported graph is checked against it.
"""

from __future__ import annotations

import numpy as np
import torch

from .context_parts import LayerContext, RetainedHeads, exact_kv, fold_mlp_heads, quadrature_nodes
from .decoder_graph import DecoderWeights, GraphSpec, LayerWeights


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _norm(m) -> np.ndarray:
    return (_np(m.weight) + m.offset).astype(np.float32)  # (offset + w): Gemma's 1 + w folded


def graph_spec(model, context_len: int) -> GraphSpec:
    from nectar_models.layers import rope_inv_freq

    cfg = model.config
    ropes, layer_rope = [], []
    for i in range(cfg.num_layers):
        r = cfg.rope_for_layer(i)
        if r not in ropes:
            ropes.append(r)
        layer_rope.append(ropes.index(r))
    return GraphSpec(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        rms_eps=cfg.rms_eps, scale=cfg.scale, layer_windows=tuple(cfg.layer_windows),
        layer_rope=tuple(layer_rope), inv_freqs=tuple(_np(rope_inv_freq(r, cfg.head_dim)) for r in ropes),
        context_len=context_len, qk_norm=cfg.qk_norm, sandwich_norms=cfg.sandwich_norms,
        embed_scale=float(cfg.hidden_size**0.5) if cfg.embed_scale else None,
        activation=cfg.activation, attention_bias=cfg.attention_bias,
    )


def decoder_weights(model) -> DecoderWeights:
    layers = []
    for blk in model.layers:
        a, m = blk.self_attn, blk.mlp
        qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
        bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
        sandwich = hasattr(blk, "pre_feedforward_layernorm")
        layers.append(LayerWeights(
            input_norm=_norm(blk.input_layernorm),
            qkv=_np(qkv).T, qkv_bias=None if bias is None else _np(bias),
            q_norm=_norm(a.q_norm) if a.q_norm is not None else None,
            k_norm=_norm(a.k_norm) if a.k_norm is not None else None,
            o_proj=_np(a.o_proj.weight).T,
            post_attn_norm=_norm(blk.post_attention_layernorm),
            pre_ff_norm=_norm(blk.pre_feedforward_layernorm) if sandwich else None,
            post_ff_norm=_norm(blk.post_feedforward_layernorm) if sandwich else None,
            gate_up=_np(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0)).T,
            down=_np(m.down_proj.weight).T,
        ))
    tied = model.lm_head.weight is model.embed_tokens.weight
    return DecoderWeights(
        embed_t=np.ascontiguousarray(_np(model.embed_tokens.weight).T),
        lm_head=None if tied else np.ascontiguousarray(_np(model.lm_head.weight).T),
        final_norm=_norm(model.norm),
        layers=layers,
    )


def decoder_grids(grids: dict, model) -> dict:
    """The GGUF's quantization grids ({our name: QuantGrid}, nectar_models.loading.read_gguf_weight_grids)
    under the graph's weight names, stacked as decoder_weights stacks the weights (q|k|v, gate|up);
    a stack whose parts no single grid holds (gguf_grids.concat_rows) is left out, and rounded."""
    from nectar_models.gguf_grids import concat_rows

    out = {}
    for i in range(len(model.layers)):
        p = f"model.layers.{i}"

        def grid_of(name: str, i: int = i):
            return grids.get(f"layers.{i}.{name}.weight")

        parts = {"attn.qkv_proj": concat_rows([grid_of("self_attn.q_proj"), grid_of("self_attn.k_proj"), grid_of("self_attn.v_proj")]),
                 "attn.o_proj": grid_of("self_attn.o_proj"),
                 "mlp.gate_up_proj": concat_rows([grid_of("mlp.gate_proj"), grid_of("mlp.up_proj")]),
                 "mlp.down_proj": grid_of("mlp.down_proj")}
        out.update({f"{p}.{name}.weight": grid for name, grid in parts.items() if grid is not None})
    tied = model.lm_head.weight is model.embed_tokens.weight
    head = grids.get("embed_tokens.weight") if tied else grids.get("lm_head.weight")
    if head is not None:
        out["model.embed_tokens.weight_t" if tied else "model.lm_head.weight"] = head
    return out


@torch.no_grad()
def full_contexts(document_contexts: list) -> list[LayerContext]:
    """The document's exact KV per layer (`--method full`), from the torch model's
    `ExactContextAttention` parts (`model.prefill_document(ids).contexts()`)."""
    return [LayerContext(baked=(exact_kv(c, "document"),)) for c in document_contexts]


@torch.no_grad()
def nectar_contexts_for_export(model, ctx, heads, retained=None) -> list[LayerContext]:
    """Per layer: the template prefix's exact KV (a few tokens, the same for every document)
    and the Nectar heads (MLP folded, or quadrature nodes as baked KV with a bias), with the exact
    document KV of the layer's retained heads (`retained`: a retained.RetainedKV) if any."""
    prefix = [None] * model.config.num_layers
    if ctx.prefix_len:
        ids = torch.tensor([list(ctx.context_ids[: ctx.prefix_len])], device=model.embed_tokens.weight.device)
        prefix = model.prefill_document(ids).contexts()
    out = []
    for layer in range(model.config.num_layers):
        gi, start = heads.layer_slot[layer]
        sel = slice(start, start + heads.spec.kv_heads)
        group = heads.groups[gi]
        baked = (exact_kv(prefix[layer], "prefix"),) if prefix[layer] is not None else ()
        if heads.spec.variant == "mlp":
            kept = None
            # int8 KV goes in as stored (integers + per-token scales); the graph writer picks its form
            # (retained_graph: MatMulNBits columns in quantized bundles, else decoded constants or a per-step cast; docs/onnx.md)
            if retained is not None and layer in retained.keys and retained.dtype == "int8":
                st = retained.stored
                kept = RetainedHeads(tuple(retained.heads_of(layer)), st[f"layers.{layer}.key.q"].numpy(),
                                     st[f"layers.{layer}.value.q"].numpy(), _np(st[f"layers.{layer}.key.scale"]),
                                     _np(st[f"layers.{layer}.value.scale"]), subset=retained.tokens is not None)
            elif retained is not None and layer in retained.keys:
                kept = RetainedHeads(tuple(retained.heads_of(layer)), _np(retained.keys[layer]), _np(retained.values[layer]),
                                     subset=retained.tokens is not None)
            out.append(LayerContext(baked=baked, heads=fold_mlp_heads(group, sel), retained=kept))
        else:
            out.append(LayerContext(baked=baked + (quadrature_nodes(group, sel),)))
    return out
