"""Collection, training and the artifact on a tiny random model (seconds, no real weights)."""

from __future__ import annotations

import json

import pytest
import torch

from nectar_export.collect import collect_queries
from nectar_export.config import FitConfig
from nectar_export.fit import fit_heads, layer_errors
from nectar_export.heads import HeadsSpec, NectarHeads, nectar_contexts
from nectar_models.config import ModelConfig
from nectar_models.llama import Decoder


def test_collected_targets_are_the_exact_document_attention(tiny):
    model, cache, probes = tiny
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes[:5], progress=False)
    assert qs.n == sum(len(p) for p in probes[:5])
    ctx0 = cache.contexts()[0]
    q = qs.q[0][:7]  # [N, Hkv, G, D]
    o, lse = ctx0(q.permute(1, 2, 0, 3)[None], torch.zeros(1, 7, dtype=torch.long))
    assert torch.allclose(o[0].permute(2, 0, 1, 3), qs.o[0][:7], atol=1e-5)
    assert torch.allclose(lse[0].permute(2, 0, 1), qs.lse[0][:7], atol=1e-5)
    assert int(qs.positions.min()) >= cache.context_len


def test_fp16_storage_is_the_fp32_records_rounded(tiny):
    model, cache, probes = tiny
    f32 = collect_queries(model, cache.contexts(), cache.context_len, probes[:6], progress=False)
    f16 = collect_queries(model, cache.contexts(), cache.context_len, probes[:6], progress=False, store_dtype=torch.float16)
    for layer in range(model.config.num_layers):
        assert f16.q[layer].dtype == f16.o[layer].dtype == torch.float16
        assert f16.lse[layer].dtype == f16.lse_loc[layer].dtype == torch.float32  # lse is never rounded
        assert torch.equal(f16.q[layer], f32.q[layer].half()) and torch.equal(f16.o[layer], f32.o[layer].half())
        assert torch.equal(f16.lse[layer], f32.lse[layer])
        assert f16.q[layer].element_size() * 2 == f32.q[layer].element_size()
    again = f32.stored_as(torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(again.o, f16.o)) and f16.stored_as(torch.float16) is f16


def test_fp16_storage_refuses_an_overflow_rather_than_storing_inf(tiny):
    from nectar_export.collect import QuerySet
    from nectar_runtime.errors import NectarError

    model, cache, probes = tiny
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes[:2], progress=False)
    big = QuerySet([x * 1e5 for x in qs.q], qs.o, qs.lse, qs.lse_loc, qs.probe_index, qs.positions)
    with pytest.raises(NectarError, match="beyond fp16's range.*--query-dtype float32"):
        big.stored_as(torch.float16)


def test_fp16_overflow_is_caught_per_element_even_beside_a_non_finite_value():
    from nectar_export.collect import _stored

    x = torch.tensor([float("-inf"), 1.0, 7e4])  # -inf is legitimately stored; 7e4 is not fp16
    flag = torch.zeros((), dtype=torch.bool)
    _stored(x, torch.float16, flag)
    assert bool(flag)
    flag = torch.zeros((), dtype=torch.bool)
    _stored(x[:2], torch.float16, flag)
    assert not bool(flag)


@pytest.mark.parametrize("train_dtype", ["float32", "bfloat16"])
def test_fp16_stored_queries_fit_like_fp32(tiny, train_dtype):
    f32, _ = _fit(tiny, steps=100, train_dtype=train_dtype, linear_init=True)
    f16, _ = _fit(tiny, steps=100, train_dtype=train_dtype, linear_init=True, query_dtype="float16")
    e32, e16 = f32.heldout["o_rel_error"], f16.heldout["o_rel_error"]
    assert e16 != e32  # the rounding does reach the fit (not silently fp32)
    assert all(abs(a - b) <= 0.02 * a for a, b in zip(e32, e16)), (e32, e16)


def _fit(tiny, **kw):
    model, cache, probes = tiny
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False,
                         store_dtype=getattr(torch, kw.get("query_dtype", "float32")))
    held = qs.probe_index >= 20
    cfg = model.config
    spec_for = lambda w: HeadsSpec(kw.get("variant", "mlp"), cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(w), cfg.scale)  # noqa: E731
    fit_cfg = FitConfig(steps=kw.get("steps", 60), batch=256, seed=3, variant=kw.get("variant", "mlp"),
                        allocation=kw.get("allocation", "uniform"), probe_steps=20,
                        train_dtype=kw.get("train_dtype", "float32"), linear_init=kw.get("linear_init", False))
    res = fit_heads(qs.select(~held), qs.select(held), spec_for, 20_000, fit_cfg,
                    [(c.k, c.v) for c in cache.contexts()], progress=False)
    return res, qs.select(held)


@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
def test_training_reduces_heldout_error(tiny, variant):
    few, held = _fit(tiny, steps=2, variant=variant)
    many, _ = _fit(tiny, steps=150, variant=variant)
    e_few = sum(few.heldout["o_rel_error"])
    e_many = sum(many.heldout["o_rel_error"])
    assert e_many < 0.7 * e_few
    assert layer_errors(many.heads, held)["o_rel_error"] == many.heldout["o_rel_error"]


def test_linear_init_is_the_least_squares_fit_and_starts_lower(tiny):
    from nectar_export.fit import ModuleData, init_linear_part, init_statistics

    model, cache, probes = tiny
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False)
    cfg = model.config
    heads = NectarHeads(HeadsSpec("mlp", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, (16,) * cfg.num_layers, cfg.scale))
    data = [ModuleData(qs, ls) for ls in heads.group_layers]
    init_statistics(heads, data, None)
    g, d = heads.groups[0], data[0]
    init_linear_part(g, d, "none", ridge=0.0)
    x = (d.q[1] - g.q_mean[1]) / g.q_std[1]  # module 1: [S, D]
    y = (d.o[1] - g.o_mean[1]) / g.o_std[1]
    beta = torch.linalg.lstsq(torch.cat([x, torch.ones_like(x[:, :1])], 1).double(), y.double()).solution.float()
    assert torch.allclose(g.skip[1], beta[:-1], atol=1e-3) and torch.allclose(g.b3[1, 0], beta[-1], atol=1e-3)
    # before any real training (1 warmup step) the linear start is far better than the random skip
    cold, _ = _fit(tiny, steps=1)
    warm, _ = _fit(tiny, steps=1, linear_init=True)
    assert sum(warm.heldout["o_rel_error"]) < 0.7 * sum(cold.heldout["o_rel_error"])


def test_bfloat16_training_matches_float32(tiny):
    from nectar_export.fit import train_dtype

    assert train_dtype("float32", torch.device("cpu")) == torch.float32
    assert train_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    few, _ = _fit(tiny, steps=2, train_dtype="bfloat16")
    fp32, _ = _fit(tiny, steps=150)
    bf16, _ = _fit(tiny, steps=150, train_dtype="bfloat16")
    e32, e16 = sum(fp32.heldout["o_rel_error"]), sum(bf16.heldout["o_rel_error"])
    assert e16 < 0.7 * sum(few.heldout["o_rel_error"])
    assert abs(e16 - e32) < 0.1 * e32
    assert all(p.dtype == torch.float32 for p in bf16.heads.parameters())


def test_fit_is_deterministic_given_a_seed(tiny):
    a, _ = _fit(tiny, steps=10)
    b, _ = _fit(tiny, steps=10)
    for (k, x), (_, y) in zip(a.heads.state_dict().items(), b.heads.state_dict().items()):
        assert torch.equal(x, y), k


def test_adaptive_allocation_runs_at_equal_budget(tiny):
    res, _ = _fit(tiny, steps=5, allocation="adaptive")
    assert res.allocation_probe is not None and res.heads.spec.total_params() <= 20_000


def test_artifact_round_trip_and_base_model_check(tiny, tmp_path):
    from nectar_export.artifact import load_heads, read_manifest, save_artifact
    from nectar_runtime.document import read_stored_document
    from nectar_runtime.errors import NectarError

    res, _ = _fit(tiny, steps=5)
    text = "line one\r\nline two\rcafé\n"  # CRLF, a lone CR, non-ASCII: must come back byte for byte
    man = {"base_model": {"name": "tiny", "sha256": "ab" * 32}, "document": {"sha256": "x", "n_tokens": 1}, "kv_bytes": 1}
    out = save_artifact(tmp_path / "art", res.heads, man, text)
    assert read_stored_document(out / "document.txt") == text
    m = read_manifest(out)
    assert m["format_version"] == 1 and m["spec"]["widths"] == list(res.widths)
    heads = load_heads(out, m, "ab" * 32)
    q = torch.randn(1, 2, 2, 3, 8)
    pos = torch.zeros(1, 3, dtype=torch.long)
    o1, _ = nectar_contexts(heads)[0](q, pos)
    o0, _ = nectar_contexts(res.heads)[0](q, pos)
    assert torch.allclose(o0, o1, atol=2e-2, rtol=1e-2)  # stored as fp16
    with pytest.raises(NectarError, match="sha256"):
        load_heads(out, m, "cd" * 32)
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(NectarError, match="format_version"):
        read_manifest(out)
    for bad, needle in (([1, 2], "JSON object"), ({k: v for k, v in m.items() if k != "document"}, "document")):
        (out / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(NectarError, match=needle):
            read_manifest(out)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temp dirs left behind


def test_damaged_heads_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from nectar_export.artifact import load_heads, read_manifest, save_artifact
    from nectar_runtime.errors import NectarError

    res, _ = _fit(tiny, steps=5)
    man = {"base_model": {"name": "tiny", "sha256": "ab" * 32}, "document": {"sha256": "x", "n_tokens": 1}}
    out = save_artifact(tmp_path / "art", res.heads, man, "doc")
    m = read_manifest(out)
    f = out / "heads.safetensors"
    state = load_file(str(f))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(f))
    with pytest.raises(NectarError, match="sha256"):  # any change to the file
        load_heads(out, m, "ab" * 32)
    del m["heads_sha256"]  # an artifact from before the hash: the values are still checked
    with pytest.raises(NectarError, match="non-finite"):
        load_heads(out, m, "ab" * 32)
    state[name] = state[name][..., :1].contiguous() if state[name].dim() > 1 else state[name][:1].contiguous()
    save_file(state, str(f))
    with pytest.raises(NectarError, match="shape"):
        load_heads(out, m, "ab" * 32)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from nectar_export import artifact

    heads = NectarHeads(HeadsSpec("mlp", 1, 1, 8, (16,), 0.35))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError):
        artifact.save_artifact(tmp_path / "art", heads, {}, "doc")
    assert list(tmp_path.iterdir()) == []


def test_exact_prefix_plus_heads_equal_to_full_context_when_heads_are_exact(tiny):
    """Quadrature nodes = the document's own keys/values: prefix + heads reproduce full attention."""
    from nectar_runtime.document import DocumentContext
    from nectar_export.pipeline import nectar_with_prefix, split_prefix

    model, cache, probes = tiny
    cfg = model.config
    ids = tuple(range(80))
    doc_ids = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(0))
    full = model.prefill_document(doc_ids).contexts()
    p = 6
    ctx = DocumentContext("t", "s", "t", tuple(doc_ids[0].tolist()), True, prefix_len=p)
    _, doc = split_prefix(full, p)
    heads = NectarHeads(HeadsSpec("quadrature", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, (80 - p,) * cfg.num_layers, cfg.scale))
    with torch.no_grad():
        for layer, d in enumerate(doc):
            gi, start = heads.layer_slot[layer]
            heads.groups[gi].keys[start : start + cfg.num_kv_heads] = d.k[0]
            heads.groups[gi].values[start : start + cfg.num_kv_heads] = d.v[0]
            heads.groups[gi].bias[start : start + cfg.num_kv_heads] = 0
    local = torch.tensor([probes[0]])
    pos = 80 + torch.arange(local.shape[1])[None]
    with torch.no_grad():
        want = model(local, pos, model.new_cache(1, 64, full, 80))
        got = model(local, pos, model.new_cache(1, 64, nectar_with_prefix(model, ctx, heads, "cpu"), 80))
    assert len(ids) == 80 and (want - got).abs().max().item() < 1e-4


def _queries_on(qs, device):
    from nectar_export.collect import QuerySet

    move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
    return QuerySet(move(qs.q), move(qs.o), move(qs.lse), move(qs.lse_loc), qs.probe_index, qs.positions)


def _two_trainings(tiny, device, steps, train_dtype, graph_kw):
    """(eager curve, device-loop curve, eager heads, device-loop heads) from the same start."""
    from nectar_export.fit import build_heads, train_heads, train_heads_graphed

    model, cache, probes = tiny
    qs = _queries_on(collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False), device)
    cfg = model.config
    spec = HeadsSpec("mlp", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, (16, 32), cfg.scale)
    fit_cfg = FitConfig(steps=steps, batch=256, seed=3, train_dtype=train_dtype, warmup=10)
    out = []
    for run in (lambda h, d: train_heads(h, d, fit_cfg, steps, progress=False, graph=False),
                lambda h, d: train_heads_graphed(h, d, fit_cfg, steps, progress=False, **graph_kw)):
        torch.manual_seed(0)
        heads, data = build_heads(spec, qs, fit_cfg, None, device)
        out.append((run(heads, data), heads))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def test_device_loop_training_reproduces_the_eager_loss_curve_on_cpu(tiny):
    """The graphed trainer's step (device tables of rows and learning rates, tensor-lr Adam, the
    curve on the device) run eagerly on the CPU: the same curve as the eager loop."""
    eager, loop, _, _ = _two_trainings(tiny, "cpu", 40, "float32", {"capture": False})
    assert len(eager) == len(loop) == 40
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, loop)) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("train_dtype", ["float32", "bfloat16"])
def test_graphed_training_reproduces_the_eager_loss_curve_on_cuda(tiny, train_dtype):
    """One CUDA graph per step (fused capturable Adam, tensor lr) against the eager CUDA loop: the
    same rows, the same curve up to Adam's and the fp32 learning rate's rounding; replays are
    deterministic."""
    eager, graphed, h_eager, h_graphed = _two_trainings(tiny, "cuda", 300, train_dtype, {})
    _, again, _, _ = _two_trainings(tiny, "cuda", 300, train_dtype, {})
    assert graphed == again
    rel = [abs(a - b) / abs(a) for a, b in zip(eager, graphed)]
    assert max(rel[:50]) < 1e-3 and max(rel) < 2e-2, (max(rel[:50]), max(rel))
    assert abs(sum(eager[-20:]) - sum(graphed[-20:])) < 5e-3 * sum(eager[-20:])
    assert not any(p.grad is not None for p in h_graphed.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adaptive_fit_on_cuda_graphed_matches_eager(tiny, monkeypatch):
    """The whole fit (allocation probe + final training, two graphs in one process) on CUDA."""
    model, cache, probes = tiny
    qs = _queries_on(collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False), "cuda")
    held = qs.probe_index >= 20
    cfg = model.config
    spec_for = lambda w: HeadsSpec("mlp", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(w), cfg.scale)  # noqa: E731
    fit_cfg = FitConfig(steps=200, batch=256, seed=3, allocation="adaptive", probe_steps=30)
    runs = {}
    for graph in ("1", "0"):
        monkeypatch.setenv("NECTAR_FIT_GRAPH", graph)
        runs[graph] = fit_heads(qs.select(~held), qs.select(held), spec_for, 20_000, fit_cfg, None, progress=False)
    assert runs["1"].widths == runs["0"].widths
    e1, e0 = sum(runs["1"].heldout["o_rel_error"]), sum(runs["0"].heldout["o_rel_error"])
    assert abs(e1 - e0) < 0.02 * e0, (e1, e0)


def test_fused_adam_is_torch_adams_fused_kernel():
    """FusedAdam (the graphed trainer's optimizer) = torch.optim.Adam(fused=True), bit for bit."""
    from nectar_export.fit import FusedAdam

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(4, generator=g))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    lr = torch.tensor([0.01])
    opt, ref_opt = FusedAdam(ours, lr), torch.optim.Adam(ref, lr=0.01, fused=True)
    for step in range(6):
        lr.fill_(0.01 / (step + 1))
        for group in ref_opt.param_groups:
            group["lr"] = 0.01 / (step + 1)
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, ref))


@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
def test_sliding_window_layer_trains_finite_and_stops_past_the_window(variant):
    """Past a sliding window a query sees no document key (lse = −inf): training must skip those
    samples (a fit used to turn the score nets to NaN on Gemma 3), held-out errors stay finite, and
    the served context gives the document no weight there."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position=512, layer_windows=(0, 12))
    model = Decoder(cfg).eval()
    cache = model.prefill_document(torch.randint(0, 64, (1, 60)))
    g = torch.Generator().manual_seed(1)
    probes = [torch.randint(0, 64, (30,), generator=g).tolist() for _ in range(16)]
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False)
    unseen = ~torch.isfinite(qs.lse[1])
    assert unseen.any() and torch.isfinite(qs.lse[0]).all()  # the sliding layer has unseen rows
    held = qs.probe_index >= 13
    spec_for = lambda w: HeadsSpec(variant, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(w), cfg.scale)  # noqa: E731
    fit_cfg = FitConfig(steps=40, batch=128, seed=3, variant=variant, allocation="adaptive", probe_steps=10,
                        train_dtype="float32", linear_init=True)
    res = fit_heads(qs.select(~held), qs.select(held), spec_for, 20_000, fit_cfg,
                    [(c.k, c.v) for c in cache.contexts()], progress=False)
    assert all(torch.isfinite(p).all() for p in res.heads.state_dict().values())
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res.heldout.values())
    assert all(torch.isfinite(torch.tensor(c)) for c in res.train_curve)
    ctx = nectar_contexts(res.heads, cfg.layer_windows, cache.context_len)
    q = qs.q[1][:4].permute(1, 2, 0, 3)[None]  # [1, Hkv, G, 4, D]
    bound = cache.context_len - 1 + 12
    pos = torch.tensor([[bound - 2, bound - 1, bound, bound + 5]])
    _, lse = ctx[1](q, pos)
    assert torch.isfinite(lse[..., :2]).all() and torch.isneginf(lse[..., 2:]).all()
    _, lse0 = ctx[0](qs.q[0][:4].permute(1, 2, 0, 3)[None], pos)  # a global layer is never cut off
    assert torch.isfinite(lse0).all()


def test_a_cpu_without_native_bf16_gets_a_note_about_fp32_training(monkeypatch):
    import nectar_export.pipeline as pipeline
    from nectar_export.pipeline import slow_training_note

    cfg = FitConfig().for_device("cpu")
    monkeypatch.setattr(pipeline, "train_dtype", lambda name, device: torch.float32)
    note = slow_training_note(cfg, torch.device("cpu"))
    assert note is not None and "no bf16 matmuls" in note and "--device cuda" in note and f"{cfg.steps} steps" in note and cfg.steps == 1200
    assert slow_training_note(FitConfig(train_dtype="float32").for_device("cpu"), torch.device("cpu")) is None  # asked for
    monkeypatch.setattr(pipeline, "train_dtype", lambda name, device: torch.bfloat16)
    assert slow_training_note(cfg, torch.device("cpu")) is None


def test_defaults_depend_on_the_device_the_fit_runs_on():
    """A CPU fit trains 1,200 steps of 512 samples on half the probes (15 minutes on 2 AVX2 cores), a GPU
    fit 4,800 of 1,024 on the full probe set; given values are kept on either."""
    from nectar_export.config import default_probe_scale

    cpu, gpu = FitConfig().for_device("cpu"), FitConfig().for_device("cuda")
    assert (cpu.steps, cpu.batch, gpu.steps, gpu.batch) == (1200, 512, 4800, 1024)
    assert FitConfig().for_device("mps") == cpu  # other devices take the CPU's
    assert FitConfig(steps=7, batch=3).for_device("cuda").batch == 3 and FitConfig(steps=7).for_device("cpu").steps == 7
    # the allocation probe never outlasts the fit (a quick --steps 40), and the manifest records what ran
    assert FitConfig(steps=40).for_device("cpu").probe_steps == 40 and cpu.probe_steps == gpu.probe_steps == 150
    assert (default_probe_scale("cpu"), default_probe_scale("cuda"), default_probe_scale("mps")) == (0.5, 1.0, 0.5)
    with pytest.raises(ValueError, match="batch"):
        FitConfig(batch=0)
