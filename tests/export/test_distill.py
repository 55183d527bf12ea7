"""End-to-end distillation of the heads (nectar_export/distill.py) on a tiny random model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nectar_export.collect import collect_queries, left_padded
from nectar_export.config import FitConfig
from nectar_export.distill import (distill_heads, heldout_fidelity, probe_batches,
                                   teacher_top_k, top_k_kl, valid_log_probs)
from nectar_export.fit import fit_heads
from nectar_export.heads import HeadsSpec, nectar_contexts
from nectar_models.attention import merge_attention


@pytest.fixture(scope="module")
def fitted(tiny):
    """The tiny model, its document cache, 24 probes and heads fitted briefly on 20 of them."""
    model, cache, probes = tiny
    cfg = model.config
    qs = collect_queries(model, cache.contexts(), cache.context_len, probes, progress=False)
    held = qs.probe_index >= 20
    spec_for = lambda w: HeadsSpec("mlp", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tuple(w), cfg.scale)  # noqa: E731
    res = fit_heads(qs.select(~held), qs.select(held), spec_for, 6000,
                    FitConfig(steps=40, batch=256, seed=3, allocation="uniform", probe_steps=10), progress=False)
    return model, cache, probes, res.heads


def test_top_k_kl_is_the_exact_kl_when_k_covers_the_vocabulary_and_a_lower_bound_below():
    g = torch.Generator().manual_seed(5)
    t = F.log_softmax(torch.randn(7, 50, generator=g) * 2, -1)
    s = F.log_softmax(torch.randn(7, 50, generator=g) * 2, -1)
    exact = (t.exp() * (t - s)).sum(1)
    lp, ix = t.topk(50, dim=-1)
    assert torch.allclose(top_k_kl(s, lp, ix), exact, atol=1e-5)
    lp, ix = t.topk(5, dim=-1)
    coarse = top_k_kl(s, lp, ix)
    assert bool((coarse <= exact + 1e-6).all()) and bool((coarse >= 0).all())
    assert float(coarse.sum()) > 0.2 * float(exact.sum())  # the bulk of it, not ~0


def test_probe_batches_respect_the_token_budget_and_cover_every_probe_once():
    lens = [3, 50, 7, 7, 20, 1, 64, 12]
    probes = [[1] * n for n in lens]
    batches = probe_batches(probes, 64, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lens)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lens[i] for i in b) <= 64
    assert probe_batches(probes, 64, seed=0) == batches  # deterministic given the seed


def test_teacher_rows_follow_the_padded_row_order(fitted):
    model, cache, probes, _ = fitted
    full = cache.contexts()
    top = teacher_top_k(model, full, cache.context_len, probes[:6], 64, max_tokens=40)
    idx = [4, 1, 2]  # any order: rows come probe by probe
    ids, pos, valid = left_padded(probes, idx, cache.context_len, "cpu")
    lp = valid_log_probs(model, ids, pos, valid, full, cache.context_len)
    t_logp, t_index = top.rows(idx, "cpu")
    assert torch.allclose(lp.gather(1, t_index.long()), t_logp, atol=1e-5)
    assert torch.equal(t_index[:, 0].long(), lp.argmax(-1))


def test_gradients_reach_every_layers_heads_through_the_merge(fitted):
    model, cache, probes, heads = fitted
    heads = __import__("copy").deepcopy(heads)
    student = nectar_contexts(heads)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        ids, pos, valid = left_padded(probes, [0, 1, 2], cache.context_len, "cpu")
        valid_log_probs(model, ids, pos, valid, student, cache.context_len).logsumexp(-1).sum().backward()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    for name, p in heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(float(heads.groups[0].w1.grad[m].abs().sum()) > 0 for m in range(heads.groups[0].w1.shape[0]))


def test_merge_attention_has_a_gradient_at_an_infinite_side():
    o1, o2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    lse1 = torch.tensor([0.5, float("-inf"), 2.0], requires_grad=True)
    lse2 = torch.tensor([1.0, 0.0, float("-inf")])
    merge_attention(o1, lse1, o2, lse2).sum().backward()
    assert torch.isfinite(o1.grad).all() and torch.isfinite(lse1.grad).all()
    assert float(o1.grad[1].abs().sum()) == 0  # no weight on a part that sees no key


def test_distillation_lowers_the_training_kl(fitted):
    model, cache, probes, heads = fitted
    heads = __import__("copy").deepcopy(heads)
    full, student = cache.contexts(), nectar_contexts(heads)
    train = probes[:20]
    t_train = teacher_top_k(model, full, cache.context_len, train, 64, 256)
    before = heldout_fidelity(model, student, cache.context_len, train, t_train, 256)
    # scored on its own training probes, the best state must be a trained one
    rep = distill_heads(model, heads, full, student, cache.context_len, train, train, steps=30, lr=3e-3,
                        max_tokens=256, evals=3, progress=False)
    after = heldout_fidelity(model, student, cache.context_len, train, t_train, 256)
    assert rep["kept_step"] > 0
    assert after["kl_topk"] < 0.9 * before["kl_topk"]
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_distillation_keeps_the_heads_of_the_best_heldout_kl(fitted):
    model, cache, probes, heads = fitted
    heads = __import__("copy").deepcopy(heads)
    full, student = cache.contexts(), nectar_contexts(heads)
    held = probes[20:]
    rep = distill_heads(model, heads, full, student, cache.context_len, probes[:20], held, steps=30, lr=3e-2,
                        max_tokens=256, evals=5, progress=False)
    kls = {c["step"]: c["kl_topk"] for c in rep["curve"]}
    assert len(kls) == 6 and kls[rep["kept_step"]] == min(kls.values()) == rep["heldout_after"]["kl_topk"]
    t_held = teacher_top_k(model, full, cache.context_len, held, 64, 256)
    now = heldout_fidelity(model, student, cache.context_len, held, t_held, 256)
    assert now["kl_topk"] == pytest.approx(rep["heldout_after"]["kl_topk"], rel=1e-5)  # the kept heads are loaded


def test_distill_config_rejects_bad_values():
    assert FitConfig().distill_steps == 0  # off unless asked for
    for bad in ({"distill_steps": -1}, {"distill_lr": 0.0}, {"distill_tokens": 0}):
        with pytest.raises(ValueError):
            FitConfig(**bad)
