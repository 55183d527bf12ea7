"""kernels/launch.py without triton: recording launches and compiling them ahead (best effort)."""

from __future__ import annotations

import pytest

from nectar_kernels.launch import compile_recorded, launch, recording


def test_compile_recorded_is_best_effort():
    """A variant that fails to compile ahead is reported once and not counted; the others are."""
    class Ok:
        __name__ = "ok"

        def warmup(self, *a, grid, **kw):
            return None

    class Broken:
        __name__ = "broken"

        def warmup(self, *a, grid, **kw):
            raise RuntimeError("no shared memory")

    calls = [(Ok(), (1,), (1,), {}), (Broken(), (1,), (2,), {}), (Ok(), (1,), (3,), {})]
    with pytest.warns(UserWarning, match="1 kernel variant.*broken: RuntimeError: no shared memory"):
        assert compile_recorded(calls, workers=2) == 2


def test_launch_runs_outside_recording_and_records_inside():
    ran = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **kw: ran.append((grid, a, kw))

    k = Kernel()
    launch(k, (2, 1), 7, X=1)
    calls = []
    with recording(calls):
        launch(k, (3,), 8, X=2)
    launch(k, (4,), 9)
    assert ran == [((2, 1), (7,), {"X": 1}), ((4,), (9,), {})]
    assert calls == [(k, (3,), (8,), {"X": 2})]
