"""Shared fixtures: the real models (pulled by `nectar pull`, see README) and tiny random ones."""

from __future__ import annotations

from pathlib import Path

import pytest


def _pulled(name: str) -> Path | None:
    from nectar_runtime.hub import model_path

    return model_path(name)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = _pulled("smollm2-135m-instruct")
    if p is None:
        pytest.skip("SmolLM2 not pulled: run `nectar pull smollm2-135m-instruct`")
    return p


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    p = _pulled("gemma3-270m")
    if p is None:
        pytest.skip("Gemma 3 270M not pulled: run `nectar pull gemma3-270m`")
    return p
