"""Whether the fused CUDA-graph step (cuda_graph.py) can serve a model here, and why not.

Torch-only (triton is imported only to see that it is there). `NECTAR_BACKEND=torch` forces the
torch backend (to compare the two, or to step around a kernel problem)."""

from __future__ import annotations

import os


def fused_unavailable(model) -> str | None:
    """None when the CUDA-graph fused step can serve `model` (a nectar_models Decoder) on its
    device; otherwise the reason, one short phrase."""
    if os.environ.get("NECTAR_BACKEND", "").lower() == "torch":
        return "NECTAR_BACKEND=torch"
    if model.embed_tokens.weight.device.type != "cuda":
        return "the model is not on a CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    from ..errors import NectarError
    from .cuda_graph import check_supported

    try:
        check_supported(model.config)
    except NectarError as e:
        return str(e)
    return None


def notice(reason: str) -> str:
    return f"nectar: the CUDA-graph decode step is not used ({reason}); falling back to the torch backend"
