"""The ONNX decoder graph against the torch model it is written from (tiny random models of every
family; fresh random weights, heads and tokens), its determinism, and the quantizers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from nectar_export.export.bundle import ExportConfig, compare_backends, quantize_proto
from nectar_export.export.decoder_graph import DecoderGraphWriter
from nectar_export.export.from_model import decoder_weights, full_contexts, graph_spec, nectar_contexts_for_export
from nectar_export.export.graph_builder import portable_model
from nectar_export.export.quantize import quantize_blockwise
from nectar_export.heads import HeadsSpec, NectarHeads, nectar_contexts
from nectar_models.attention import CompositeContext
from nectar_runtime.backends.ort_backend import OrtBackend
from nectar_runtime.backends.torch_backend import TorchBackend
from nectar_runtime.generate import GenerationConfig, generate_ids
from tests.models.tiny import save_tiny

N_CTX, PREFIX = 40, 5


class _Ctx:  # the fields of a DocumentContext the exporter reads
    def __init__(self, ids, prefix_len):
        self.context_ids, self.prefix_len, self.n = ids, prefix_len, len(ids)


@pytest.fixture(scope="module", params=["llama", "llama3-scaled", "qwen2", "qwen3", "gemma3"])
def tiny_model(request, tmp_path_factory):
    from nectar_models.loading import load_model

    return load_model(save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=3)).model


def _random_heads(cfg, variant: str = "mlp", seed: int = 0) -> NectarHeads:
    """Random weights and non-identity standardization statistics (shared with test_retained.py)."""
    widths = tuple(8 if i % 2 else 12 for i in range(cfg.num_layers))
    heads = NectarHeads(HeadsSpec(variant, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, widths, cfg.scale))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for b in heads.buffers():  # standardization statistics: not the identity
            b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return heads


def _backends(model, method: str, variant: str = "mlp", seed: int = 0, dtype=np.float32, tmp=None):
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(seed))
    if method == "full":
        torch_ctx = model.prefill_document(ids[None]).contexts()
        parts = full_contexts(torch_ctx)
    else:
        heads = _random_heads(cfg, variant, seed)
        prefix = model.prefill_document(ids[None, :PREFIX]).contexts()
        torch_ctx = [CompositeContext([p, h]) for p, h in zip(prefix, nectar_contexts(heads, cfg.layer_windows, N_CTX))]
        parts = nectar_contexts_for_export(model, _Ctx(ids.tolist(), PREFIX), heads)
    proto = DecoderGraphWriter(graph_spec(model, N_CTX), decoder_weights(model), parts, dtype).build()
    onnx.checker.check_model(proto)
    sess = _session(proto)
    return TorchBackend(model, torch_ctx, N_CTX), OrtBackend(sess, N_CTX, 1000), proto


def _session(proto):
    import onnxruntime as ort

    from nectar_runtime.backends.ort_backend import session_options

    return ort.InferenceSession(proto.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("method,variant", [("nectar", "mlp"), ("nectar", "quadrature"), ("full", None)])
def test_graph_matches_the_torch_model(tiny_model, method, variant):
    ref, ort_b, proto = _backends(tiny_model, method, variant or "mlp", seed=1)
    # prompt of 9 tokens, then 12 teacher-forced decode steps (past buffers of fixed capacity)
    prompt = np.random.default_rng(0).integers(0, tiny_model.config.vocab_size, 9).tolist()
    r = compare_backends(ref, ort_b, prompt, N_CTX, 12)
    assert r["max_abs_logit_diff"] <= 1e-4 and r["top1_agreement"] == 1.0, r
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version >= 17  # standard ops only


def test_ort_fused_graph_matches_the_torch_model(tiny_model):
    """The quantized bundles' graph form (`ort_fused`: com.microsoft RotaryEmbedding and
    SkipSimplifiedLayerNormalization), at fp32 weights, equals the torch model as the standard one
    does — prefill, decode steps and a left-padded batch."""
    cfg = tiny_model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(21))
    heads = _random_heads(cfg, "mlp", 21)
    prefix = tiny_model.prefill_document(ids[None, :PREFIX]).contexts()
    torch_ctx = [CompositeContext([p, h]) for p, h in zip(prefix, nectar_contexts(heads, cfg.layer_windows, N_CTX))]
    parts = nectar_contexts_for_export(tiny_model, _Ctx(ids.tolist(), PREFIX), heads)
    proto = DecoderGraphWriter(graph_spec(tiny_model, N_CTX), decoder_weights(tiny_model), parts, ort_fused=True).build()
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RotaryEmbedding") == cfg.num_layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * cfg.num_layers - 1  # every residual Add but the last
    assert not [n for n in proto.graph.node if "rotate_half" in n.name or n.name.endswith("attn_residual/Add")]
    ref, ort_b = TorchBackend(tiny_model, torch_ctx, N_CTX), OrtBackend(_session(proto), N_CTX, 1000)
    prompt = np.random.default_rng(21).integers(0, cfg.vocab_size, 9).tolist()
    r = compare_backends(ref, ort_b, prompt, N_CTX, 12)
    assert r["max_abs_logit_diff"] <= 1e-4 and r["top1_agreement"] == 1.0, r
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]  # rows at different positions: RotaryEmbedding's per-row cache lookup
    gen = GenerationConfig(max_new_tokens=6)
    assert np.array_equal(np.stack(list(generate_ids(ref, prompts, gen, set()))), np.stack(list(generate_ids(ort_b, prompts, gen, set()))))


def test_batched_left_padded_generation_equals_torch(tiny_model):
    ref, ort_b, _ = _backends(tiny_model, "nectar", seed=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    cfg = GenerationConfig(max_new_tokens=8)
    a = np.stack(list(generate_ids(ref, prompts, cfg, set())))
    b = np.stack(list(generate_ids(ort_b, prompts, cfg, set())))
    assert np.array_equal(a, b)


def _teacher_forced_logits(backend, prompts, steps: int, capacity: int, seed: int) -> np.ndarray:
    """Left-padded prompts, then `steps` random tokens fed one at a time -> logits [steps + 1, B, V]."""
    from nectar_runtime.backends.base import PAD_POSITION

    b, t = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((b, t), np.int64)
    pos = np.full((b, t), PAD_POSITION, np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = p
        pos[i, t - len(p):] = N_CTX + np.arange(len(p))
    backend.reset(b, capacity)
    out = [np.array(backend.step(ids, pos), np.float64)]
    nxt = N_CTX + np.array([len(p) for p in prompts])
    toks = np.random.default_rng(seed).integers(0, 50, (steps, b))
    for k in range(steps):
        out.append(np.array(backend.step(toks[k][:, None], (nxt + k)[:, None]), np.float64))
    return np.stack(out)


def test_past_pages_turn_without_changing_the_logits(tiny_model, monkeypatch):
    """The ORT backend binds its past in pages (ort_backend.PAGE) as the tokens fill it. With pages of
    3 slots a left-padded batch turns pages inside its prompt and every third decode step: its logits
    equal those of one page holding the whole capacity, and track the torch model."""
    import nectar_runtime.backends.ort_backend as ob

    ref, ort_b, _ = _backends(tiny_model, "nectar", seed=21)
    prompts, steps, cap = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]], 11, 40
    monkeypatch.setattr(ob, "PAGE", 3)
    paged = _teacher_forced_logits(ort_b, prompts, steps, cap, seed=22)
    assert ort_b.bound == 18 and ort_b.length == 7 + steps  # pages turned: 9 slots for the prompt, then 12, 15, 18
    monkeypatch.setattr(ob, "PAGE", 1000)
    whole = _teacher_forced_logits(ort_b, prompts, steps, cap, seed=22)
    assert ort_b.bound == cap
    np.testing.assert_allclose(paged, whole, rtol=0, atol=1e-5)
    torch_logits = _teacher_forced_logits(ref, prompts, steps, cap, seed=22)
    np.testing.assert_allclose(paged, torch_logits, rtol=0, atol=1e-3)


def test_fp16_graph_checks_and_tracks_fp32(tiny_model):
    ref, ort16, proto = _backends(tiny_model, "nectar", seed=4, dtype=np.float16)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    r = compare_backends(ref, ort16, [3, 1, 4, 1, 5], N_CTX, 6)
    assert r["mean_kl"] < 1e-3, r


def test_graph_is_deterministic_and_names_are_documented_paths(tmp_path):
    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=5)).model
    a = _backends(model, "nectar", seed=6)[2].SerializeToString()
    b = _backends(model, "nectar", seed=6)[2].SerializeToString()
    assert a == b
    proto = onnx.load_from_string(a)
    names = [n.name for n in proto.graph.node]
    assert len(set(names)) == len(names)
    assert all(n.startswith("/model/") for n in names)
    assert "/model/layers.0/attn/nectar_heads/in/MatMul" in names and "/model/lm_head/MatMul" in names
    assert [i.name for i in proto.graph.input][:3] == ["input_ids", "position_ids", "attention_mask"]
    assert proto.graph.output[0].name == "logits" and proto.graph.output[1].name == "present.0.key"


def test_blockwise_int4_reproduces_a_q4_1_grid_exactly():
    rng = np.random.default_rng(7)
    k, n = 96, 10  # w = d·q + m per block of 32 inputs (GGUF Q4_1), q spanning 0..15
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d, m = rng.random((n, k // 32, 1)) * 0.05 + 1e-3, rng.standard_normal((n, k // 32, 1)) * 0.1
    w = (q * d + m).reshape(n, k).T.astype(np.float32)
    packed, scales, zeros = quantize_blockwise(w, 4, float_zero=True)
    lo, hi = packed & 0xF, packed >> 4
    qq = np.stack([lo, hi], -1).reshape(n, k // 32, 32).astype(np.float64)
    back = ((qq - zeros.reshape(n, -1, 1)) * scales.reshape(n, -1, 1)).reshape(n, k).T
    assert np.abs(back - w).max() < 1e-6


def _q4_1_weight(rng, k: int, n: int) -> np.ndarray:
    """[K, N] fp32 on a GGUF Q4_1 grid: w = d·q + m per block of 32 inputs, q spanning 0..15."""
    q = rng.integers(0, 16, (n, k // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.random((n, k // 32, 1)) * 0.05 + 1e-3
    m = -8 * d + rng.standard_normal((n, k // 32, 1)) * 0.01  # blocks roughly centred on 0, like real weights
    return (q * d + m).reshape(n, k).T.astype(np.float32)


@pytest.mark.parametrize("k", [96, 1536])  # 3 block sums (one zero-padded block of 16), 48 (two blocks of 32)
def test_int4_matmul_keeps_the_q4_1_weights(k):
    """The int4 form (integer zero point + 8-bit residual over block sums) computes x·W of a Q4_1
    weight far closer than a second 4-bit rounding (int4-rtn) does; fp32 activations (accuracy
    level 0) so only the weights' representation is compared."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from nectar_export.export.quantize import quantize_graph

    rng = np.random.default_rng(k)
    n = 40
    w = _q4_1_weight(rng, k, n)
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    errs = {}
    for kind in ("int4", "int4-rtn"):
        g = helper.make_graph([helper.make_node("MatMul", ["x", "model.layers.0.mlp.down_proj.weight"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 5, k])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "model.layers.0.mlp.down_proj.weight")])
        proto = portable_model(g, [helper.make_opsetid("", 17)])
        done = quantize_graph(proto, kind, accuracy_level=0, heads_min_bytes=1 << 30)
        assert done == {"/model/layers.0/mlp/down_proj/MatMul": 4}
        y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errs[kind] = np.abs(y - exact).max() / np.abs(exact).max()
    assert errs["int4"] < 2e-3, errs  # what is left: R's 8-bit grid, ≤ 1/510 of its range per block
    assert errs["int4"] < errs["int4-rtn"] / 10, errs


def _one_matmul(w: np.ndarray, name: str = "model.layers.0.mlp.down_proj.weight"):
    from onnx import helper, numpy_helper

    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", name], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")],
                          "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 5, k])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [numpy_helper.from_array(w, name)])
    return portable_model(g, [helper.make_opsetid("", 17)])


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantized_matmul_keeps_the_gguf_grid(type_name, kind):
    """Given the weight's GGUF grid, MatMulNBits computes x·W of the GGUF weight itself: exactly with
    integer zero points, within the block-sum residual's 8-bit grid for 4-bit float ones (int4); int8
    rounds the 4-bit float-zero types as before, and both kinds round the 5-bit float-zero types
    (Q5_1, Q5_K) to 8 bits. Rounding a 5-, 6- or 8-bit weight to 4 bits instead is far worse. fp32
    activations (accuracy level 0): only the weights' representation is compared."""
    import onnxruntime as ort

    from nectar_export.export.quantize import quantize_graph, weight_form
    from tests.models.test_gguf_grids import _grid

    name = "model.layers.0.mlp.down_proj.weight"
    grid = _grid(type_name, 40, 512, seed=7)
    w = np.ascontiguousarray(grid.dequantize().T)  # [K, N]
    x = np.random.default_rng(8).standard_normal((1, 5, 512)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)

    def rel_err(grids):
        proto, sources = _one_matmul(w, name), {}
        quantize_graph(proto, kind, accuracy_level=0, heads_min_bytes=1 << 30, grids=grids, sources=sources)
        node = next(nd for nd in proto.graph.node if nd.op_type == "MatMulNBits")
        attrs = {a.name: a.i for a in node.attribute}
        y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        return np.abs(y - exact).max() / np.abs(exact).max(), sources, {**attrs, "inputs": len(node.input)}

    bits, form = weight_form(kind, grid, lm_head=False)
    err, sources, attrs = rel_err({name: grid})
    assert attrs["bits"] == bits
    if form == "grid":
        assert err < 1e-5 and sources == {name: type_name} and attrs["block_size"] == grid.block, (err, attrs)
        # Q8_0's zero points are all MatMulNBits' default (128): left out, so ORT runs its symmetric kernel
        assert attrs["inputs"] == (3 if type_name == "Q8_0" else 4), attrs
    elif form == "grid-offsets":
        assert err < 2e-3 and sources == {name: type_name}, err
    else:  # rounded from the floats, at 8 bits
        assert bits == 8 and not grid.integer_zero and sources == {} and err < 2e-2, err
        assert kind == "int8" or grid.bits == 8
    if kind == "int4" and grid.bits == 8:  # without the grid, int4 rounds the weight to 4 bits
        assert rel_err(None)[0] > 5 * max(err, 1e-4)


def test_grid_zero_points_outside_the_codes_and_foreign_grids():
    """A Q4_1 weight whose zero points are integers outside 0..15 (m = +2d: z = −2) must not be packed
    as integer zero points (a nibble would wrap): it takes the block-sum digits and stays exact. A grid
    that is not the graph's weight (e.g. a transform the reader missed) is not used: the weight is rounded."""
    import onnxruntime as ort

    from nectar_export.export.quantize import quantize_graph, weight_form
    from nectar_models.gguf_grids import decode_grid
    from tests.models.test_gguf_grids import _random_tensor

    name, n, k = "model.layers.0.mlp.down_proj.weight", 8, 256
    raw = _random_tensor("Q4_1", n, k, np.random.default_rng(41)).reshape(-1, 20)
    d = np.abs(raw[:, :2].copy().view(np.float16).astype(np.float32)) + 0.01
    raw[:, :2] = d.astype(np.float16).view(np.uint8)
    raw[:, 2:4] = (2 * d).astype(np.float16).view(np.uint8)  # m = 2d
    grid = decode_grid(raw.ravel(), "Q4_1", n, k)
    assert np.allclose(grid.zero, -2, atol=1e-3) and not grid.integer_zero
    assert weight_form("int4", grid, lm_head=False)[1] == "grid-offsets"
    w = np.ascontiguousarray(grid.dequantize().T)
    x = np.random.default_rng(42).standard_normal((1, 5, k)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    for kind in ("int4", "int8"):
        proto, sources = _one_matmul(w, name), {}
        quantize_graph(proto, kind, accuracy_level=0, heads_min_bytes=1 << 30, grids={name: grid}, sources=sources)
        y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(y - exact).max() / np.abs(exact).max() < 3e-3, kind
        assert sources == ({name: "Q4_1"} if kind == "int4" else {})
    foreign = decode_grid(_random_tensor("Q8_0", n, k, np.random.default_rng(43)), "Q8_0", n, k)
    proto, sources = _one_matmul(w, name), {}
    quantize_graph(proto, "int4", accuracy_level=0, heads_min_bytes=1 << 30, grids={name: foreign}, sources=sources)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # rounded from w (a 4-bit rounding: ~1e-2), not written from the foreign grid (an unrelated weight: ~1)
    assert sources == {} and np.abs(y - exact).max() / np.abs(exact).max() < 5e-2


def test_tied_lookup_in_a_q6_k_lm_head():
    """A tied embedding whose LM head keeps a Q6_K grid (8 bits, blocks of 16): the lookup reads the
    same blocks of 16 and returns the GGUF's rows exactly, and the LM head computes with them."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from nectar_export.export.quantize import quantize_graph
    from tests.models.test_gguf_grids import _grid

    v, h = 48, 256
    grid = _grid("Q6_K", v, h, seed=44)
    table_t = np.ascontiguousarray(grid.dequantize().T)  # [H, V], as the graph stores a tied embedding
    name = "model.embed_tokens.weight_t"
    nodes = [helper.make_node("Gather", [name, "ids"], ["e"], name="/model/embed/Gather", axis=1),
             helper.make_node("Transpose", ["e"], ["x"], name="/model/embed/Transpose", perm=[1, 2, 0]),
             helper.make_node("MatMul", ["x", name], ["logits"], name="/model/lm_head/MatMul")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(table_t, name)])
    proto, sources = portable_model(g, [helper.make_opsetid("", 17)]), {}
    quantize_graph(proto, "int4", accuracy_level=0, heads_min_bytes=1 << 30, grids={name: grid}, sources=sources)
    gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
    assert sources == {name: "Q6_K"} and {a.name: a.i for a in gbq.attribute}["block_size"] == 16
    ids = np.array([[0, 17, v - 1]], np.int64)
    x, logits = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_allclose(x[0], table_t.T[ids[0]], rtol=1e-6, atol=1e-7)
    ref = x[0].astype(np.float64) @ table_t.astype(np.float64)
    assert np.abs(logits[0] - ref).max() <= 1e-5 * np.abs(ref).max()


def test_gguf_grids_through_the_whole_graph(tmp_path):
    """A tiny llama whose weights lie on GGUF grids (gguf's own quantizers: q, k Q5_0, v Q8_0, o and
    down Q4_1, gate/up Q4_0, the tied embedding Q8_0), exported int4 with the grids (stacked q|k|v and
    gate|up, from_model.decoder_grids) at fp32 activations: the graph matches the torch model closely,
    and the lookup table is the Q8_0 embedding exactly; the same graph rounded without the grids does not."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    from nectar_export.export.from_model import decoder_grids
    from nectar_export.export.quantize import quantize_graph
    from nectar_models.gguf_grids import decode_grid
    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=31)).model
    types = {"self_attn.q_proj": "Q5_0", "self_attn.k_proj": "Q5_0", "self_attn.v_proj": "Q8_0",
             "self_attn.o_proj": "Q4_1", "mlp.gate_proj": "Q4_0", "mlp.up_proj": "Q4_0", "mlp.down_proj": "Q4_1"}
    grids = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = "Q8_0" if name == "embed_tokens.weight" else types.get(name.split(".", 2)[-1].rsplit(".", 1)[0])
            if t is None or p.dim() != 2:
                continue
            raw = quantize(p.numpy(), GGMLQuantizationType[t])
            grids[name] = decode_grid(raw.ravel(), t, *p.shape)
            p.copy_(torch.from_numpy(grids[name].dequantize()))  # the model now holds the GGUF weights
    graph_grids = decoder_grids(grids, model)
    assert set(graph_grids) == {f"model.layers.{i}.{w}.weight" for i in range(3)
                                for w in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")} \
        | {"model.embed_tokens.weight_t"}
    assert graph_grids["model.layers.0.attn.qkv_proj.weight"].source == "Q5_0+Q8_0"
    kls = {}
    for with_grids in (True, False):
        ref, _, proto = _backends(model, "full", seed=32)
        sources = {}
        quantize_graph(proto, "int4", accuracy_level=0, heads_min_bytes=1 << 30,
                       grids=graph_grids if with_grids else None, sources=sources)
        assert len(sources) == (13 if with_grids else 0)
        r = compare_backends(ref, OrtBackend(_session(proto), N_CTX, 1000), [5, 6, 7, 8], N_CTX, 8)
        kls[with_grids] = r["mean_kl"]
        if with_grids:
            from onnx import numpy_helper

            inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
            gbq = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized")
            table = (inits[gbq.input[0]].astype(np.float64) - inits[gbq.input[3]]) * inits[gbq.input[2]]
            np.testing.assert_array_equal(table.reshape(table.shape[0], -1).astype(np.float32), grids["embed_tokens.weight"].dequantize())
            assert r["max_abs_logit_diff"] < 2e-2 and r["top1_agreement"] == 1.0, r
    assert kls[True] < kls[False] / 10, kls


@pytest.mark.parametrize("kind", ["int8", "int4", "int4-rtn"])
def test_quantized_graph_runs_and_stays_close(tmp_path, kind):
    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=8)).model
    ref, _, proto = _backends(model, "nectar", seed=9)
    q = proto
    quantize_proto(q, ExportConfig(quantize=kind))
    ops = {n.op_type for n in q.graph.node}
    assert "MatMulNBits" in ops
    # tied embedding: the lookup reads the LM head's 8-bit weights; the fp32 table is gone
    assert "GatherBlockQuantized" in ops and "Gather" not in ops
    assert "model.embed_tokens.weight_t" not in {t.name for t in q.graph.initializer}
    assert "/model/embed/GatherBlockQuantized8" in {n.name for n in q.graph.node}
    r = compare_backends(ref, OrtBackend(_session(q), N_CTX, 1000), [5, 6, 7, 8], N_CTX, 8)
    # random 64-wide weights are far from any quantization grid: a loose bound, still failing on
    # a wrong packing order or a dropped offset (those give KL >> 1)
    assert r["mean_kl"] < 0.05, r


def test_quantized_lookup_is_the_dequantized_lm_head_row(tmp_path):
    """The embedding of token t from the 8-bit lookup equals row t of the LM head's dequantized weights."""
    from onnx import helper, numpy_helper

    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=10)).model
    _, _, proto = _backends(model, "nectar", seed=11)
    q = proto
    quantize_proto(q, ExportConfig(quantize="int4"))  # the LM head is 8-bit in every kind
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    packed, scales, zeros = (inits[i] for i in (gbq.input[0], gbq.input[2], gbq.input[3]))
    table = ((packed.astype(np.float64) - zeros) * scales).reshape(packed.shape[0], -1)  # [V, H]
    reshape = next(n for n in q.graph.node if n.input and n.input[0] == gbq.output[0])
    g = helper.make_graph([gbq, reshape], "lookup", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info(reshape.output[0], onnx.TensorProto.FLOAT, None)],
                          [t for t in q.graph.initializer if t.name in set(gbq.input) | set(reshape.input)])
    sub = portable_model(g, q.opset_import)
    import onnxruntime as ort

    ids = np.array([[0, 7, table.shape[0] - 1]], np.int64)
    out = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    assert out.shape == (1, 3, table.shape[1])
    np.testing.assert_allclose(out[0], table[ids[0]], rtol=0, atol=1e-6)
    w = model.embed_tokens.weight.detach().double().numpy()[ids[0]]
    assert np.abs(out[0] - w).max() < np.abs(w).max() / 100  # and within an 8-bit step of the true embedding


def test_decode_steps_allocate_nothing_per_token(tmp_path, monkeypatch):
    """After reset and the prompt, a decode step writes into bound buffers: nothing the backend
    allocates (numpy arrays included: tracemalloc sees numpy's allocator) grows with the number
    of steps. ONNX Runtime's own binding code is not ours to count. Pages are made larger than the
    steps here: a page turn (once every ort_backend.PAGE tokens) rebinds, which allocates views,
    the wider mask and the binding's OrtValues, and is checked in test_past_pages_turn_…"""
    import tracemalloc

    import nectar_runtime.backends.ort_backend as ob
    from nectar_models.loading import load_model

    monkeypatch.setattr(ob, "PAGE", 128)

    model = load_model(save_tiny("llama", tmp_path / "m", seed=16)).model
    _, ort_b, _ = _backends(model, "nectar", seed=17)
    ort_b.reset(1, 80)
    ort_b.step(np.array([[1, 2, 3]]), N_CTX + np.arange(3)[None])
    tok, pos = np.array([[4]]), np.array([[N_CTX + 3]])
    for _ in range(3):  # warm up
        ort_b.step(tok, pos)
        pos += 1
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(60):
        ort_b.step(tok, pos)
        pos += 1
    stats = tracemalloc.take_snapshot().compare_to(before, "filename")
    tracemalloc.stop()
    ours = [s for s in stats if s.traceback[0].filename.endswith("ort_backend.py")]
    grown = sum(s.size_diff for s in ours)
    assert grown <= 256, [(str(s.traceback), s.size_diff, s.count_diff) for s in ours]  # one returned view object


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("h", [3, 1])
@pytest.mark.parametrize("k,block", [(45, 32), (100, 64)])
def test_heads_batched_matmul_goes_to_n_bits_per_kv_head(h, bits, k, block):
    """A heads MatMul x [B, H, R, K] @ w [H, K, N] (K not a multiple of the block) becomes Split + H
    MatMulNBits (8 bits, the exporter's default; 4 with ExportConfig(heads_bits=4)) + Concat (one
    MatMulNBits alone when H = 1) that computes x @ dequantized(w_h) for every head h, in blocks of
    32 or 64 inputs (ExportConfig.heads_block; the exporter's default 128), zero-padded to 2 blocks."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from nectar_export.export.quantize import quantize_graph

    rng = np.random.default_rng(12)
    r, n = 5, 70
    w = rng.standard_normal((h, k, n)).astype(np.float32)
    name = "model.layers.0.nectar_heads.w2"
    node = helper.make_node("MatMul", ["x", name], ["y"], name="/model/layers.0/attn/nectar_heads/mid/MatMul")
    g = helper.make_graph([node], "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, h, r, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, name)])
    proto = portable_model(g, [helper.make_opsetid("", 17)])
    # accuracy_level 0: fp32 activations, so the graph must equal x @ dequantized weights to fp32 rounding
    assert quantize_graph(proto, "int4", accuracy_level=0, heads_min_bytes=0, heads_bits=bits, heads_block=block) == {node.name: bits}
    assert {a.i for nd in proto.graph.node if nd.op_type == "MatMulNBits" for a in nd.attribute if a.name == "block_size"} == {block}
    names = [nd.name for nd in proto.graph.node]
    per_head = [f"/model/layers.0/attn/nectar_heads/mid/head{i}/MatMulNBits{bits}" for i in range(h)]
    assert names == (per_head if h == 1 else ["/model/layers.0/attn/nectar_heads/mid/heads/Split", *per_head,
                                               "/model/layers.0/attn/nectar_heads/mid/heads/Concat"])
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert name not in inits  # the fp32 weight is gone
    deq = []
    for i in range(h):
        q, s, z = (inits[f"{name}.head{i}.q{bits}{sfx}"] for sfx in ("", ".scales", ".zero_points"))
        blocks = q.shape[1]  # ceil(45 / 32) = ceil(100 / 64) = 2: zero-padded rows
        if bits == 4:  # two per byte, low nibble first (zero points likewise, per row of blocks)
            q = np.stack([q & 15, q >> 4], axis=-1).reshape(n, blocks, -1)
            z = np.stack([z & 15, z >> 4], axis=-1).reshape(n, -1)[:, :blocks]
        full = ((q.astype(np.float64) - z.reshape(n, blocks, 1)) * s.reshape(n, blocks, 1)).reshape(n, -1).T
        assert blocks == 2 and np.abs(full[k:]).max() < 1e-6
        deq.append(full[:k])
        assert np.abs(full[:k] - w[i]).max() <= (w[i].max() - w[i].min()) / ((1 << bits) - 1)  # within one step
    x = rng.standard_normal((2, h, r, k)).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.einsum("bhrk,hkn->bhrn", x.astype(np.float64), np.stack(deq)), rtol=1e-4, atol=1e-4)


def test_quantized_bundle_keeps_no_fp32_heads_weights(tmp_path):
    """int8 replaces every fp32 heads weight by per-KV-head 8-bit ones; heads=False keeps them fp32,
    and so does the default size floor for weights this small (a few KB)."""
    from nectar_models.loading import load_model

    model = load_model(save_tiny("llama", tmp_path / "m", seed=13)).model
    _, _, proto = _backends(model, "nectar", seed=14)
    small = onnx.ModelProto.FromString(proto.SerializeToString())
    quantize_proto(small, ExportConfig(quantize="int8"))  # default heads_min_bytes
    assert "model.layers.0.nectar_heads.w2" in {t.name for t in small.graph.initializer}
    assert not [n for n in small.graph.node if "/nectar_heads/" in n.name and n.op_type == "MatMulNBits"]
    q = proto
    quantize_proto(q, ExportConfig(quantize="int8", heads_min_bytes=0))
    # every heads weight but the score network's (`w2_lse`, `w3_lse`), which stays fp32 in every kind
    assert [t.name for t in q.graph.initializer if ".nectar_heads.w" in t.name and ".q8" not in t.name] == \
        [f"model.layers.{i}.nectar_heads.{w}_lse" for i in range(model.config.num_layers) for w in ("w2", "w3")]
    per_layer = [n.name for n in q.graph.node if n.name.startswith("/model/layers.0/attn/nectar_heads/") and n.op_type == "MatMulNBits"]
    assert len(per_layer) == 3 * model.config.num_kv_heads  # in, mid, out for each KV head
    _, _, proto = _backends(model, "nectar", seed=14)
    quantize_proto(proto, ExportConfig(quantize="int8", heads_min_bytes=0, quantize_lse=True))  # the score network at 8 bits too, for A/B runs
    assert not [t.name for t in proto.graph.initializer if ".nectar_heads.w" in t.name and ".q8" not in t.name]
    _, _, proto = _backends(model, "nectar", seed=14)
    kept = proto
    quantize_proto(kept, ExportConfig(quantize="int8", quantize_heads=False))  # the heads stay fp32
    assert "model.layers.0.nectar_heads.w2" in {t.name for t in kept.graph.initializer}
    assert not [n for n in kept.graph.node if "/nectar_heads/" in n.name and n.op_type == "MatMulNBits"]


def test_int8_bundle_with_8_bit_heads_tracks_the_torch_model(tiny_model):
    """Every family (Gemma 3's sliding-window layers too): one MatMulNBits per KV head for each heads
    matmul but the fp32 score network's, and the quantized graph stays within int8 rounding of the fp32 torch model."""
    ref, _, proto = _backends(tiny_model, "nectar", seed=15)
    batched = [n.name for n in proto.graph.node if "/nectar_heads/" in n.name and n.op_type == "MatMul" and "/lse" not in n.name]
    q = proto
    quantize_proto(q, ExportConfig(quantize="int8", heads_min_bytes=0))
    per_head = [n.name for n in q.graph.node if "/nectar_heads/" in n.name and n.op_type == "MatMulNBits"]
    assert batched and len(per_head) == len(batched) * tiny_model.config.num_kv_heads
    r = compare_backends(ref, OrtBackend(_session(q), N_CTX, 1000), [5, 6, 7, 8], N_CTX, 8)
    assert r["mean_kl"] < 1e-3, r  # measured ≤ 1e-5 on these tiny models; a wrong packing gives KL ≫ 1e-3


def test_export_config_refuses_heads_bits_other_than_4_or_8():
    from nectar_export.export.bundle import ExportConfig, heads_bits
    from nectar_runtime.errors import NectarError

    assert heads_bits(ExportConfig(quantize="int4")) == 8 and heads_bits(ExportConfig(quantize="int8", heads_bits=4)) == 4
    with pytest.raises(NectarError, match="heads_bits = 5"):
        ExportConfig(quantize="int4", heads_bits=5)
    with pytest.raises(NectarError, match="accuracy_level = 5"):
        ExportConfig(quantize="int4", accuracy_level=5)


def test_real_gemma3_int4_keeps_its_gguf_codes(gemma3_gguf):
    """Gemma 3 270M (Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 weights) through the whole graph, document KV baked
    (`--method full`), int4 on the file's own codes: every weight matmul keeps them, and the graph
    follows the torch model (rounding those weights to 4 bits instead checked at top-1 0.62, KL 0.37)."""
    from nectar_export.export.bundle import base_model_grids
    from nectar_export.export.quantize import quantize_graph
    from nectar_models.loading import load_model
    from nectar_runtime.tokenizer import load_tokenizer

    lm = load_model(gemma3_gguf)
    tok = load_tokenizer(gemma3_gguf)
    doc = tok.encode("The tar command stores many files in one archive. Use -c to create an archive, -x to extract it, "
                     "-t to list what it holds and -f to name the archive file.")
    n = len(doc)
    torch_ctx = lm.model.prefill_document(torch.tensor([doc])).contexts()
    proto = DecoderGraphWriter(graph_spec(lm.model, n), decoder_weights(lm.model), full_contexts(torch_ctx), ort_fused=True).build()
    sources = {}
    done = quantize_graph(proto, "int4", heads_min_bytes=1 << 30, grids=base_model_grids(lm), sources=sources)
    assert len(sources) == len(done) == 4 * lm.config.num_layers + 1
    assert set(sources.values()) == {"Q4_K", "Q5_0", "Q5_0+Q8_0", "Q6_K", "Q8_0"}
    r = compare_backends(TorchBackend(lm.model, torch_ctx, n), OrtBackend(_session(proto), n, 64),
                         tok.encode("\nQuestion: Which option lists an archive?\nAnswer:"), n, 16)
    assert r["top1_agreement"] >= 0.9 and r["mean_kl"] < 0.02, r
