"""The one interface generation needs from an execution backend."""

from __future__ import annotations

from typing import Protocol

import numpy as np

PAD_POSITION = -1  # position of a left-padding slot in `step`; never attended to


class DecoderBackend(Protocol):
    """A decoder with its document already in place (exact KV, Nectar heads, or none).

    Positions are absolute: the document occupies 0..context_len-1, local tokens follow.
    """

    context_len: int
    max_local_len: int  # local tokens (prompt + generated) the backend can hold

    def reset(self, batch: int, capacity: int) -> None:
        """Drop all local tokens; room for `capacity` local tokens per sequence."""
        ...

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions: [B, T] int64 (PAD_POSITION marks padding) -> last-token logits [B, V] fp32."""
        ...
