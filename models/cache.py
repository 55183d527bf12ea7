"""The KV cache of a whole decoder: per layer, a context part and a local part, kept apart.

The context part is anything implementing `ContextAttention` (exact attention over the
document's cached keys, or Nectar's networks); the local part is a growable `LocalKV` buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import ContextAttention, ExactContextAttention, LocalKV


@dataclass
class LayerCache:
    local: LocalKV
    context: ContextAttention | None = None


@dataclass
class KVCache:
    """layers[i] holds layer i's caches; `context_len` is n, the document length (0 if none)."""

    layers: list[LayerCache]
    context_len: int = 0

    @property
    def local_len(self) -> int:
        return self.layers[0].local.length

    def freeze_local_as_context(self, windows: tuple[int, ...], scale: float, capacity: int = 256) -> "KVCache":
        """Turn the local tokens prefilled so far (the document) into the exact context part.

        The returned cache has empty local buffers and `context_len` = the document length.
        """
        if any(lc.context is not None for lc in self.layers):
            raise ValueError("freeze_local_as_context: this cache already has a context part")
        n = self.local_len
        out = []
        for lc, w in zip(self.layers, windows):
            k, v, pos = lc.local.view()
            ctx = ExactContextAttention(k.clone(), v.clone(), pos[0].clone(), w, scale)
            b, hkv, _, d = lc.local.k.shape
            out.append(LayerCache(LocalKV(b, hkv, d, capacity, k.dtype, k.device), ctx))
        return KVCache(out, context_len=self.context_len + n)

    def contexts(self) -> list[ContextAttention | None]:
        return [lc.context for lc in self.layers]


def new_cache(
    num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype, device,
    contexts: list[ContextAttention | None] | None = None, context_len: int = 0,
) -> KVCache:
    """Empty local buffers; `contexts[i]` (shared, never copied) is layer i's document part."""
    contexts = contexts or [None] * num_layers
    return KVCache(
        [LayerCache(LocalKV(batch, kv_heads, head_dim, capacity, dtype, device), c) for c in contexts],
        context_len=context_len,
    )
