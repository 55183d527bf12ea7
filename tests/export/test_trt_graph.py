"""The TensorRT-flavoured graph: one NectarAttention node per layer (custom domain), checked by
onnx.checker and shape inference, and executed end to end by ONNX's reference evaluator with
the kernel's PyTorch reference standing in for the TensorRT plugin — same logits as the torch
model. Building and running a real engine needs TensorRT (skipped where it is not installed)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.export.test_onnx_graph import N_CTX, PREFIX, _Ctx, _random_heads
from tests.models.tiny import save_tiny


class _Artifact:  # the fields of an OpenArtifact build_trt_proto reads
    def __init__(self, model, ids, heads, retained=None):
        self.base = type("Base", (), {"model": model})()
        self.ctx, self.heads, self.retained = _Ctx(ids, PREFIX), heads, retained


def _nectar_attention_op():
    from onnx.reference.op_run import OpRun

    class NectarAttention(OpRun):
        op_domain = "nectar"

        def _run(self, q, k, v, kv_len, kv_start, hw, hb, variant=None, width=None, scale=None,
                 plugin_namespace=None, plugin_version=None):
            from nectar_kernels.reference import nectar_layer_attention_reference

            t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731 (writable copies)
            variant = variant.decode() if isinstance(variant, bytes) else variant
            o = nectar_layer_attention_reference(t(q), t(k), t(v), t(kv_len), t(hw), t(hb), variant, int(width),
                                                 float(scale), kv_start=t(kv_start), compute_dtype=torch.float64)
            return (o.numpy().astype(q.dtype),)

    return NectarAttention


def _nectar_retained_attention_op():
    from onnx.reference.op_run import OpRun

    class NectarRetainedAttention(OpRun):
        op_domain = "nectar"

        def _run(self, q, k, v, kv_len, kv_start, hw, hb, ret_k, ret_v, ret_heads, variant=None, width=None, scale=None,
                 subset=None, plugin_namespace=None, plugin_version=None):
            from nectar_kernels.reference import nectar_retained_attention_reference

            t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
            variant = variant.decode() if isinstance(variant, bytes) else variant
            o = nectar_retained_attention_reference(t(q), t(k), t(v), t(kv_len), t(hw), t(hb), variant, int(width), float(scale),
                                                    t(ret_k), t(ret_v), t(ret_heads), bool(subset), kv_start=t(kv_start),
                                                    compute_dtype=torch.float64)
            return (o.numpy().astype(q.dtype),)

    return NectarRetainedAttention


def _check_graph_steps(proto, ref, cfg, steps: int) -> None:
    """Run the plugin graph (ONNX's reference evaluator, the kernel's PyTorch reference standing in for
    the plugin) and the torch backend `ref` side by side: a 5-token prompt, then greedy tokens; the
    graph's last logits must match at every step, its present KV fed back as the next past."""
    from onnx.reference import ReferenceEvaluator

    ref.reset(1, 32)
    ev = ReferenceEvaluator(proto, new_ops=[_nectar_attention_op(), _nectar_retained_attention_op()])
    past = {f"past_key_values.{i}.{k}": np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_layers) for k in ("key", "value")}
    toks, pos, total = np.array([[3, 1, 4, 1, 5]]), N_CTX + np.arange(5)[None], 0
    for _ in range(steps):
        want = ref.step(toks, pos)
        total += toks.shape[1]
        outs = ev.run(None, {"input_ids": toks, "position_ids": pos, "attention_mask": np.ones((1, total), np.int64), **past})
        assert np.abs(outs[0][:, -1] - want).max() < 1e-4
        for name, val in zip([o.name for o in proto.graph.output][1:], outs[1:]):
            key = name.replace("present", "past_key_values")
            past[key] = np.concatenate([past[key], val], axis=2)
        toks, pos = want.argmax(-1)[:, None], pos[:, -1:] + 1


@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
def test_trt_graph_checks_and_matches_the_torch_model(tmp_path, variant):
    from nectar_export.export.trt_graph import build_trt_proto
    from nectar_export.heads import nectar_contexts
    from nectar_models.attention import CompositeContext
    from nectar_models.loading import load_model
    from nectar_runtime.backends.torch_backend import TorchBackend

    model = load_model(save_tiny("llama", tmp_path / "m", seed=11)).model
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(12))
    heads = _random_heads(cfg, variant, 13)
    proto = build_trt_proto(_Artifact(model, ids.tolist(), heads))
    onnx.checker.check_model(proto)
    inferred = onnx.shape_inference.infer_shapes(proto)
    ops = [n for n in proto.graph.node if n.op_type == "NectarAttention"]
    assert len(ops) == cfg.num_layers and all(n.domain == "nectar" for n in ops)
    assert {o.domain for o in inferred.opset_import} == {"", "nectar"}

    prefix = model.prefill_document(ids[None, :PREFIX]).contexts()
    ref = TorchBackend(model, [CompositeContext([p, h]) for p, h in zip(prefix, nectar_contexts(heads, cfg.layer_windows, N_CTX))], N_CTX)
    _check_graph_steps(proto, ref, cfg, 4)


@pytest.mark.parametrize("tokens", [0, 11], ids=["all-tokens", "token-budget"])
def test_trt_graph_with_retained_heads_is_one_plugin_node_per_layer(tmp_path, tokens):
    """Layers with retained heads (nectar fit --retain-heads) are one NectarRetainedAttention node each
    (the retained heads' stored KV as constant inputs), the others NectarAttention; with the plugins'
    reference the graph gives the torch model's logits (RetainedHeadsContext)."""
    from nectar_export.export.trt_graph import build_trt_proto
    from nectar_export.heads import nectar_contexts
    from nectar_export.retained import RetainedKV, retained_contexts
    from nectar_models.attention import CompositeContext
    from nectar_models.loading import load_model
    from nectar_runtime.backends.torch_backend import TorchBackend

    model = load_model(save_tiny("llama", tmp_path / "m", seed=11)).model
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(12))
    heads = _random_heads(cfg, "mlp", 13)
    modules = [(0, 1), (cfg.num_layers - 1, 0)]
    picked = None
    if tokens:
        g = torch.Generator().manual_seed(5)
        picked = {l: torch.sort(torch.randperm(N_CTX - PREFIX, generator=g)[:tokens]).values[None] for l, _ in modules}
    full = model.prefill_document(ids[None]).contexts()
    kept = RetainedKV.from_document([c.select(torch.arange(PREFIX, N_CTX)) for c in full], modules, PREFIX, "int8", picked)
    proto = build_trt_proto(_Artifact(model, ids.tolist(), heads, kept))
    onnx.checker.check_model(proto)
    onnx.shape_inference.infer_shapes(proto)
    def layers(op):
        return {int(n.name.split("layers.")[1].split("/")[0]) for n in proto.graph.node if n.op_type == op}

    assert layers("NectarRetainedAttention") == {l for l, _ in modules}
    assert layers("NectarAttention") == set(range(cfg.num_layers)) - {l for l, _ in modules}
    node = next(n for n in proto.graph.node if n.op_type == "NectarRetainedAttention")
    assert {a.name: a.i for a in node.attribute if a.name == "subset"} == {"subset": int(bool(tokens))}
    assert not any("/attn/retained/" in n.name for n in proto.graph.node)  # no standard-op attention left

    prefix = model.prefill_document(ids[None, :PREFIX]).contexts()
    served = retained_contexts(nectar_contexts(heads, cfg.layer_windows, N_CTX), kept, cfg.scale)
    _check_graph_steps(proto, TorchBackend(model, [CompositeContext([p, h]) for p, h in zip(prefix, served)], N_CTX), cfg, 3)


def test_trt_engine_builds_and_runs(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it needs NVIDIA's package index and a GPU)")
    pytest.importorskip("torch").cuda.is_available() or pytest.skip("TensorRT needs a CUDA GPU")
    from nectar_export.export.trt import build_engine

    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=14)).model
    ids = torch.randint(0, model.config.vocab_size, (N_CTX,)).tolist()
    heads = _random_heads(model.config, "mlp", 15)
    from nectar_export.export.trt_graph import build_trt_proto

    plan = build_engine(build_trt_proto(_Artifact(model, ids, heads)), tmp_path, max_local_len=64)
    assert plan.stat().st_size > 0


class PluginGraphBackend:
    """A TensorRT plugin graph on ONNX's reference evaluator (the plugins' PyTorch references standing in
    for TensorRT), with the backend interface compare_backends drives: reset(batch, capacity), step(ids,
    positions) -> last logits [1, V]. One sequence, its local KV grown by concatenation."""

    def __init__(self, proto):
        from onnx.reference import ReferenceEvaluator

        self.proto = proto
        self.ev = ReferenceEvaluator(proto, new_ops=[_nectar_attention_op(), _nectar_retained_attention_op()])
        self.past_names = [i.name for i in proto.graph.input if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in proto.graph.output][1:]

    def reset(self, batch: int, capacity: int) -> None:
        shape = {d.name: d for d in self.proto.graph.input}
        self.past = {}
        for name in self.past_names:
            dims = shape[name].type.tensor_type.shape.dim
            self.past[name] = np.zeros((1, dims[1].dim_value, 0, dims[3].dim_value), np.float32)
        self.total = 0

    def step(self, ids, positions):
        self.total += ids.shape[1]
        outs = self.ev.run(None, {"input_ids": np.asarray(ids, np.int64), "position_ids": np.asarray(positions, np.int64),
                                  "attention_mask": np.ones((1, self.total), np.int64), **self.past})
        for name, val in zip(self.present_names, outs[1:]):
            key = name.replace("present", "past_key_values")
            self.past[key] = np.concatenate([self.past[key], val], axis=2)
        return outs[0][:, -1]
