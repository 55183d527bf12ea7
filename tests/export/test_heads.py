"""Nectar heads: batched modules vs per-module reference, quadrature = exact attention when its
nodes are the document's keys, width allocation at equal parameters."""

from __future__ import annotations

import numpy as np
import torch

from nectar_export.config import VARIANTS
from nectar_export.fit import adaptive_widths, uniform_widths
from nectar_export.heads import GROUPS, HeadsSpec, MLPGroup, NectarContext, NectarHeads


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


def test_folded_mlp_heads_are_the_modules():
    """The exported form of an MLP group (context_parts.fold_mlp_heads: standardization folded into the
    weights, biases carried by each network's constant unit, the score network in its own matmuls)
    computes the module's (o, lse): fp64 numpy against the torch module in fp64, fresh random weights,
    biases and statistics. Shapes: no block-diagonal zeros (target [h+1]², score [hs+1]²)."""
    from nectar_export.export.context_parts import fold_mlp_heads

    torch.manual_seed(41)
    m, d, h = 3, 16, 24
    grp = MLPGroup(m, d, h).double()
    with torch.no_grad():
        for p in grp.parameters():
            p.normal_(0, 0.3)
        grp.q_mean.normal_(0, 1), grp.o_mean.normal_(0, 1), grp.l_mean.normal_(5, 1)
        grp.q_std.uniform_(0.5, 2), grp.o_std.uniform_(0.5, 2), grp.l_std.uniform_(0.5, 2)
    heads = fold_mlp_heads(grp, slice(None))
    hs = grp.s1.shape[2]
    assert heads.w2.shape == (m, h + 1, h + 1) and heads.w3.shape == (m, h + 1, d)
    assert heads.w2_lse.shape == (m, hs + 1, hs + 1) and heads.w3_lse.shape == (m, hs + 1, 1)
    q = torch.randn(m, 7, d, dtype=torch.float64) * 2
    with torch.no_grad():
        o_ref, lse_ref = grp(q)

    def gelu(x):  # the exact (erf) GELU, as the graph writes it
        return torch.nn.functional.gelu(torch.from_numpy(x)).numpy()

    x = q.numpy()
    z = x @ heads.wa.astype(np.float64) + heads.ba
    zt, zs, skip = np.split(z, [heads.hidden, heads.hidden + heads.hidden_lse], axis=-1)
    f = gelu(gelu(zt) @ heads.w2) @ heads.w3 + skip
    g = gelu(gelu(zs) @ heads.w2_lse) @ heads.w3_lse
    # the folded weights are stored fp32: agreement to fp32 rounding of the weights
    np.testing.assert_allclose(f, o_ref.numpy(), rtol=0, atol=2e-4 * float(o_ref.abs().max()))
    np.testing.assert_allclose(g[..., 0], lse_ref.numpy(), rtol=0, atol=2e-4 * float(lse_ref.abs().max()))
