"""Launch options shared by the Triton launchers (torch-only; no triton import here).

PDL (programmatic dependent launch, kernels/_triton_pdl.py) needs compute capability ≥ 9.0;
NECTAR_PDL=0 turns it off (to measure what it brings). L2 prefetch of weights needs sm_90 too,
16-byte aligned rows and is only useful together with PDL."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
import warnings


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


# ---------------------------------------------------------------- compiling ahead, in parallel
# A first decode step compiles its Triton kernels one after another, each on first launch (~1 s
# apiece on the H100 host with its C launcher: ~10 s of a first `nectar fit`). Triton releases the
# GIL while it compiles (and gcc runs in a subprocess), so the variants a step will need can be
# compiled at once on a thread pool: run the step once with its launches recorded instead of made
# (`recording`), then `compile_recorded`.
_RECORD = threading.local()


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or, inside `recording(calls)` on this thread, append the call
    to calls instead (nothing is compiled or launched; the outputs are left as they are)."""
    calls = getattr(_RECORD, "calls", None)
    if calls is not None:
        calls.append((kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def recording(calls: list):
    """Within this block, `launch` on this thread records into calls."""
    prev = getattr(_RECORD, "calls", None)
    _RECORD.calls = calls
    try:
        yield calls
    finally:
        _RECORD.calls = prev


def _variant_key(kernel, args, kwargs) -> tuple:
    """A conservative key of the compiled variant a call needs: tensors by dtype and 16-byte
    alignment, everything else by value (equal keys always mean the same variant)."""
    def spec(v):
        if hasattr(v, "data_ptr"):
            return ("tensor", str(v.dtype), v.data_ptr() % 16 == 0)
        return ("value", type(v).__name__, v)

    return (id(kernel), tuple(spec(a) for a in args), tuple(sorted((k, spec(v)) for k, v in kwargs.items())))


def compile_recorded(calls: list, workers: int | None = None) -> int:
    """Compile the distinct kernel variants of recorded calls on a thread pool (Triton's on-disk
    cache and each kernel's in-memory cache then serve the real launches). Returns how many
    compiled. Best effort: a variant that fails here is reported in a warning and left to its
    first real launch, which compiles it (or raises) as it would have without this."""
    unique = {}
    for kernel, grid, args, kwargs in calls:
        unique.setdefault(_variant_key(kernel, args, kwargs), (kernel, grid, args, kwargs))
    jobs = list(unique.values())
    if not jobs:
        return 0
    workers = workers or min(len(jobs), max(1, (os.cpu_count() or 2) - 1), 16)
    done, failed = 0, []
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(_compile_one, *job): job[0] for job in jobs}
        for f, kernel in futures.items():
            try:
                f.result()
                done += 1
            except Exception as e:  # noqa: BLE001 - an optimization: the real launch decides
                failed.append(f"{getattr(kernel, '__name__', kernel)}: {type(e).__name__}: {str(e)[:120]}")
    if failed:
        warnings.warn(f"precompile: {len(failed)} kernel variant(s) left to compile on first launch ({failed[0]})",
                      stacklevel=2)
    return done


def _compile_one(kernel, grid, args, kwargs) -> None:
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    # Triton builds each variant's C launcher (a gcc run) and loads its cubin on the first launch,
    # one after another; its (internal) _init_handles does that here, in parallel, on the same
    # object the real launches will find in the kernel's cache.
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()
