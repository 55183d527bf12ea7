"""Retained heads (nectar_export/retained.py): document attention over stored KV kept for a few KV heads,
their ranking, the artifact file, and the ONNX graph splice (tiny random models, seconds)."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from nectar_export.collect import QuerySet, collect_queries
from nectar_export.config import FitConfig
from nectar_export.heads import nectar_contexts
from nectar_export.retained import (RetainedHeadsContext, RetainedKV, module_error_mass, retained_bytes,
                                    retained_contexts, retained_tokens, select_tokens, subset_error, worst_modules,
                                    complement_targets)
from nectar_models.attention import CompositeContext, ExactContextAttention
from nectar_runtime.errors import NectarError
from tests.export.test_onnx_graph import N_CTX, PREFIX, _Ctx, _random_heads, _session


def _queries(cfg, n_after: int, b: int = 2, t: int = 5, seed: int = 0):
    """Random q [B, Hkv, G, T, D] at positions after the document (n_after, n_after + 1, ...)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, t, cfg.head_dim, generator=g) * 2
    pos = (n_after + torch.arange(t))[None].expand(b, -1).contiguous()
    return q, pos


def _rounded(c: ExactContextAttention, dtype=torch.float16) -> ExactContextAttention:
    """The exact context over keys/values rounded as fp16 storage rounds them (the reference the
    retained heads serve: they keep what the artifact stores)."""
    return ExactContextAttention(c.k.to(dtype).float(), c.v.to(dtype).float(), c.positions[0], c.window, c.scale)


# --- 1. the torch context ---------------------------------------------------------------------------

def test_retaining_every_head_is_exact_document_attention(tiny):
    model, cache, _ = tiny
    cfg = model.config
    heads = _random_heads(cfg, seed=1)
    doc = cache.contexts()
    every = [(l, j) for l in range(cfg.num_layers) for j in range(cfg.num_kv_heads)]
    kept = RetainedKV.from_document(doc, every, start=0)
    assert kept.nbytes() == retained_bytes(cache.context_len, cfg.head_dim, len(every))
    served = retained_contexts(nectar_contexts(heads), kept, cfg.scale)
    assert all(isinstance(c, RetainedHeadsContext) for c in served)
    q, pos = _queries(cfg, cache.context_len)
    for layer in range(cfg.num_layers):
        o, lse = served[layer](q, pos)
        o_ref, lse_ref = _rounded(doc[layer])(q, pos)
        assert o.shape == o_ref.shape and lse.shape == lse_ref.shape
        assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(lse, lse_ref, atol=1e-5), layer
    # nothing retained: the Nectar contexts themselves
    plain = nectar_contexts(heads)
    assert all(a is b for a, b in zip(retained_contexts(plain, None, cfg.scale), plain))


def test_retained_document_part_after_a_prefix_merges_to_full_attention(tiny):
    """Document keys at positions p … n-1 (start = p) + the exact prefix = full exact attention."""
    model, cache, _ = tiny
    cfg = model.config
    full, p = cache.contexts(), 6
    n = cache.context_len
    prefix = [c.select(torch.arange(0, p)) for c in full]
    doc = [c.select(torch.arange(p, n)) for c in full]
    every = [(l, j) for l in range(cfg.num_layers) for j in range(cfg.num_kv_heads)]
    kept = RetainedKV.from_document(doc, every, start=p)
    served = retained_contexts(nectar_contexts(_random_heads(cfg, seed=2), cfg.layer_windows, n), kept, cfg.scale)
    q, pos = _queries(cfg, n, seed=3)
    for layer in range(cfg.num_layers):
        assert torch.equal(served[layer].exact.positions[0], torch.arange(p, n))
        o, lse = CompositeContext([prefix[layer], served[layer]])(q, pos)
        o_ref, lse_ref = CompositeContext([prefix[layer], _rounded(doc[layer])])(q, pos)
        assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(lse, lse_ref, atol=1e-5), layer


def test_retaining_some_heads_changes_only_those(tiny):
    model, cache, _ = tiny
    cfg = model.config
    assert cfg.num_kv_heads == 2 and cfg.num_layers == 2
    heads = _random_heads(cfg, seed=4)
    doc = cache.contexts()
    kept = RetainedKV.from_document(doc, [(1, 0), (0, 1)], start=0)  # unsorted on purpose
    assert kept.modules == [(0, 1), (1, 0)] and kept.heads_of(0) == [1] and kept.heads_of(1) == [0]
    assert kept.keys[0].shape == (1, cache.context_len, cfg.head_dim)
    assert torch.equal(kept.keys[0][0], doc[0].k[0, 1].half().float()) and torch.equal(kept.values[1][0], doc[1].v[0, 0].half().float())
    plain = nectar_contexts(heads)
    served = retained_contexts(plain, kept, cfg.scale)
    q, pos = _queries(cfg, cache.context_len, seed=5)
    for layer, r in ((0, 1), (1, 0)):
        o, lse = served[layer](q, pos)
        o_n, lse_n = plain[layer](q, pos)
        o_x, lse_x = _rounded(doc[layer])(q, pos)
        other = 1 - r
        assert torch.equal(o[:, other], o_n[:, other]) and torch.equal(lse[:, other], lse_n[:, other])
        assert torch.allclose(o[:, r], o_x[:, r], atol=1e-5) and torch.allclose(lse[:, r], lse_x[:, r], atol=1e-5)
        assert not torch.allclose(o[:, r], o_n[:, r], atol=1e-3)  # the retained head did change
    # the state round trip (fp16 on disk)
    back = RetainedKV.from_state(kept.modules, kept.state(), kept.start)
    for l in kept.keys:
        assert torch.equal(back.keys[l], kept.keys[l]) and torch.equal(back.values[l], kept.values[l])


def test_int8_retained_heads_are_close_in_half_the_bytes(tiny):
    model, cache, _ = tiny
    cfg = model.config
    doc = cache.contexts()
    every = [(l, j) for l in range(cfg.num_layers) for j in range(cfg.num_kv_heads)]
    k16 = RetainedKV.from_document(doc, every, start=0)
    k8 = RetainedKV.from_document(doc, every, start=0, dtype="int8")
    assert k8.nbytes() == retained_bytes(cache.context_len, cfg.head_dim, len(every), "int8")
    assert k8.nbytes() * 2 * cfg.head_dim == k16.nbytes() * (cfg.head_dim + 2)  # D int8 + an fp16 scale vs 2D bytes
    for l in range(cfg.num_layers):
        x = doc[l].k[0]
        err = (k8.keys[l] - x).abs().amax(-1) / x.abs().amax(-1)  # per (head, token): ≤ half a step of 1/127
        assert float(err.max()) <= 0.5 / 127 + 1e-3
        assert k8.state()[f"layers.{l}.key.q"].dtype == torch.int8
    back = RetainedKV.from_state(k8.modules, k8.state(), 0, "int8")
    assert all(torch.equal(back.keys[l], k8.keys[l]) and torch.equal(back.values[l], k8.values[l]) for l in k8.keys)
    q, pos = _queries(cfg, cache.context_len, seed=9)
    served = retained_contexts(nectar_contexts(_random_heads(cfg, seed=9)), k8, cfg.scale)
    for layer in range(cfg.num_layers):
        o, lse = served[layer](q, pos)
        o_ref, lse_ref = doc[layer](q, pos)
        assert float((o - o_ref).norm() / o_ref.norm()) < 0.02 and float((lse - lse_ref).abs().max()) < 0.05


# --- 2. ranking ---------------------------------------------------------------------------------------

def test_worst_modules_picks_the_largest_mass_of_global_layers():
    mass = torch.tensor([[1.0, 5.0], [3.0, 0.5], [4.0, 2.0]], dtype=torch.float64)
    before = mass.clone()
    assert worst_modules(mass, 3) == [(0, 1), (1, 0), (2, 0)]
    assert worst_modules(mass, 1) == [(0, 1)]
    assert worst_modules(mass, 0) == []
    assert worst_modules(mass, 3, (0, 0, 8)) == [(0, 0), (0, 1), (1, 0)]  # layer 2 slides: never retained
    assert worst_modules(mass, 2, (16, 0, 0)) == [(1, 0), (2, 0)]
    assert torch.equal(mass, before)  # not modified
    assert worst_modules(mass, 4, (0, 0, 8)) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # every eligible head
    with pytest.raises(ValueError, match="cannot retain 5 heads.* 4 KV heads"):
        worst_modules(mass, 5, (0, 0, 8))
    with pytest.raises(ValueError, match="cannot retain 7 heads"):
        worst_modules(mass, 7)
    # a head with zero error mass is still eligible (a global layer's head is never excluded by its mass)
    assert worst_modules(torch.zeros(2, 2, dtype=torch.float64), 4) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_module_error_mass_ranks_a_perturbed_head_worst(tiny):
    model, cache, probes = tiny
    cfg = model.config
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes[:6], progress=False)
    heads = _random_heads(cfg, seed=6)
    mass = module_error_mass(heads, qs)
    assert mass.shape == (cfg.num_layers, cfg.num_kv_heads) and mass.dtype == torch.float64
    assert bool((mass >= 0).all()) and bool(torch.isfinite(mass).all()) and float(mass.sum()) > 0
    assert torch.allclose(module_error_mass(heads, qs, chunk=7), mass, rtol=1e-6, atol=0)  # chunking only (fp32 sums per chunk)

    # by hand for one module: Σ σ(lse − lse_loc)² ‖f(q) − o‖²
    l, j = 1, 1
    q = qs.q[l][:, j].reshape(-1, cfg.head_dim)  # [N*G, D]
    gi, start = heads.layer_slot[l]
    with torch.no_grad():
        f, _ = heads.groups[gi](q[None], slice(start + j, start + j + 1))
    w = torch.sigmoid(qs.lse[l][:, j] - qs.lse_loc[l][:, j]).reshape(-1)
    want = (w.double() ** 2 * (f[0].double() - qs.o[l][:, j].reshape(-1, cfg.head_dim).double()).square().sum(-1)).sum()
    assert torch.allclose(mass[l, j], want, rtol=1e-4)

    worse = copy.deepcopy(heads)
    with torch.no_grad():
        worse.groups[gi].b3[start + 0] += 3.0  # layer 1, KV head 0: its predictions shifted
    mass2 = module_error_mass(worse, qs)
    assert mass2[1, 0] > 2 * mass[1, 0]
    keep = torch.ones_like(mass, dtype=torch.bool)
    keep[1, 0] = False
    assert torch.allclose(mass2[keep], mass[keep], rtol=1e-9, atol=0)
    assert worst_modules(mass2, 1) == [(1, 0)]

    # queries that see no document (lse = −inf, a sliding window's far side) carry no error
    blind = QuerySet(qs.q, qs.o, [torch.full_like(qs.lse[0], float("-inf"))] + qs.lse[1:], qs.lse_loc,
                     qs.probe_index, qs.positions)
    m0 = module_error_mass(heads, blind)
    assert torch.equal(m0[0], torch.zeros(cfg.num_kv_heads, dtype=torch.float64)) and torch.equal(m0[1], mass[1])


# --- 2b. a token budget per retained head ------------------------------------------------------------

def _planted(cfg, n: int = 40, rows: int = 30, seed: int = 0):
    """A one-layer document whose every query points at one of a few planted keys: queries of KV
    head j hit tokens `hits[j]` (large dot products there, small elsewhere); -> (doc, QuerySet, hits)."""
    g = torch.Generator().manual_seed(seed)
    hkv, grp, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    k = torch.randn(1, hkv, n, d, generator=g) * 0.1
    v = torch.randn(1, hkv, n, d, generator=g)
    hits = [sorted(torch.randperm(n, generator=g)[:3].tolist()) for _ in range(hkv)]
    q = torch.zeros(rows, hkv, grp, d)
    for j in range(hkv):
        for t in hits[j]:
            k[0, j, t] = torch.randn(d, generator=g)
            k[0, j, t] *= 4 / k[0, j, t].norm()
        for r in range(rows):  # each row asks for one planted token, in turn
            q[r, j] = k[0, j, hits[j][r % 3]] * 4 + torch.randn(grp, d, generator=g) * 0.01
    doc = [ExactContextAttention(k, v, torch.arange(n), 0, cfg.scale)]
    o, lse = doc[0](q.permute(1, 2, 0, 3)[None], torch.full((1, rows), n))  # [1, Hkv, G, rows, D]
    qs = QuerySet([q], [o[0].permute(2, 0, 1, 3)], [lse[0].permute(2, 0, 1)], [torch.zeros(rows, hkv, grp)],
                  torch.arange(rows), torch.full((rows,), n))
    return doc, qs, hits


def test_select_tokens_keeps_the_tokens_queries_weigh(tiny):
    model, _, _ = tiny
    cfg = model.config
    doc, qs, hits = _planted(cfg)
    modules = [(0, j) for j in range(cfg.num_kv_heads)]
    picked = select_tokens(doc, modules, qs, 3)
    assert list(picked) == [0] and picked[0].shape == (cfg.num_kv_heads, 3) and picked[0].dtype == torch.long
    assert [p.tolist() for p in picked[0]] == hits  # exactly the planted tokens, ascending
    assert torch.equal(select_tokens(doc, modules, qs, 3, chunk=7)[0], picked[0])  # chunking only
    wide = select_tokens(doc, modules, qs, 8)[0]
    assert all(set(h) <= set(w.tolist()) for h, w in zip(hits, wide)) and bool((wide.diff(dim=-1) > 0).all())
    # retained on those tokens, their served output is nearly exact; on other tokens it is not
    heads = _random_heads(cfg, seed=2)
    kept = RetainedKV.from_document(doc, modules, 0, "float16", picked)
    assert kept.length == 3 and kept.tokens is not None
    assert kept.nbytes() == retained_bytes(40, cfg.head_dim, len(modules), "float16", tokens=3)
    for r, j in enumerate(kept.heads_of(0)):
        assert torch.equal(kept.keys[0][r], doc[0].k[0, j, hits[j]].half().float())
    good = subset_error(heads, kept, qs)
    assert 0 <= good["o"] < 1e-3 and good["lse"] < 1e-2, good
    others = {0: torch.stack([torch.tensor([t for t in range(40) if t not in h][:3]) for h in hits])}
    bad = subset_error(heads, RetainedKV.from_document(doc, modules, 0, "float16", others), qs)
    assert bad["o"] > 0.5 and bad["lse"] > 1, bad
    # every token kept: fp16 rounding only
    every = subset_error(heads, RetainedKV.from_document(doc, modules, 0, "float16"), qs)
    assert every["o"] < 1e-5 and every["lse"] < 1e-2, every  # logits near 16: fp16 keys move them by ~1e-3


def test_a_token_subset_merges_with_the_network_for_the_rest(tiny):
    """With a network that serves the tokens not kept exactly (f = o, g = lse over the rest), the subset
    context is exact attention over the whole document; the kept tokens alone are not."""
    model, cache, _ = tiny
    cfg = model.config
    doc = cache.contexts()[0]
    n = doc.length
    keep = torch.tensor(sorted(torch.randperm(n, generator=torch.Generator().manual_seed(4))[: n // 3].tolist()))
    rest = torch.tensor([t for t in range(n) if t not in set(keep.tolist())])
    heads_kept = [0, cfg.num_kv_heads - 1]
    q, pos = _queries(cfg, n)
    o_full, lse_full = doc(q, pos)
    o_rest, lse_rest = doc.select(rest)(q, pos)
    sub = doc.select(keep)
    idx = torch.tensor(heads_kept)
    exact = ExactContextAttention(sub.k[:, idx], sub.v[:, idx], sub.positions[0], 0, cfg.scale)
    o, lse = RetainedHeadsContext(lambda q_, p_: (o_rest, lse_rest), exact, heads_kept, subset=True)(q, pos)
    assert torch.allclose(o[:, idx], o_full[:, idx], atol=1e-5) and torch.allclose(lse[:, idx], lse_full[:, idx], atol=1e-5)
    others = [j for j in range(cfg.num_kv_heads) if j not in heads_kept]  # the network's own heads pass through
    assert torch.equal(o[:, others], o_rest[:, others]) and torch.equal(lse[:, others], lse_rest[:, others])
    alone, lse_alone = RetainedHeadsContext(lambda q_, p_: (o_rest, lse_rest), exact, heads_kept)(q, pos)
    assert not torch.allclose(alone[:, idx], o_full[:, idx], atol=1e-3) and bool((lse_alone[:, idx] < lse_full[:, idx]).all())


def test_complement_targets_are_attention_over_the_tokens_not_kept(tiny):
    model, cache, probes = tiny
    cfg = model.config
    doc = cache.contexts()
    qs = collect_queries(model, doc, cache.context_len, probes[:4], progress=False)
    modules = [(0, 1), (1, 0), (1, 1)]
    g = torch.Generator().manual_seed(8)
    n = cache.context_len
    tokens = {l: torch.stack([torch.sort(torch.randperm(n, generator=g)[:9]).values for _ in range(sum(1 for m in modules if m[0] == l))])
              for l in (0, 1)}
    out = complement_targets(doc, modules, tokens, qs, chunk=5)
    for l in range(cfg.num_layers):
        for j in range(cfg.num_kv_heads):
            if (l, j) not in modules:
                assert torch.equal(out.o[l][:, j], qs.o[l][:, j]) and torch.equal(out.lse[l][:, j], qs.lse[l][:, j])
                continue
            r = sorted(h for ll, h in modules if ll == l).index(j)
            rest = torch.tensor([t for t in range(n) if t not in set(tokens[l][r].tolist())])
            part = doc[l].select(rest)
            q = qs.q[l][:, j].float().permute(1, 0, 2)[None, None]  # [1, 1, G, N, D]
            o_ref, lse_ref = ExactContextAttention(part.k[:, j:j + 1], part.v[:, j:j + 1], part.positions[0], 0, cfg.scale)(
                q, torch.zeros(1, q.shape[3], dtype=torch.long))
            assert torch.allclose(out.o[l][:, j].float(), o_ref[0, 0].permute(1, 0, 2), atol=1e-4)
            assert torch.allclose(out.lse[l][:, j], lse_ref[0, 0].permute(1, 0), atol=1e-4)
    assert out.q is qs.q and torch.equal(out.lse_loc[0], qs.lse_loc[0])  # queries shared, not copied
    assert not torch.equal(out.lse[1], qs.lse[1])  # ... and the inputs left as they were


def test_token_budget_bytes():
    assert retained_tokens(500, 0) == 500 and retained_tokens(500, 128) == 128 and retained_tokens(100, 128) == 100
    assert retained_bytes(500, 64, 18, "int8", tokens=128) == 18 * 128 * (2 * 66 + 4)  # + int32 indices
    assert retained_bytes(100, 64, 18, "int8", tokens=128) == retained_bytes(100, 64, 18, "int8")  # no subset: no indices
    with pytest.raises(ValueError, match="retain_tokens"):
        FitConfig(retain_tokens=-1)


# --- 3. the artifact ----------------------------------------------------------------------------------

def _saved(tiny, tmp_path, p: int = 6, dtype: str = "float16", tokens: int = 0):
    from nectar_export.artifact import save_artifact

    model, cache, _ = tiny
    cfg = model.config
    heads = _random_heads(cfg, seed=7)
    doc = [c.select(torch.arange(p, cache.context_len)) for c in cache.contexts()]
    modules = [(0, 1), (1, 0), (1, 1)]
    picked = None
    if tokens:  # any ascending subset will do for the file format
        g = torch.Generator().manual_seed(3)
        picked = {l: torch.stack([torch.sort(torch.randperm(cache.context_len - p, generator=g)[:tokens]).values
                                  for _ in range(sum(1 for m in modules if m[0] == l))]) for l in (0, 1)}
    kept = RetainedKV.from_document(doc, modules, p, dtype, picked)
    man = {"base_model": {"name": "tiny", "sha256": "ab" * 32},
           "document": {"sha256": "x", "n_tokens": cache.context_len, "prefix_tokens": p}, "kv_bytes": 1,
           "retained": {"modules": [list(m) for m in modules], "bytes": kept.nbytes(), "dtype": dtype,
                        "heldout_error_mass_share": 0.5, **({"tokens": tokens} if tokens else {})}}
    return save_artifact(tmp_path / "art", heads, man, "doc", kept), kept


def _one_line_error(fn, *needles):
    with pytest.raises(NectarError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("dtype,tokens", [("float16", 0), ("int8", 0), ("int8", 17)])
def test_artifact_round_trip_of_retained_heads(tiny, tmp_path, dtype, tokens):
    from nectar_export.artifact import load_retained, read_manifest, sha256_file

    model, _, _ = tiny
    out, kept = _saved(tiny, tmp_path, dtype=dtype, tokens=tokens)
    m = read_manifest(out)
    assert m["artifact_bytes"] == (out / "heads.safetensors").stat().st_size + (out / "retained.safetensors").stat().st_size
    assert m["retained"]["sha256"] == sha256_file(out / "retained.safetensors")
    assert m["retained"]["modules"] == [[0, 1], [1, 0], [1, 1]] and m["retained"]["bytes"] == kept.nbytes()
    back = load_retained(out, m, model.config)
    assert back.modules == kept.modules and back.start == kept.start == 6
    assert sorted(back.keys) == sorted(kept.keys) == [0, 1]
    for l in kept.keys:
        assert back.keys[l].dtype == torch.float32
        assert torch.equal(back.keys[l], kept.keys[l]) and torch.equal(back.values[l], kept.values[l])
    assert back.dtype == dtype and all(torch.equal(back.stored[k], kept.stored[k]) for k in kept.stored)
    assert sorted(back.stored) == sorted(kept.stored) and back.length == (tokens or kept.length)
    if tokens:
        assert all(torch.equal(back.tokens[l], kept.tokens[l]) for l in kept.keys)
    # a retained file of the other dtype than the manifest says is refused
    other = "int8" if dtype == "float16" else "float16"
    _one_line_error(lambda: load_retained(out, {**m, "retained": {**m["retained"], "dtype": other}}, model.config),
                    "retained.safetensors", "layers.0.key")
    assert load_retained(out, {**m, "retained": None}, model.config) is None
    assert load_retained(out, {k: v for k, v in m.items() if k != "retained"}, model.config) is None
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_damaged_or_mismatched_retained_heads_are_refused(tiny, tmp_path):
    from nectar_export.artifact import load_retained, read_manifest

    model, _, _ = tiny
    cfg = model.config
    out, _ = _saved(tiny, tmp_path)
    m = read_manifest(out)
    f = out / "retained.safetensors"
    good = f.read_bytes()
    # the document's token count differs: shapes no longer match (sha256 still does)
    _one_line_error(lambda: load_retained(out, {**m, "document": {**m["document"], "n_tokens": 81}}, cfg),
                    "retained.safetensors", "layers.0.key")
    # retained heads in a sliding-window layer, or beyond the model's heads
    _one_line_error(lambda: load_retained(out, m, cfg.with_(layer_windows=(0, 12))), "do not fit the model")
    _one_line_error(lambda: load_retained(out, {**m, "retained": {**m["retained"], "modules": [[0, 2]]}}, cfg),
                    "do not fit the model")
    _one_line_error(lambda: load_retained(out, {**m, "retained": {**m["retained"], "modules": "nope"}}, cfg),
                    "retained.modules")
    # one flipped byte
    bad = bytearray(good)
    bad[-1] ^= 0x01
    f.write_bytes(bytes(bad))
    _one_line_error(lambda: load_retained(out, m, cfg), "retained.safetensors", "sha256")
    # missing
    f.unlink()
    read_manifest(out)  # the heads part of the artifact is still whole
    _one_line_error(lambda: load_retained(out, m, cfg), "retained.safetensors", "missing")


def test_token_budget_mismatches_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from nectar_export.artifact import load_retained, read_manifest, sha256_file

    model, _, _ = tiny
    cfg = model.config
    out, kept = _saved(tiny, tmp_path, dtype="int8", tokens=17)
    m = read_manifest(out)
    for bad in (0, 10_000, "17"):
        _one_line_error(lambda: load_retained(out, {**m, "retained": {**m["retained"], "tokens": bad}}, cfg),
                        "retained.tokens")
    # shapes of another budget
    _one_line_error(lambda: load_retained(out, {**m, "retained": {**m["retained"], "tokens": 16}}, cfg),
                    "retained.safetensors", "layers.0.key")
    # indices that are not ascending (a hand-edited file whose sha256 was updated too)
    f = out / "retained.safetensors"
    state = load_file(str(f))
    state["layers.1.tokens"] = state["layers.1.tokens"].flip(-1).contiguous()
    save_file(state, str(f))
    m2 = {**m, "retained": {**m["retained"], "sha256": sha256_file(f)}}
    _one_line_error(lambda: load_retained(out, m2, cfg), "layers.1.tokens", "ascending")


# --- 4. the ONNX graph --------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "qwen3", "gemma3"])
def tiny_family(request, tmp_path_factory):
    from nectar_models.loading import load_model

    from tests.models.tiny import save_tiny

    return load_model(save_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=3)).model


def _modules_for(cfg) -> list[tuple[int, int]]:
    """Retained heads in two global layers (one head, then every head) where the model has two."""
    glob = [l for l, w in enumerate(cfg.layer_windows) if not w]
    assert cfg.num_kv_heads == 2 and glob
    if len(glob) == 1:
        return [(glob[0], 1)]
    return [(glob[0], 1), (glob[1], 0), (glob[1], 1)]


@pytest.mark.parametrize("retain_dtype,tokens,fused", [("float16", 0, False), ("int8", 0, False), ("int8", 11, False),
                                                       ("int8", 0, True), ("int8", 11, True)])
def test_graph_with_retained_heads_matches_the_torch_model(tiny_family, retain_dtype, tokens, fused):
    """Standard ops (fp32/fp16 bundles, TensorRT graphs) and the quantized bundles' form (`ort_fused`:
    int8 KV as MatMulNBits columns of the layer's softmax, whose int8 rounding of queries and
    probabilities is the only difference from exact: a looser logit tolerance)."""
    from nectar_export.export.bundle import compare_backends
    from nectar_export.export.decoder_graph import DecoderGraphWriter
    from nectar_export.export.from_model import decoder_weights, graph_spec, nectar_contexts_for_export
    from nectar_export.pipeline import nectar_with_prefix
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.backends.torch_backend import TorchBackend

    model = tiny_family
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(1))
    heads = _random_heads(cfg, seed=1)
    modules = _modules_for(cfg)
    full = model.prefill_document(ids[None]).contexts()
    picked = None
    if tokens:  # a token budget: a different subset per retained head
        g = torch.Generator().manual_seed(5)
        picked = {l: torch.stack([torch.sort(torch.randperm(N_CTX - PREFIX, generator=g)[:tokens]).values
                                  for _ in range(sum(1 for m in modules if m[0] == l))]) for l in sorted({l for l, _ in modules})}
    kept = RetainedKV.from_document([c.select(torch.arange(PREFIX, N_CTX)) for c in full], modules, PREFIX, retain_dtype, picked)
    assert kept.length == (tokens or N_CTX - PREFIX)
    prefix = model.prefill_document(ids[None, :PREFIX]).contexts()
    served = retained_contexts(nectar_contexts(heads, cfg.layer_windows, N_CTX), kept, cfg.scale)
    torch_ctx = [CompositeContext([p, s]) for p, s in zip(prefix, served)]
    plain_ctx = [CompositeContext([p, s]) for p, s in zip(prefix, nectar_contexts(heads, cfg.layer_windows, N_CTX))]

    parts = nectar_contexts_for_export(model, _Ctx(ids.tolist(), PREFIX), heads, kept)
    retained_layers = sorted({l for l, _ in modules})
    assert [l for l, c in enumerate(parts) if c.retained is not None] == retained_layers
    proto = DecoderGraphWriter(graph_spec(model, N_CTX), decoder_weights(model), parts, np.float32, ort_fused=fused).build()
    onnx.checker.check_model(proto)
    names = [n.name for n in proto.graph.node]
    assert len(set(names)) == len(names)
    for l in range(cfg.num_layers):
        has = any(n.startswith(f"/model/layers.{l}/attn/retained/") for n in names)
        assert has == (l in retained_layers), l
    inits = {t.name: t for t in proto.graph.initializer}
    if fused:  # one MatMulNBits for the keys and one for the values of each retained head, nothing cast per step
        for l, j in modules:
            for what in ("scores", "pv"):
                assert f"/model/layers.{l}/attn/retained/head{j}/{what}/MatMulNBits8" in names
            assert inits[f"model.layers.{l}.retained.head{j}.key.q8"].data_type == onnx.TensorProto.UINT8
        assert not any(n.startswith(f"/model/layers.{l}/attn/retained/") and n.endswith("/Cast") for n in names for l in retained_layers)
    else:
        key_t = inits[f"model.layers.{retained_layers[0]}.retained.key_t"]
        # int8 stays int8 (cast per step), except a token budget's few tokens: fp32, no per-step cast
        assert key_t.data_type == (onnx.TensorProto.INT8 if retain_dtype == "int8" and not tokens else onnx.TensorProto.FLOAT)

    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, 9).tolist()
    ref = TorchBackend(model, torch_ctx, N_CTX)
    r = compare_backends(ref, OrtBackend(_session(proto), N_CTX, 1000), prompt, N_CTX, 12)
    tol = 5e-3 if fused else 1e-4
    assert r["max_abs_logit_diff"] <= tol and r["top1_agreement"] == 1.0, r
    # the retained heads matter here (the parity above is not Nectar-only on both sides) ...
    d = compare_backends(ref, TorchBackend(model, plain_ctx, N_CTX), prompt, N_CTX, 4)
    assert d["max_abs_logit_diff"] > 5 * tol, d
    # ... and the pipeline's contexts are these
    same = compare_backends(ref, TorchBackend(model, nectar_with_prefix(model, _Ctx(ids.tolist(), PREFIX), heads, "cpu", kept),
                                              N_CTX), prompt, N_CTX, 4)
    assert same["max_abs_logit_diff"] == 0.0, same


def test_fp16_graph_and_batched_generation_with_retained_heads(tmp_path):
    """The retained splice in an fp16 graph (strict shape inference, tracks torch) and under
    left-padded batches (the document's retained keys are seen by every row)."""
    from nectar_export.export.bundle import compare_backends
    from nectar_export.export.decoder_graph import DecoderGraphWriter
    from nectar_export.export.from_model import decoder_weights, graph_spec, nectar_contexts_for_export
    from nectar_models.loading import load_model
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.generate import GenerationConfig, generate_ids
    from tests.models.tiny import save_tiny

    model = load_model(save_tiny("llama", tmp_path / "m", seed=5)).model
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (N_CTX,), generator=torch.Generator().manual_seed(2))
    heads = _random_heads(cfg, seed=2)
    full = model.prefill_document(ids[None]).contexts()
    kept = RetainedKV.from_document([c.select(torch.arange(PREFIX, N_CTX)) for c in full], _modules_for(cfg), PREFIX)
    prefix = model.prefill_document(ids[None, :PREFIX]).contexts()
    served = retained_contexts(nectar_contexts(heads, cfg.layer_windows, N_CTX), kept, cfg.scale)
    torch_ctx = [CompositeContext([p, s]) for p, s in zip(prefix, served)]
    parts = nectar_contexts_for_export(model, _Ctx(ids.tolist(), PREFIX), heads, kept)
    p16 = DecoderGraphWriter(graph_spec(model, N_CTX), decoder_weights(model), parts, np.float16).build()
    onnx.checker.check_model(p16)
    onnx.shape_inference.infer_shapes(p16, strict_mode=True)
    r = compare_backends(TorchBackend(model, torch_ctx, N_CTX), OrtBackend(_session(p16), N_CTX, 1000), [3, 1, 4, 1, 5], N_CTX, 6)
    assert r["mean_kl"] < 1e-3 and r["top1_agreement"] == 1.0, r
    p32 = DecoderGraphWriter(graph_spec(model, N_CTX), decoder_weights(model), parts, np.float32).build()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    gen = GenerationConfig(max_new_tokens=8)
    a = np.stack(list(generate_ids(TorchBackend(model, torch_ctx, N_CTX), prompts, gen, set())))
    b = np.stack(list(generate_ids(OrtBackend(_session(p32), N_CTX, 1000), prompts, gen, set())))
    assert np.array_equal(a, b)
    # the quantized bundles' form (int8 KV as MatMulNBits columns) batches the same way
    kept8 = RetainedKV.from_document([c.select(torch.arange(PREFIX, N_CTX)) for c in full], _modules_for(cfg), PREFIX, "int8")
    ctx8 = [CompositeContext([p, s]) for p, s in zip(prefix, retained_contexts(nectar_contexts(heads, cfg.layer_windows, N_CTX),
                                                                                 kept8, cfg.scale))]
    fused = DecoderGraphWriter(graph_spec(model, N_CTX), decoder_weights(model),
                               nectar_contexts_for_export(model, _Ctx(ids.tolist(), PREFIX), heads, kept8), np.float32,
                               ort_fused=True).build()
    assert any(n.op_type == "MatMulNBits" for n in fused.graph.node)
    a8 = np.stack(list(generate_ids(TorchBackend(model, ctx8, N_CTX), prompts, gen, set())))
    b8 = np.stack(list(generate_ids(OrtBackend(_session(fused), N_CTX, 1000), prompts, gen, set())))
    assert np.array_equal(a8, b8)


# --- 5. configuration and budget ----------------------------------------------------------------------

def test_fit_config_refuses_bad_retain_heads():
    assert FitConfig(retain_heads=3).retain_heads == 3
    with pytest.raises(ValueError, match="retain_heads must be ≥ 0"):
        FitConfig(retain_heads=-1)
    with pytest.raises(ValueError, match="mlp variant"):
        FitConfig(variant="quadrature", retain_heads=2)
    FitConfig(variant="quadrature", retain_heads=0)
    FitConfig(variant="quadrature")  # auto, the default, stays valid for quadrature (it resolves to none)


def test_auto_retain_tokens_keeps_every_token_up_to_4096():
    auto = FitConfig()
    assert auto.auto_retain_tokens(4008).retain_tokens == 4008  # a manual: every token, no indices stored
    assert auto.auto_retain_tokens(500).retain_tokens == 500
    assert auto.auto_retain_tokens(7226).retain_tokens == 4096  # a ~7.3K-token document: the cap's 4,096
    assert FitConfig(retain_tokens=0).auto_retain_tokens(7226).retain_tokens == 0  # given (0 = all) is kept
    assert FitConfig(retain_tokens=1024).auto_retain_tokens(7226).retain_tokens == 1024
    assert FitConfig(budget_tokens=2048).auto_retain_tokens(7226).retain_tokens == 2048  # follows a smaller cap
    assert FitConfig(budget_tokens=0).auto_retain_tokens(7226).retain_tokens == 4096  # uncapped budget: still 4,096
    with pytest.raises(ValueError, match="retain_tokens"):
        FitConfig(retain_tokens=-1)


def test_default_budget_counts_at_most_budget_tokens(tiny):
    from nectar_export.pipeline import budget_bytes
    from nectar_export.streaming import kv_bytes

    model, _, _ = tiny
    cfg = model.config
    short, long = SimpleNamespace(n=3000, prefix_len=10), SimpleNamespace(n=9000, prefix_len=10)
    d = FitConfig()
    assert d.budget_tokens == 4096
    assert budget_bytes(short, cfg, d) == pytest.approx(0.24 * kv_bytes(3000, cfg))  # under the cap: proportional
    assert budget_bytes(long, cfg, d) == pytest.approx(0.24 * kv_bytes(4096, cfg))  # over it: a 4,096-token document's
    assert budget_bytes(long, cfg, FitConfig(budget_tokens=0)) == pytest.approx(0.24 * kv_bytes(9000, cfg))
    assert budget_bytes(long, cfg, FitConfig(budget_tokens=8192)) == pytest.approx(0.24 * kv_bytes(8192, cfg))
    assert budget_bytes(long, cfg, FitConfig(budget_mb=3.0)) == 3e6  # --budget-mb is taken as given
    with pytest.raises(ValueError, match="budget_tokens"):
        FitConfig(budget_tokens=-1)


def test_auto_retain_heads_takes_a_fifth_of_the_global_heads_within_half_the_budget():
    auto = FitConfig()
    assert auto.retain_heads is None
    assert auto.auto_retain_heads(90, 1000, 1e9).retain_heads == 18  # SmolLM2: 30 layers x 3 KV heads
    assert auto.auto_retain_heads(3, 1000, 1e9).retain_heads == 0  # Gemma 3 270M: 3 global layers x 1 KV head
    assert auto.auto_retain_heads(90, 1000, 20_000).retain_heads == 10  # half the budget holds 10 heads
    assert auto.auto_retain_heads(90, 0, 1e9).retain_heads == 18  # nothing to store (a document of template only)
    for other in (FitConfig(variant="quadrature"), FitConfig(distill_steps=5)):
        assert other.auto_retain_heads(90, 1000, 1e9).retain_heads == 0  # fits that cannot retain
    assert auto.auto_retain_heads(90, 1000, 1e9, on_policy=True).retain_heads == 0
    assert FitConfig(retain_heads=4).auto_retain_heads(90, 1000, 10.0).retain_heads == 4  # a count given is kept


def test_fit_cli_takes_auto_or_a_count_of_retained_heads_and_tokens():
    import argparse

    from nectar_export.cli import _auto_int
    from nectar_runtime.cli import build_parser

    assert _auto_int("auto") is None and _auto_int("0") == 0 and _auto_int("18") == 18
    with pytest.raises(argparse.ArgumentTypeError, match="'auto'"):
        _auto_int("many")
    a = build_parser().parse_args(["fit", "doc.txt", "--out", "x"])
    assert a.retain_heads is None and a.retain_tokens is None  # both auto by default
    assert a.budget_tokens == 4096
    assert build_parser().parse_args(["fit", "doc.txt", "--out", "x", "--budget-tokens", "0"]).budget_tokens == 0
    a = build_parser().parse_args(["fit", "doc.txt", "--out", "x", "--retain-tokens", "auto", "--retain-heads", "4"])
    assert a.retain_tokens is None and a.retain_heads == 4


def test_budget_charges_retained_bytes_and_refuses_too_many_heads(tiny):
    from nectar_export.pipeline import budget_params, check_budget

    model, _, _ = tiny
    cfg = model.config
    ctx = SimpleNamespace(n=400, prefix_len=10)
    base_n, kvb = budget_params(ctx, cfg, FitConfig(budget_fraction=0.5, retain_heads=0))
    kept_n, kvb2 = budget_params(ctx, cfg, FitConfig(budget_fraction=0.5, retain_heads=2, retain_tokens=0))
    assert kvb == kvb2
    assert base_n - kept_n == retained_bytes(390, cfg.head_dim, 2, "int8") // 2  # int8 by default
    budget_n, _ = budget_params(ctx, cfg, FitConfig(budget_fraction=0.5, retain_heads=2, retain_tokens=100))
    assert base_n - budget_n == retained_bytes(390, cfg.head_dim, 2, "int8", tokens=100) // 2
    # the default token budget (auto: every token up to 4,096) holds all 390 tokens: no indices
    all_n, _ = budget_params(ctx, cfg, FitConfig(budget_fraction=0.5, retain_heads=2).auto_retain_tokens(390))
    assert all_n == kept_n
    base = SimpleNamespace(config=cfg, name="tiny")
    check_budget(base, ctx, FitConfig(budget_fraction=2.0, retain_heads=4), "doc.txt")  # every head of 2 global layers
    _one_line_error(lambda: check_budget(base, ctx, FitConfig(budget_fraction=0.5, retain_heads=5), "doc.txt"),
                    "--retain-heads 5", "4 KV heads")
    slid = SimpleNamespace(config=cfg.with_(layer_windows=(0, 12)), name="tiny")
    _one_line_error(lambda: check_budget(slid, ctx, FitConfig(budget_fraction=0.5, retain_heads=3), "doc.txt"),
                    "2 KV heads in global")
    # retained bytes eating the budget: refused, naming them
    _one_line_error(lambda: check_budget(base, ctx, FitConfig(budget_fraction=0.05, retain_heads=4), "doc.txt"),
                    "retained heads take", "fewer --retain-heads")


def test_settle_budget_raises_only_a_default_budget_too_small_for_the_smallest_heads(tiny):
    from nectar_export.pipeline import check_budget, settle_budget, smallest_budget_mb

    model, _, _ = tiny
    base = SimpleNamespace(config=model.config, name="tiny")
    ctx = SimpleNamespace(n=400, prefix_len=10)
    roomy = FitConfig(budget_fraction=2.0, retain_heads=2)
    assert settle_budget(base, ctx, roomy) == (roomy.auto_retain_tokens(390), None)  # room enough: unchanged
    capped, note = settle_budget(base, ctx, FitConfig(budget_fraction=2.0, retain_heads=2, budget_tokens=300))
    assert capped.budget_mb is None and "counts the first 300 (--budget-tokens)" in note and "\n" not in note
    assert "so decode costs what it would after 300 tokens" in note  # auto keeps 300 tokens: bounded
    note_all = settle_budget(base, ctx, FitConfig(budget_fraction=2.0, retain_heads=2, budget_tokens=300, retain_tokens=0))[1]
    assert "counts the first 300" in note_all and "decode costs" not in note_all  # every token kept: not bounded
    tiny_cap, raised = settle_budget(base, ctx, FitConfig(budget_fraction=0.24, retain_heads=0, budget_tokens=20))
    assert tiny_cap.budget_mb and "of the fp16 KV of their first 20 (--budget-tokens" in raised
    assert settle_budget(base, ctx, FitConfig(budget_fraction=2.0, retain_heads=2, budget_tokens=0))[1] is None
    small = FitConfig(budget_fraction=0.01, retain_heads=2)
    with pytest.raises(NectarError):
        check_budget(base, ctx, small, "doc.txt")
    raised, note = settle_budget(base, ctx, small)
    need = smallest_budget_mb(base, ctx, raised)
    assert raised.budget_mb == need and raised.retain_heads == 2 and "raised to" in note
    check_budget(base, ctx, raised, "doc.txt")  # now it holds the smallest heads, the prefix and the kept KV
    with pytest.raises(NectarError):  # and no less: 0.02 MB under it is refused
        check_budget(base, ctx, replace(raised, budget_mb=need - 0.02), "doc.txt")
    given = FitConfig(budget_mb=0.001, retain_heads=0)  # the user's own --budget-mb: never raised
    assert settle_budget(base, ctx, given)[0].budget_mb == 0.001


def test_retained_heads_serve_a_half_precision_model(tiny):
    """A model cast to bf16 (nectar generate --dtype bfloat16) sends bf16 queries; the stored KV is fp32."""
    model, cache, _ = tiny
    cfg = model.config
    doc = cache.contexts()
    kept = RetainedKV.from_document(doc, [(0, 1), (1, 0)], start=0, dtype="int8")
    served = retained_contexts(nectar_contexts(_random_heads(cfg, seed=11)), kept, cfg.scale)
    q, pos = _queries(cfg, cache.context_len, seed=12)
    for layer in range(cfg.num_layers):
        o32, lse32 = served[layer](q, pos)
        o16, lse16 = served[layer](q.bfloat16(), pos)
        assert o16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
        assert float((o16.float() - o32).norm() / o32.norm()) < 0.02


def test_retain_heads_refuses_distillation_and_bad_manifests(tiny, tmp_path):
    from nectar_export.artifact import load_retained, read_manifest

    with pytest.raises(ValueError, match="retain_heads with distill_steps"):
        FitConfig(retain_heads=2, distill_steps=5)
    model, _, _ = tiny
    out, _ = _saved(tiny, tmp_path)
    m = read_manifest(out)
    _one_line_error(lambda: load_retained(out, {**m, "retained": [1, 2]}, model.config), "retained heads need an mlp artifact")
    _one_line_error(lambda: load_retained(out, {**m, "variant": "quadrature"}, model.config), "need an mlp artifact")


def test_fit_refuses_on_policy_with_retained_heads_before_any_work(tmp_path):
    from nectar_export.pipeline import fit_document

    base = SimpleNamespace(device="cpu", model=None, config=None)
    _one_line_error(lambda: fit_document(base, tmp_path / "doc.txt", tmp_path / "art", FitConfig(retain_heads=2), None,
                                         on_policy=True), "--on-policy with --retain-heads")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("allocation", ["uniform", "adaptive"])
def test_token_budget_choice_retargets_the_one_final_fit(tiny, allocation):
    """fit_heads calls the retarget hook once, after a probe fit of `probe_steps` (also at uniform
    widths), and the final heads train and are scored on the sets it returns: for the chosen
    modules, attention over the tokens they do not keep."""
    from nectar_export.fit import fit_heads, layer_errors
    from nectar_export.heads import HeadsSpec
    from nectar_export.retained import TokenBudgetChoice, complement_targets

    model, cache, probes = tiny
    cfg = model.config
    doc = cache.contexts()
    qs = collect_queries(model, doc, cache.context_len, probes, progress=False)
    held = qs.probe_index >= 20
    qtr, qhe = qs.select(~held), qs.select(held)
    spec_for = lambda w: HeadsSpec("mlp", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(w), cfg.scale)  # noqa: E731
    choice = TokenBudgetChoice(doc, 2, 12, cfg.layer_windows)
    calls = []

    def hook(heads, a, b):
        calls.append((heads.training, a is qtr, b is qhe))
        return choice(heads, a, b)

    fit_cfg = FitConfig(steps=30, batch=256, seed=3, allocation=allocation, probe_steps=10, train_dtype="float32", linear_init=False)
    res = fit_heads(qtr, qhe, spec_for, 20_000, fit_cfg, progress=False, retarget=hook)
    assert calls == [(False, True, True)]
    assert len(choice.modules) == 2 and choice.mass.shape == (cfg.num_layers, cfg.num_kv_heads)
    assert all(t.shape == (sum(1 for l, _ in choice.modules if l == layer), 12) for layer, t in choice.tokens.items())
    rest_held = complement_targets(doc, choice.modules, choice.tokens, qhe)
    assert layer_errors(res.heads, rest_held)["o_rel_error"] == res.heldout["o_rel_error"]
    assert (res.allocation_probe is not None) == (allocation == "adaptive")


def test_token_budget_choice_only_under_a_budget(tiny):
    from nectar_export.retained import TokenBudgetChoice, token_budget_choice

    _, cache, _ = tiny
    doc = cache.contexts()
    n = cache.context_len
    assert token_budget_choice(doc, FitConfig(retain_heads=0, retain_tokens=5)) is None  # nothing retained
    assert token_budget_choice(doc, FitConfig(retain_heads=2, retain_tokens=n)) is None  # every token fits
    assert token_budget_choice(doc, FitConfig(retain_heads=2, retain_tokens=0)) is None  # no budget
    c = token_budget_choice(doc, FitConfig(retain_heads=2, retain_tokens=n - 1), (0, 0))
    assert isinstance(c, TokenBudgetChoice) and (c.count, c.budget, c.windows) == (2, n - 1, (0, 0))
