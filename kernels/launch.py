"""Launch options shared by the Triton launchers (torch-only; no triton import here).

PDL (programmatic dependent launch, kernels/_triton_pdl.py) needs compute capability ≥ 9.0;
NECTAR_PDL=0 turns it off (to measure what it brings). L2 prefetch of weights needs sm_90 too,
16-byte aligned rows and is only useful together with PDL."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    import torch

    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl_enabled(t) -> bool:
    """Whether kernels working on tensor t launch with PDL (CUDA, sm_90+, not disabled)."""
    if t.device.type != "cuda" or os.environ.get("NECTAR_PDL", "1") == "0":
        return False
    return _sm90(t.device.index if t.device.index is not None else 0)


def can_prefetch(w, row_elems: int) -> bool:
    """Rows of w (row_elems elements each) can be bulk-prefetched: PDL on, 16-byte aligned rows."""
    return pdl_enabled(w) and w.data_ptr() % 16 == 0 and (row_elems * w.element_size()) % 16 == 0


def pdl_options(pdl: bool) -> dict:
    """Extra launch keyword arguments (Triton's launch_pdl option only when used: the CPU
    interpreter does not know it)."""
    return {"launch_pdl": True} if pdl else {}
