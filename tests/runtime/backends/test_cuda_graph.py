"""StepOptions (runtime/backends/cuda_graph.py): validated once, read from the NECTAR_* variables only
by `from_env`, and passed to the FusedDecoder at construction. CPU only."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nectar_models.config import ModelConfig
from nectar_runtime.backends.cuda_graph import FusedDecoder, StepOptions

VARS = ("NECTAR_FUSED_LAYER", "NECTAR_FUSED_OPROJ", "NECTAR_DEFERRED_MERGE")


def test_from_env_reads_the_variables(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    assert StepOptions.from_env() == StepOptions()  # unset: the defaults
    monkeypatch.setenv("NECTAR_FUSED_LAYER", "1")
    monkeypatch.setenv("NECTAR_FUSED_OPROJ", "0")
    monkeypatch.setenv("NECTAR_DEFERRED_MERGE", "0")
    assert StepOptions.from_env() == StepOptions(fused_layer=True, fused_oproj=False, deferred_merge=False)
    # "0" is off, anything else on; an explicit mapping instead of os.environ
    assert StepOptions.from_env({"NECTAR_FUSED_LAYER": "yes", "NECTAR_DEFERRED_MERGE": ""}) == StepOptions(
        fused_layer=True, deferred_merge=True)
    assert StepOptions.from_env({"NECTAR_FUSED_LAYER": "0", "NECTAR_FUSED_OPROJ": "0"}) == StepOptions(
        fused_layer=False, fused_oproj=False)


@pytest.mark.parametrize("bad", [dict(fused_layer_max_rows=0), dict(fused_layer_max_rows=-1),
                                 dict(fused_layer_max_rows=2.5), dict(fused_layer_max_rows=True),
                                 dict(fused_layer="1"), dict(fused_oproj=None), dict(deferred_merge=0)])
def test_bad_values_are_rejected(bad):
    with pytest.raises(ValueError):
        StepOptions(**bad)


def test_decoder_follows_its_options():
    """The options given at construction decide the fused layer (and its transposed weight copies);
    set_options replaces them; the options object itself is frozen."""
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=48, intermediate_size=40, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, rms_eps=1e-5, tie_embeddings=True, max_position=4096)
    plain = FusedDecoder.random(cfg, torch.float32, "cpu")
    assert plain.options == StepOptions() and plain.layers[0].wo_t is None and not plain.fused_layer(1)
    dec = FusedDecoder.random(cfg, torch.float32, "cpu", options=StepOptions(fused_layer=True, fused_layer_max_rows=2))
    assert dec.layers[0].wo_t is not None
    assert dec.fused_layer(2) and not dec.fused_layer(3)
    dec.set_options(StepOptions())
    assert not dec.fused_layer(1)
    with pytest.raises(TypeError):
        dec.set_options({"fused_layer": True})
    with pytest.raises(dataclasses.FrozenInstanceError):
        dec.options.fused_layer = True
