"""Where a fused decode step's time goes: per-kernel GPU time of one eager step (torch.profiler),
next to the CUDA-graph replay time of the same step. For the GPU notes in docs/benchmarks.md.

    python benchmarks/step_breakdown.py --shape smollm2-135m --n 1024 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--methods", default="nectar,full")
    p.add_argument("--eager-only", action="store_true", help="two eager steps and exit (a target for ncu)")
    a = p.parse_args()
    from nectar_profiling.profile import TorchRunner
    from nectar_profiling.shapes import ProfileConfig
    from nectar_runtime.backends.cuda_graph import GraphedStep

    cfg = ProfileConfig(shape=a.shape, device="cuda", dtype="bf16", n=(a.n,), batch=(a.batch,), width=a.width)
    r = TorchRunner(cfg)
    for method in a.methods.split(","):
        if method == "full":
            ks, vs = r._document(a.n)
            r.dec.set_full_document(ks, vs, a.n)
        else:
            r.dec.set_nectar_document(r.packed, a.n)
        st = r.dec.new_state(a.batch, cfg.local_len + 1)
        st.k.normal_(), st.v.normal_(), st.slot.fill_(cfg.local_len), st.kv_len.fill_(cfg.local_len + 1)
        ids = torch.randint(0, r.model_cfg.vocab_size, (a.batch, 1), device="cuda")
        pos = torch.full((a.batch, 1), a.n + cfg.local_len, device="cuda")
        with torch.inference_mode():
            if a.eager_only:
                for _ in range(2):
                    r.dec.forward(ids, pos, st)
                torch.cuda.synchronize()
                continue
            g = GraphedStep(r.dec, st)
            g(ids, pos)
            times = []
            for _ in range(200):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(), g(), e.record(), e.synchronize()
                times.append(s.elapsed_time(e))
            for _ in range(3):
                r.dec.forward(ids, pos, st)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                r.dec.forward(ids, pos, st)
                torch.cuda.synchronize()
        agg, cnt = defaultdict(float), defaultdict(int)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                agg[ev.name[:70]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
                cnt[ev.name[:70]] += 1
        total = sum(agg.values())
        print(f"\n== {a.shape} {method} n={a.n} batch={a.batch}: graph replay median {statistics.median(times):.3f} ms; "
              f"eager kernels sum {total / 1e3:.3f} ms in {sum(cnt.values())} kernels")
        for name, us in sorted(agg.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {us / 1e3:8.3f} ms {cnt[name]:5d}x  {name}")
        del g, st
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
