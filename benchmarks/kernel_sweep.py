"""Time launch parameters of the fused Nectar kernel and the fused GEMV at the profile shapes
(CUDA-graph replays of 20 launches via triton.testing.do_bench_cudagraph). Prints the best.

    python benchmarks/kernel_sweep.py              # fused Nectar kernel + fused GEMVs
    python benchmarks/kernel_sweep.py --partials   # split-KV full-attention kernel
"""

from __future__ import annotations

import itertools

import torch
from triton.testing import do_bench_cudagraph

from nectar_kernels.fused import gemv
from nectar_kernels.triton_nectar import nectar_layer_attention, workspace_numel
from nectar_kernels.weights import random_layer


def bench(fn) -> float:
    fn()
    torch.cuda.synchronize()

    def twenty():
        for _ in range(20):
            fn()

    return do_bench_cudagraph(twenty, rep=50) / 20 * 1e3  # us per launch


def sweep_partials() -> None:
    """The split-KV full-attention kernel at n = 128K, batch 1 and 16 (G query heads per KV head)."""
    from nectar_kernels.triton_nectar import doc_attention_partials

    dt = torch.bfloat16
    n = 131072
    for name, (hq, hkv, d) in {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}.items():
        kd = torch.randn(1, hkv, n, d, device="cuda", dtype=dt)
        vd = torch.randn_like(kd)
        for b in (1, 16):
            q = torch.randn(b, hq, 1, d, device="cuda", dtype=dt)
            res = []
            for pps, bn, nw, ns in itertools.product((2, 4), (64, 128), (4, 8), (2, 3)):
                tune = {"programs_per_sm": pps, "block_n": bn, "num_warps": nw, "num_stages": ns}
                try:
                    us = bench(lambda: doc_attention_partials(q, kd, vd, d**-0.5, tuning=tune))
                except Exception as e:
                    print(f"  {name} b={b} {tune}: {type(e).__name__}")
                    continue
                res.append((us, tune))
            res.sort(key=lambda r: r[0])
            gbs = 2 * hkv * n * d * 2 / (res[0][0] * 1e-6) / 1e9
            print(f"split-KV {name} b={b} n={n}: best {res[0][0]:.1f} us ({gbs:.0f} GB/s of KV) {res[0][1]}")
            for us, tune in res[:3]:
                print(f"   {us:7.1f} us {tune}")


def main() -> None:
    import sys

    if "--partials" in sys.argv:
        return sweep_partials()
    dt = torch.bfloat16
    for name, (hq, hkv, d) in {"smollm2": (9, 3, 64), "llama3-8b": (32, 8, 128)}.items():
        b, t, s, width = 1, 1, 65, 256
        q = torch.randn(b, hq, t, d, device="cuda", dtype=dt)
        k = torch.randn(b, hkv, s, d, device="cuda", dtype=dt)
        v = torch.randn_like(k)
        kv_len = torch.full((b,), s, device="cuda", dtype=torch.int32)
        hw, hb = random_layer("mlp", width, hkv, d, dtype=dt, device="cuda")
        ws = torch.zeros(workspace_numel(b, hq, hkv, t, d), device="cuda")
        out = torch.empty_like(q)
        res = []
        for bh, bk, nw, ns in itertools.product((32, 64, 128), (64, 128), (2, 4), (1, 2)):
            tune = {"block_h": bh, "block_k": bk, "num_warps": nw, "num_stages": ns}
            try:
                us = bench(lambda: nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, out=out,
                                                          workspace=ws, tuning=tune))
            except Exception as e:  # out of resources etc.
                print(f"  {name} {tune}: {type(e).__name__}")
                continue
            res.append((us, tune))
        res.sort(key=lambda r: r[0])
        print(f"nectar kernel {name} width {width}: best {res[0][0]:.2f} us {res[0][1]}; worst {res[-1][0]:.2f} us")
        for us, tune in res[:4]:
            print(f"   {us:6.2f} us {tune}")
    hid, inter = 576, 1536
    cases = {"qkv": (576, 960, True, False), "gate_up": (576, 1536, True, True), "down": (1536, 576, False, False),
             "o": (576, 576, False, False)}
    for m in (1, 16):
        for cname, (kk, n, norm, glu) in cases.items():
            x = torch.randn(m, kk, device="cuda", dtype=dt)
            w = torch.randn(2 * n if glu else n, kk, device="cuda", dtype=dt) * kk**-0.5
            dl = torch.randn_like(x) if norm else None
            nw = torch.rand(kk, device="cuda") + 0.5 if norm else None
            xo = torch.empty_like(x)
            res = []
            for bn, bk, nw_ in itertools.product((16, 32, 64), (256, 1024), (2, 4, 8)):
                tune = {"block_n": bn, "block_k": bk, "num_warps": nw_}
                try:
                    us = bench(lambda: gemv(x, w, dl, nw, 1e-5, xo if norm else None, glu, tuning=tune))
                except Exception as e:
                    print(f"  gemv {cname} {tune}: {type(e).__name__}")
                    continue
                res.append((us, tune))
            res.sort(key=lambda r: r[0])
            cub = bench(lambda: torch.nn.functional.linear(x, w))
            print(f"gemv {cname} m={m}: best {res[0][0]:.2f} us {res[0][1]}; default-ish "
                  f"{[r[0] for r in res if r[1] == {'block_n': 16, 'block_k': 256, 'num_warps': 2}]}; cuBLAS linear {cub:.2f} us")


if __name__ == "__main__":
    main()
