"""ModelConfig from HF config.json: what is refused rather than silently run wrong."""

from __future__ import annotations

import json

import pytest

from nectar_models.config import config_from_hf
from nectar_runtime.errors import NectarError

_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32768)


def _write(tmp_path, **extra):
    (tmp_path / "config.json").write_text(json.dumps({**_BASE, **extra}))
    return tmp_path / "config.json"


def test_mistral_window_without_a_switch_is_refused(tmp_path):
    """Mistral v0.1 configs set sliding_window (4,096 < 32,768) with no use_sliding_window key:
    the window is on, and a global-attention model would be wrong past 4,096 tokens."""
    with pytest.raises(NectarError, match="sliding-window attention \\(4096 tokens\\)"):
        config_from_hf(_write(tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096))


@pytest.mark.parametrize("extra", [
    dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=32768),
    dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096, use_sliding_window=False),
])
def test_window_off_or_as_long_as_the_context_loads(tmp_path, extra):
    assert config_from_hf(_write(tmp_path, **extra)).layer_windows == (0, 0)


def test_qwen2_window_switched_on_is_refused(tmp_path):
    with pytest.raises(NectarError, match="sliding-window"):
        config_from_hf(_write(tmp_path, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                              use_sliding_window=True))
