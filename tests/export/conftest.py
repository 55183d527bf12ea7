"""The tiny random decoder shared by the fitting and distillation tests."""

from __future__ import annotations

import pytest
import torch

from nectar_models.config import ModelConfig
from nectar_models.llama import Decoder


@pytest.fixture(scope="module")
def tiny():
    """(model, document cache of 80 random tokens, 24 random probes of 5-29 tokens); 2 layers, 4 query
    heads over 2 KV heads, head_dim 8."""
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position=512)
    model = Decoder(cfg).eval()
    cache = model.prefill_document(torch.randint(0, 64, (1, 80)))
    g = torch.Generator().manual_seed(1)
    probes = [torch.randint(0, 64, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(24)]
    return model, cache, probes
