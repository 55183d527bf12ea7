"""The TensorRT plugin `nectar::NectarAttention`: one layer's Nectar heads + exact local attention
+ log-sum-exp merge, served by the same Triton kernel the torch CUDA backend uses
(triton_nectar.nectar_layer_attention), through TensorRT's Python plugin API (`tensorrt.plugin`,
TensorRT >= 10.6, JIT implementation: the engine calls back into this module at run time). Layers
with retained heads use `nectar::NectarRetainedAttention`: the same kernel, then the retained heads'
rows recomputed over their stored document KV (triton_nectar.nectar_retained_attention).
Importing this module registers the plugin in TensorRT's plugin registry; it must happen before
the ONNX graph is parsed and before an engine holding the plugin is deserialized. It needs
tensorrt, and torch + triton when the plugin runs; only the TensorRT exporter and backend import it.

How the ONNX parser finds it: a node whose op_type is the plugin name (`NectarAttention`) with a
string attribute plugin_namespace = "nectar" (plugin_version "1", the version tensorrt.plugin
registers); its other attributes become the plugin's attributes (variant, width, scale).

NOT RUN IN THIS REPOSITORY'S CI: TensorRT cannot be installed there. The node's semantics are
tested against the torch model with the kernel's PyTorch reference (tests/export/test_trt_graph.py)
and the kernel itself on an H100 (tests/kernels/test_triton.py, tests/kernels/test_retained_node.py).
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
# annotations with inspect.signature and needs real classes (trtp.TensorDesc, int, ...), not strings.

import tensorrt.plugin as trtp

PLUGIN = "nectar::NectarAttention"


@trtp.register(PLUGIN)
def nectar_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_len: trtp.TensorDesc,
                          kv_start: trtp.TensorDesc, heads_w: trtp.TensorDesc, heads_b: trtp.TensorDesc,
                          variant: str, width: int, scale: float) -> trtp.TensorDesc:
    """o has q's shape and dtype: [B, Hq, T, D]. Without an @trtp.autotune function TensorRT runs
    the plugin with the input dtypes the network gives it, linear layouts."""
    return q.like()


@trtp.impl(PLUGIN)
def nectar_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, kv_len: trtp.Tensor,
                          kv_start: trtp.Tensor, heads_w: trtp.Tensor, heads_b: trtp.Tensor,
                          variant: str, width: int, scale: float, outputs: tuple[trtp.Tensor], stream: int) -> None:
    import torch

    from .triton_nectar import nectar_layer_attention

    t = lambda x: torch.as_tensor(x, device="cuda")  # noqa: E731 (zero-copy views of TensorRT's buffers)
    # the ONNX parser hands string attributes over as C strings: drop the terminating NUL
    variant = variant.rstrip("\x00")
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        nectar_layer_attention(t(q), t(k), t(v), t(kv_len), t(heads_w), t(heads_b), variant, int(width), float(scale),
                               kv_start=t(kv_start), out=t(outputs[0]))


RETAINED_PLUGIN = "nectar::NectarRetainedAttention"


@trtp.register(RETAINED_PLUGIN)
def nectar_retained_attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, kv_len: trtp.TensorDesc,
                                   kv_start: trtp.TensorDesc, heads_w: trtp.TensorDesc, heads_b: trtp.TensorDesc,
                                   ret_k: trtp.TensorDesc, ret_v: trtp.TensorDesc, ret_heads: trtp.TensorDesc,
                                   variant: str, width: int, scale: float, subset: int) -> trtp.TensorDesc:
    """A layer with retained heads (nectar fit --retain-heads): NectarAttention's inputs plus the retained
    KV heads' stored document keys/values ret_k, ret_v [R, c, D] and their indices ret_heads [R] int32;
    subset = 1 under a token budget. o as NectarAttention's."""
    return q.like()


@trtp.impl(RETAINED_PLUGIN)
def nectar_retained_attention_impl(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, kv_len: trtp.Tensor,
                                   kv_start: trtp.Tensor, heads_w: trtp.Tensor, heads_b: trtp.Tensor,
                                   ret_k: trtp.Tensor, ret_v: trtp.Tensor, ret_heads: trtp.Tensor,
                                   variant: str, width: int, scale: float, subset: int,
                                   outputs: tuple[trtp.Tensor], stream: int) -> None:
    import torch

    from .triton_nectar import nectar_retained_attention

    t = lambda x: torch.as_tensor(x, device="cuda")  # noqa: E731
    variant = variant.rstrip("\x00")
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        nectar_retained_attention(t(q), t(k), t(v), t(kv_len), t(heads_w), t(heads_b), variant, int(width), float(scale),
                                  t(ret_k), t(ret_v), t(ret_heads), bool(subset), kv_start=t(kv_start), out=t(outputs[0]))
