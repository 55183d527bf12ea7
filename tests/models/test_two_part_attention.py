"""Context + local attention merged by log-sum-exp == single-pass attention over both."""

from __future__ import annotations

import pytest
import torch

from nectar_models.attention import attention_with_lse, merge_attention, visibility
from nectar_models.loading import load_model

from .tiny import save_tiny


def test_merge_of_two_key_sets_equals_attention_over_their_union():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 2, 5, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64)
    o_all, lse_all = attention_with_lse(q, k, v, 0.25, None)
    o1, l1 = attention_with_lse(q, k[:, :, :27], v[:, :, :27], 0.25, None)
    o2, l2 = attention_with_lse(q, k[:, :, 27:], v[:, :, 27:], 0.25, None)
    assert torch.allclose(merge_attention(o1, l1, o2, l2), o_all, atol=1e-12)
    assert torch.allclose(torch.logaddexp(l1, l2), lse_all, atol=1e-12)


def test_merge_with_an_empty_part_is_the_other_part():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 1, 3, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g), torch.randn(1, 1, 6, 8, generator=g))
    o, lse = attention_with_lse(q, k, v, 0.3, None)
    none = visibility(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 6), 5), 0)  # keys all in the future
    oe, le = attention_with_lse(q, k, v, 0.3, none)
    assert torch.isneginf(le).all() and (oe == 0).all()
    assert torch.equal(merge_attention(oe, le, o, lse), o)
    assert torch.equal(merge_attention(o, lse, oe, le), o)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_document_as_context_part_equals_single_pass(name, tmp_path):
    """Prefill a document into the exact context part, then local tokens: same logits as one pass.

    The gemma3 tiny model has an 8-token sliding window, shorter than the document, so the
    window must also apply across the context/local seam.
    """
    model = load_model(save_tiny(name, tmp_path / name)).model
    ids = torch.randint(0, 97, (1, 64), generator=torch.Generator().manual_seed(4))
    n = 45
    with torch.no_grad():
        full = model(ids, torch.arange(64)[None], model.new_cache(1, 64))
        cache = model.prefill_document(ids[:, :n], chunk=16)
        assert cache.context_len == n and cache.local_len == 0
        local = model(ids[:, n:60], torch.arange(n, 60)[None], cache)
        last = [model(ids[:, t : t + 1], torch.tensor([[t]]), cache) for t in range(60, 64)]
    got = torch.cat([local] + last, 1)
    assert (got - full[:, n:]).abs().max().item() <= 1e-5


def test_shared_document_kv_across_a_batch_equals_per_sequence_attention():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 2, 2, 4, 8, generator=g)
    k, v = torch.randn(1, 2, 30, 8, generator=g), torch.randn(1, 2, 30, 8, generator=g)
    o, lse = attention_with_lse(q, k, v, 0.35, None)  # batch folded into query rows
    o_ref, lse_ref = attention_with_lse(q, k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), 0.35, None)
    assert torch.allclose(o, o_ref, atol=1e-6) and torch.allclose(lse, lse_ref, atol=1e-6)
