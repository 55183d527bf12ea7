"""Nectar heads: batched modules vs per-module reference, quadrature = exact attention when its
nodes are the document's keys, width allocation at equal parameters."""

from __future__ import annotations

import torch

from nectar_export.config import VARIANTS
from nectar_export.fit import adaptive_widths, uniform_widths
from nectar_export.heads import GROUPS, HeadsSpec, NectarContext, NectarHeads


def _spec(variant="mlp", widths=(32, 48, 32), kv=2, d=16):
    return HeadsSpec(variant, len(widths), kv, d, widths, d**-0.5)


def _randomize(heads: NectarHeads, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_layer_call_matches_a_per_module_reference():
    spec = _spec()
    heads = NectarHeads(spec)
    _randomize(heads)
    q = torch.randn(2, spec.kv_heads, 3, 5, spec.head_dim)  # [B, Hkv, G, T, D]
    for layer in range(spec.num_layers):
        o, lse = NectarContext(heads, layer)(q, torch.zeros(2, 5, dtype=torch.long))
        gi, start = heads.layer_slot[layer]
        grp = heads.groups[gi]
        for j in range(spec.kv_heads):  # the reference may loop; the implementation may not
            m = start + j
            x = (q[:, j].reshape(-1, spec.head_dim) - grp.q_mean[m]) / grp.q_std[m]
            h = torch.nn.functional.gelu(x @ grp.w1[m] + grp.b1[m])
            h = torch.nn.functional.gelu(h @ grp.w2[m] + grp.b2[m])
            f = (h @ grp.w3[m] + grp.b3[m] + x @ grp.skip[m]) * grp.o_std[m] + grp.o_mean[m]
            s = torch.nn.functional.gelu(x @ grp.s1[m] + grp.sb1[m])
            s = torch.nn.functional.gelu(s @ grp.s2[m] + grp.sb2[m])
            gval = (s @ grp.s3[m] + grp.sb3[m])[:, 0] * grp.l_std[m] + grp.l_mean[m]
            assert torch.allclose(o[:, j].reshape(-1, spec.head_dim), f, atol=1e-5)
            assert torch.allclose(lse[:, j].reshape(-1), gval, atol=1e-5)


def test_quadrature_with_document_keys_as_nodes_is_exact_attention():
    from nectar_models.attention import ExactContextAttention

    n, d, kv = 40, 16, 2
    spec = HeadsSpec("quadrature", 1, kv, d, (n,), d**-0.5)
    heads = NectarHeads(spec)
    k, v = torch.randn(1, kv, n, d), torch.randn(1, kv, n, d)
    with torch.no_grad():
        heads.groups[0].keys.copy_(k[0])
        heads.groups[0].values.copy_(v[0])
        heads.groups[0].bias.zero_()
    q = torch.randn(3, kv, 2, 4, d)
    pos = torch.full((3, 4), n, dtype=torch.long)
    o, lse = NectarContext(heads, 0)(q, pos)
    o_ref, lse_ref = ExactContextAttention(k, v, torch.arange(n), 0, d**-0.5)(q, pos)
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(lse, lse_ref, atol=1e-5)


def test_params_count_matches_the_modules():
    for variant in ("mlp", "quadrature"):
        spec = _spec(variant)
        heads = NectarHeads(spec)
        n = sum(t.numel() for t in heads.state_dict().values())
        assert n == spec.total_params()


def test_every_variant_table_names_exactly_the_variants():
    from nectar_kernels import reference, weights

    tables = (GROUPS, weights._BLOCKS, weights._TENSORS, weights._RANDOM_STATISTICS, reference._REFERENCES)
    for table in tables:
        assert set(table) == set(VARIANTS)


def test_uniform_and_adaptive_allocation_stay_within_budget():
    spec_for = lambda w: _spec("mlp", tuple(w), kv=3, d=64)  # noqa: E731
    budget = 30 * 3 * 100_000
    uni = uniform_widths(spec_for, 30, budget, 16)
    errs = [0.1] * 10 + [0.4] * 10 + [0.2] * 10
    ada = adaptive_widths(spec_for, errs, budget, 16)
    assert spec_for(uni).total_params() <= budget and spec_for(ada).total_params() <= budget
    assert spec_for(ada).total_params() >= 0.9 * spec_for(uni).total_params()
    assert ada[15] > ada[25] > ada[5]  # more capacity where the error is larger
    assert len(set(ada)) <= 5  # a few width groups, so the batched matmuls stay few
