"""The Triton kernels against the pure-torch reference on fresh random inputs.

On a GPU (CUDA + triton): fp32, bf16 and fp16 at decode (T=1) and short prefill shapes.
On CPU with triton installed: the same kernels through Triton's interpreter, fp32, tiny shapes.
Skipped when triton is not importable."""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
if not GPU:  # before triton is imported: the interpreter flag is read then
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from nectar_kernels.reference import local_attention_reference, nectar_layer_attention_reference  # noqa: E402
from nectar_kernels.weights import random_layer  # noqa: E402

DEV = "cuda" if GPU else "cpu"
if not GPU:
    from nectar_kernels.interpret import enable

    enable()
from nectar_kernels.triton_nectar import full_layer_attention, nectar_layer_attention  # noqa: E402

TOL = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if GPU else [torch.float32]
# (B, Hq, Hkv, T, D, S, width)
SHAPES = ([(1, 9, 3, 1, 64, 40, 176), (16, 32, 8, 1, 128, 70, 256), (2, 9, 3, 33, 64, 90, 96), (3, 8, 2, 64, 64, 130, 272)]
          if GPU else [(2, 6, 2, 1, 32, 37, 48), (1, 4, 2, 5, 16, 20, 40)])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(b, hq, hkv, t, d, s, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(DEV, dtype)
    kv_len = torch.randint(t, s + 1, (b,), generator=g, dtype=torch.int32).to(DEV)
    kv_start = torch.minimum(torch.randint(0, 4, (b,), generator=g, dtype=torch.int32).to(DEV), kv_len - t)
    return q, k, v, kv_len, kv_start


@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nectar_kernel_matches_reference(variant, dtype, shape):
    b, hq, hkv, t, d, s, width = shape
    for seed in range(2):  # fresh inputs each time
        q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, dtype, seed)
        hw, hb = random_layer(variant, width, hkv, d, dtype=dtype, device=DEV, seed=seed + 7)
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        nectar_layer_attention(q, k, v, kv_len, hw, hb, variant, width, d**-0.5, kv_start=kv_start, out=out)
        ref = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, variant, width, d**-0.5, kv_start,
                                               compute_dtype=torch.float64)
        assert not out.isnan().any()
        assert _rel(out, ref) <= TOL[dtype], (_rel(out, ref), seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,t,n", [(1, 1, 300), (4, 1, 1000), (2, 3, 517), (16, 1, 2000)] if GPU else [(2, 1, 300), (1, 3, 70)])
def test_full_attention_kernel_matches_exact(dtype, b, t, n):
    hq, hkv, d, s = 6, 2, 64 if GPU else 32, 9
    q, k, v, kv_len, _ = _inputs(b, hq, hkv, t, d, s, dtype, 3)
    kd = torch.randn(1, hkv, n, d).to(DEV, dtype)
    vd = torch.randn(1, hkv, n, d).to(DEV, dtype)
    out = full_layer_attention(q, kd, vd, k, v, kv_len, d**-0.5, split_len=128)
    kk = torch.cat([kd.expand(b, -1, -1, -1), k], 2)
    vv = torch.cat([vd.expand(b, -1, -1, -1), v], 2)
    ref, _ = local_attention_reference(q.double(), kk, vv, kv_len + n, torch.zeros_like(kv_len), d**-0.5)
    assert _rel(out, ref) <= TOL[dtype]


def test_mlp_workspace_is_reused_and_left_zeroed():
    from nectar_kernels.triton_nectar import workspace_numel

    b, hq, hkv, t, d, s, width = SHAPES[0]
    ws = torch.zeros(workspace_numel(b, hq, hkv, t, d), device=DEV)
    hw, hb = random_layer("mlp", width, hkv, d, device=DEV, seed=3)
    for seed in range(3):
        q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, torch.float32, 10 + seed)
        out = nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start=kv_start, workspace=ws)
        ref = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start,
                                               compute_dtype=torch.float64)
        assert _rel(out, ref) <= 1e-3
    from nectar_kernels.triton_nectar import _row_block

    rows = (hq // hkv) * t
    block_r = _row_block(rows)
    tiles = b * hkv * -(-rows // block_r)
    assert (ws[: tiles * (block_r * d + 1)] == 0).all()  # accumulators and counters zeroed again


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,add,norm,glu", [(1, 576, 960, True, True, False), (16, 576, 1536, True, True, True),
                                                (3, 1536, 576, False, False, False), (2, 70, 18, True, True, True)])
def test_fused_gemv_matches_torch(dtype, m, k, n, add, norm, glu):
    from nectar_kernels.fused import gemv

    if not GPU and k > 100:
        pytest.skip("interpreter: small shapes only")
    g = torch.Generator(device="cpu").manual_seed(m + k)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(2 * n if glu else n, k, generator=g) * k**-0.5).to(DEV, dtype)
    d = torch.randn(m, k, generator=g).to(DEV, dtype) if add else None
    nw = (torch.rand(k, generator=g) + 0.5).to(DEV) if norm else None
    xo_t = torch.full((m, k), float("nan"), device=DEV, dtype=dtype)
    xo_r = torch.empty_like(xo_t)
    got = gemv(x, w, d, nw, 1e-5, xo_t if add else None, glu, backend="triton")
    want = gemv(x.double(), w.double(), None if d is None else d.double(), None if nw is None else nw.double(), 1e-5,
                xo_r.double() if add else None, glu, backend="torch")
    assert _rel(got, want) <= TOL[dtype]
    if add:
        assert torch.equal(xo_t, x + d)  # the new residual stream, rounded as x + delta is


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,t,hq,hkv,d,k", [(1, 1, 9, 3, 64, 576), (16, 1, 9, 3, 64, 576), (2, 5, 4, 2, 16, 64),
                                             (2, 33, 32, 8, 128, 4096)] if GPU else [(2, 3, 4, 2, 16, 48), (1, 2, 4, 2, 16, 48)])
def test_qkv_rope_matches_gemv_then_rope_store(dtype, b, t, hq, hkv, d, k):
    """The fused [add + RMSNorm + q|k|v + RoPE + KV write] launch against the unfused torch pair,
    with left padding (pos < 0: the cache slot must stay untouched)."""
    from nectar_kernels.fused import qkv_rope

    g = torch.Generator(device="cpu").manual_seed(b * 100 + t)
    m, n = b * t, (hq + 2 * hkv) * d
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(DEV, dtype)
    dl = torch.randn(m, k, generator=g).to(DEV, dtype)
    nw = (torch.rand(k, generator=g) + 0.5).to(DEV)
    pos = (torch.arange(t)[None] + 1000 * torch.arange(b)[:, None] + 7).to(DEV)
    pos[0, : t // 2] = -1  # padding
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEV)
    slot = torch.arange(b, dtype=torch.int32, device=DEV) + 2
    cap = t + b + 4
    outs = []
    for backend in ("triton", "torch"):
        dt = dtype if backend == "triton" else torch.float64
        q = torch.full((b, hq, t, d), float("nan"), device=DEV, dtype=dt)
        kc = torch.full((b, hkv, cap, d), 5.0, device=DEV, dtype=dt)
        vc = torch.full((b, hkv, cap, d), 5.0, device=DEV, dtype=dt)
        xo = torch.empty(m, k, device=DEV, dtype=dt)
        qkv_rope(x.to(dt), w.to(dt), dl.to(dt), nw.to(dt) if dt == torch.float64 else nw, 1e-5, xo, pos, inv, slot, q, kc,
                 vc, hq, hkv, backend=backend)
        outs.append((q, kc, vc, xo))
    (q, kc, vc, xo), (qr, kr, vr, xr) = outs
    assert not q.isnan().any()
    assert _rel(q, qr) <= TOL[dtype] and _rel(kc, kr) <= TOL[dtype] and _rel(vc, vr) <= TOL[dtype]
    assert (kc[0, :, 2 : 2 + t // 2] == 5).all()  # padding tokens never written
    assert torch.equal(xo, x + dl)


@pytest.mark.parametrize("b,t,n", [(1, 1, 300), (16, 1, 1000), (2, 64, 517)] if GPU else [(2, 1, 300), (1, 3, 70)])
def test_fp32_full_attention_cublas_partials_match_exact(b, t, n):
    """fp32 with no split_len takes the cuBLAS partials (one split) into the same merge kernel."""
    from nectar_kernels.triton_nectar import doc_attention_partials, doc_attention_partials_cublas

    hq, hkv, d, s = 6, 2, 64 if GPU else 32, t + 9
    q, k, v, kv_len, _ = _inputs(b, hq, hkv, t, d, s, torch.float32, 5)
    kd = torch.randn(1, hkv, n, d).to(DEV)
    vd = torch.randn(1, hkv, n, d).to(DEV)
    out = full_layer_attention(q, kd, vd, k, v, kv_len, d**-0.5)
    kk = torch.cat([kd.expand(b, -1, -1, -1), k], 2)
    vv = torch.cat([vd.expand(b, -1, -1, -1), v], 2)
    ref, _ = local_attention_reference(q.double(), kk, vv, kv_len + n, torch.zeros_like(kv_len), d**-0.5)
    assert _rel(out, ref) <= 1e-4
    po, pl = doc_attention_partials_cublas(q, kd, vd, d**-0.5)
    po2, pl2 = doc_attention_partials(q, kd, vd, d**-0.5, split_len=n)  # one split: same numbers
    assert _rel(po, po2) <= 1e-4 and (pl - pl2).abs().max() <= 1e-3
