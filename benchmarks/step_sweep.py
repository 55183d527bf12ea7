"""Launch parameters timed inside the whole CUDA-graph decode step (PDL overlap included, which
isolated kernel timings miss): the 3-launch layer against the 5-launch one, the deferred merge
(and its launch parameters) against the merge inside the attention kernel, the fused
o-projection's rows per program, the fused MLP's split and warps, early weight loads, and the
row GEMV / Nectar kernel parameters. Each trial passes its StepOptions to the decoder (the
NECTAR_* variables in the trial names say which switch it stands for; the environment is not read).

    python benchmarks/step_sweep.py --shape smollm2-135m --n 1024 --batch 1 [--quick]
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", default="nectar")
    p.add_argument("--quick", action="store_true", help="only the fused-layer trials")
    p.add_argument("--mlp", default="", help="fused-MLP block_i/num_warps pairs to try, e.g. 4/4,8/8")
    p.add_argument("--names", default="", help="only trials whose name contains one of these (comma-separated)")
    p.add_argument("--repeat", type=int, default=1, help="run the trial list this many times (interleaved A/B)")
    a = p.parse_args()
    from nectar_kernels import fused, triton_nectar
    from nectar_profiling.profile import TorchRunner
    from nectar_profiling.shapes import ProfileConfig
    from nectar_runtime.backends.cuda_graph import StepOptions

    default = StepOptions()
    r = TorchRunner(ProfileConfig(shape=a.shape, device="cuda", dtype="bf16", steps=100, warmup=10), default)
    tables = {"row": fused.ROW_TUNING, "mlp": fused.MLP_TUNING, "oproj": triton_nectar.OPROJ_TUNING,
              "nectar": triton_nectar.MLP_TUNING, "shares": triton_nectar.SHARES_TUNING}
    saved = {k: dict(v) for k, v in tables.items()}
    mlps = [(bi, w) for bi in (2, 4, 8) for w in (2, 4, 8)]
    if a.mlp:
        mlps = [tuple(int(v) for v in c.split("/")) for c in a.mlp.split(",")]
    on = StepOptions(fused_layer=True)
    gemv_oproj = StepOptions(fused_layer=True, fused_oproj=False)
    trials = [("default (5 launches a layer)", {}, default),
              ("row GEMV weights prefetched, not loaded early", {"row": {"early": False}}, default),
              ("3 launches (NECTAR_FUSED_LAYER=1)", {}, on),
              ("4 launches: o-proj GEMV, fused MLP (NECTAR_FUSED_OPROJ=0)", {}, gemv_oproj)]
    trials += [(f"{lay}mlp block_i={bi} warps={w}", {"mlp": {"block_i": bi, "num_warps": w}}, opts)
               for bi, w in mlps for lay, opts in (("3 launches, ", on), ("4 launches, ", gemv_oproj))]
    trials += [("merge inside the attention kernel (NECTAR_DEFERRED_MERGE=0)", {}, StepOptions(deferred_merge=False))]
    trials += [(f"deferred merge block_h={bh} warps={w}", {"shares": {"block_h": bh, "num_warps": w}}, default)
               for bh, w in ((32, 4), (32, 8), (64, 4), (128, 8))]
    trials += [("deferred merge, h1 loop (no early weights)", {"shares": {"early_max": 0}}, default)]
    if a.names:
        trials = [t for t in trials if any(n in t[0] for n in a.names.split(","))]
    if not a.quick:
        trials += [(f"row block_n={bn}", {"row": {"block_n": bn}}, default) for bn in (2, 4)]
        trials += [(f"nectar block_h={bh} warps={w}", {"nectar": {"block_h": bh, "num_warps": w}}, default)
                   for bh, w in ((32, 4), (128, 8))]
    for name, over, opts in trials * a.repeat:
        for k, v in tables.items():
            v.clear()
            v.update({**saved[k], **over.get(k, {})})
        r.dec.set_options(opts)
        for method in a.methods.split(","):
            try:
                res = r.measure(method, a.batch, a.n)
                print(f"{res['latency_ms_median']:.4f} ms (p90 {res['latency_ms_p90']:.4f})  {method:6s} {name}", flush=True)
            except Exception as e:  # a variant that does not compile or fit: say so, go on
                print(f"failed  {method:6s} {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    for k, v in tables.items():
        v.clear()
        v.update(saved[k])


if __name__ == "__main__":
    main()
