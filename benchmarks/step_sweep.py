"""Launch parameters timed inside the whole CUDA-graph decode step (PDL overlap included, which
isolated kernel timings miss): the row GEMV's block / warps and the Nectar kernel's hidden split.

    python benchmarks/step_sweep.py --shape smollm2-135m --n 1024 --batch 1
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    a = p.parse_args()
    from nectar_kernels import fused, triton_nectar
    from nectar_profiling.profile import TorchRunner
    from nectar_profiling.shapes import ProfileConfig

    r = TorchRunner(ProfileConfig(shape=a.shape, device="cuda", dtype="bf16", steps=100, warmup=10))
    row0, mlp0 = dict(fused.ROW_TUNING), dict(triton_nectar.MLP_TUNING)
    trials = [("default", {}, {})]
    trials += [(f"row block_n={bn} weights/thread={wpt}", {"block_n": bn, "weights_per_thread": wpt}, {})
               for bn in (2, 4, 8) for wpt in (32, 64)]
    trials += [(f"mlp block_h={bh} warps={w}", {}, {"block_h": bh, "num_warps": w}) for bh in (32, 64, 128) for w in (4, 8)]
    for name, row, mlp in trials:
        fused.ROW_TUNING.update({**row0, **row})
        triton_nectar.MLP_TUNING.update({**mlp0, **mlp})
        res = r.measure("nectar", a.batch, a.n)
        print(f"{res['latency_ms_median']:.4f} ms  {name}", flush=True)
    fused.ROW_TUNING.update(row0)
    triton_nectar.MLP_TUNING.update(mlp0)


if __name__ == "__main__":
    main()
