"""Time launch parameters of the fused Nectar kernel and the fused GEMV at the profile shapes
(CUDA-graph replays of 20 launches via triton.testing.do_bench_cudagraph). Prints the best.

    python benchmarks/kernel_sweep.py              # fused Nectar kernel + fused GEMVs
    python benchmarks/kernel_sweep.py --partials   # split-KV full-attention kernel
    python benchmarks/kernel_sweep.py --fused      # the 3-launch layer's kernels (SmolLM2 shape)
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


def sweep_fused() -> None:
    """The 3-launch layer's kernels at the SmolLM2 shape, batch 1, each timed alone (20 launches in
    a graph, PDL on): the fused MLP over its split / warps / early loads (and with plain stores
    instead of atomics, a diagnostic) against the unfused gate|up + down GEMVs, and the attention
    kernel with and without the o-projection epilogue against the o-projection GEMV."""
    from nectar_kernels import triton_nectar
    from nectar_kernels.fused import mlp_fused

    dt, eps = torch.bfloat16, 1e-5
    hid, inter, hq, hkv, d, s, width = 576, 1536, 9, 3, 64, 65, 256
    x = torch.randn(1, hid, device="cuda", dtype=dt)
    dl = torch.randn_like(x)
    dlf = dl.float()
    nw = torch.rand(hid, device="cuda") + 0.5
    xo = torch.empty_like(x)
    wgu = torch.randn(2 * inter, hid, device="cuda", dtype=dt) * hid**-0.5
    wd = torch.randn(hid, inter, device="cuda", dtype=dt) * inter**-0.5
    wd_t = wd.t().contiguous()
    wo = torch.randn(hid, hq * d, device="cuda", dtype=dt) * (hq * d) ** -0.5
    wo_t = wo.t().contiguous()
    acc = torch.zeros(1, hid, device="cuda")
    acc2 = torch.zeros(1, hid, device="cuda")
    a = gemv(x, wgu, dl, nw, eps, xo, glu=True)
    o = torch.randn(1, hq * d, device="cuda", dtype=dt)
    t_gu = bench(lambda: gemv(x, wgu, dl, nw, eps, xo, glu=True))
    t_dn = bench(lambda: gemv(a, wd))
    t_o = bench(lambda: gemv(o, wo))
    print(f"unfused: gate|up GEMV {t_gu:.2f} us + down GEMV {t_dn:.2f} us = {t_gu + t_dn:.2f}; o-proj GEMV {t_o:.2f} us")
    res = []
    for bi, nw_, split, atomic in itertools.product((2, 4, 8, 16), (2, 4, 8), (False, True), (True,)):
        tune = {"block_i": bi, "num_warps": nw_, "split_k": split, "atomic": atomic}
        try:
            us = bench(lambda: mlp_fused(x, dlf, nw, eps, xo, wgu, wd_t, acc, tuning=tune))
        except Exception as e:
            print(f"  mlp {tune}: {type(e).__name__}")
            continue
        res.append((us, tune))
    res.sort(key=lambda r: r[0])
    print("fused MLP, best 12 of all:")
    for us, tune in res[:12]:
        print(f"   {us:6.2f} us {tune}")
    print("fused MLP, with atomics, by block_i:")
    for bi in (2, 4, 8, 16):
        best = min((r for r in res if r[1]["block_i"] == bi and r[1]["atomic"]), key=lambda r: r[0], default=None)
        if best:
            print(f"   {best[0]:6.2f} us {best[1]}")
    q = torch.randn(1, hq, 1, d, device="cuda", dtype=dt)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    kv_len = torch.full((1,), s, device="cuda", dtype=torch.int32)
    hw, hb = random_layer("mlp", width, hkv, d, dtype=dt, device="cuda")
    out = torch.empty_like(q)
    ws = torch.zeros(workspace_numel(1, hq, hkv, 1, d, 16), device="cuda")
    t0 = bench(lambda: nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, out=out, workspace=ws))
    print(f"nectar kernel alone {t0:.2f} us (+ o-proj GEMV {t_o:.2f} = {t0 + t_o:.2f})")
    saved = dict(triton_nectar.OPROJ_TUNING)
    for rpb, nw_ in itertools.product((1, None), (4, 8)):
        triton_nectar.OPROJ_TUNING.update(rows_per_block=rpb, num_warps=nw_)
        ws = torch.zeros(workspace_numel(1, hq, hkv, 1, d, rpb), device="cuda")
        try:
            us = bench(lambda: nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, out=out,
                                                      workspace=ws, o_proj=(wo_t, acc), zero=acc2))
            print(f"nectar kernel + o-proj epilogue rows_per_block={rpb} warps={nw_}: {us:.2f} us")
        except Exception as e:
            print(f"  oproj {rpb} {nw_}: {type(e).__name__}")
    triton_nectar.OPROJ_TUNING.update(saved)


def main() -> None:
    import sys

    if "--partials" in sys.argv:
        return sweep_partials()
    if "--fused" in sys.argv:
        return sweep_fused()
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
