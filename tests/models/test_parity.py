"""Our decoders vs transformers on the same weights, float32."""

from __future__ import annotations

import pytest
import torch

from nectar_models.loading import load_model

from .tiny import save_tiny, tiny_hf_configs

TOL = 1e-3  # max |Δlogit|, float32


def _ours(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, pos, cache)


@pytest.mark.parametrize("name", list(tiny_hf_configs()))
def test_tiny_family_matches_transformers(name, tmp_path):
    import transformers as T

    d = save_tiny(name, tmp_path / name, seed=hash(name) % 1000)
    ref = T.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours = load_model(d).model
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = _ours(ours, ids)
    assert (want - got).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_tiny_incremental_decode_matches_full_forward(name, tmp_path):
    """Prefill + one token at a time through the KV cache == one full forward."""
    ours = load_model(save_tiny(name, tmp_path / name)).model
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    full = _ours(ours, ids)
    cache = ours.new_cache(1, 4)  # small capacity: the buffer must grow
    with torch.no_grad():
        steps = [ours(ids[:, :10], torch.arange(10)[None], cache)]
        for t in range(10, 30):
            steps.append(ours(ids[:, t : t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


@pytest.mark.real
def test_smollm2_gguf_matches_transformers(smollm2_gguf):
    import transformers as T

    ref = T.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    ours = load_model(smollm2_gguf).model
    ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    assert (want - _ours(ours, ids)).abs().max().item() <= TOL


@pytest.mark.real
def test_gemma3_gguf_matches_transformers(gemma3_gguf):
    """700 tokens: past the 512-token sliding window, so local and global layers both count."""
    import transformers as T

    ref = T.AutoModelForCausalLM.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name, dtype=torch.float32).eval()
    ours = load_model(gemma3_gguf).model
    ids = torch.randint(0, 262144, (1, 700), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref(ids).logits
    assert (want - _ours(ours, ids)).abs().max().item() <= TOL
