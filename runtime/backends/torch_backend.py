"""The torch backend: our nectar_models decoder on CPU or CUDA. Imports torch lazily (here)."""

from __future__ import annotations

import numpy as np

from ..errors import NectarError
from .base import PAD_POSITION


def resolve_device(device: str) -> str:
    """'cpu' | 'cuda' | 'cuda:N' -> the same string, or a clear error when CUDA is absent; 'auto' -> 'cuda'
    when torch sees a GPU, else 'cpu' (the CLI's default: a fit on an H100 takes about a minute, on a 2-core
    CPU about 13)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NectarError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise NectarError(f"--device {device!r}: use auto, cpu or cuda")
    return device


class TorchBackend:
    """A `DecoderBackend` over a nectar_models Decoder whose document part is `contexts`.

    contexts: per layer a ContextAttention (exact document KV or Nectar heads), or None for
    no document; context_len: n, the number of document positions before the local tokens.
    """

    def __init__(self, model, contexts=None, context_len: int = 0):
        import torch

        self.torch = torch
        self.model = model
        self.contexts = contexts
        self.context_len = context_len
        self.max_local_len = model.config.max_position - context_len
        self.cache = None

    def reset(self, batch: int, capacity: int) -> None:
        self.cache = self.model.new_cache(batch, capacity, self.contexts, self.context_len)

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        from nectar_models.attention import INVALID_POS

        torch = self.torch
        dev = self.model.embed_tokens.weight.device
        pos = torch.from_numpy(np.where(positions == PAD_POSITION, INVALID_POS, positions)).to(dev)
        # inference_mode, not just no_grad: no autograd or version-counter bookkeeping on the
        # ~3k small ops of a decode step (~0.2 us each on CPU). The cache buffers are normal
        # tensors (from reset) written in place here, which inference mode allows.
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(ids).to(dev), pos, self.cache, last_only=True)
        return logits[:, -1].cpu().numpy()
