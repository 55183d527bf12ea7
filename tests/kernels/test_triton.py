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


# ---------------------------------------------------------------- the 3-launch decode layer
# (o-projection in the attention kernel's epilogue, the whole MLP in one launch; fp32 atomics)

def _oproj_inputs(b, hq, t, d, hid, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    wo = (torch.randn(hid, hq * d, generator=g) * (hq * d) ** -0.5).to(DEV, dtype)
    acc0 = torch.randn(b * t, hid, generator=g).to(DEV)
    zero = torch.randn(b * t * hid + 5, generator=g).to(DEV)  # any length: zeroed by the launch
    return wo, acc0, zero


@pytest.mark.parametrize("rows_per_block", [1, None])
@pytest.mark.parametrize("variant", ["mlp", "quadrature"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 64, 70, 256, 576), (4, 8, 2, 1, 64, 40, 96, 200)] if GPU
                         else [(2, 6, 2, 1, 32, 37, 48, 40), (1, 4, 2, 3, 16, 20, 40, 24)], ids=str)
def test_attention_oproj_epilogue_matches_torch(shape, dtype, variant, rows_per_block, monkeypatch):
    """The attention launch with the o-projection fused in: o as before, acc += o @ Wo^T (fp32
    atomics onto a non-zero accumulator), the zero target zeroed, on fresh random inputs."""
    from nectar_kernels import triton_nectar

    monkeypatch.setitem(triton_nectar.OPROJ_TUNING, "rows_per_block", rows_per_block)
    b, hq, hkv, t, d, s, width, hid = shape
    for seed in range(2):
        q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, dtype, 20 + seed)
        hw, hb = random_layer(variant, width, hkv, d, dtype=dtype, device=DEV, seed=seed + 3)
        wo, acc0, zero = _oproj_inputs(b, hq, t, d, hid, dtype, seed)
        acc = acc0.clone()
        out = torch.full((b, t, hq, d), float("nan"), device=DEV, dtype=dtype).transpose(1, 2)  # the step's layout
        nectar_layer_attention(q, k, v, kv_len, hw, hb, variant, width, d**-0.5, kv_start=kv_start, out=out,
                               o_proj=(wo.t().contiguous(), acc), zero=zero)
        ref = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, variant, width, d**-0.5, kv_start,
                                               compute_dtype=torch.float64)
        assert _rel(out, ref) <= TOL[dtype], seed
        want = ref.double().transpose(1, 2).reshape(b * t, hq * d) @ wo.double().t()
        assert _rel(acc.double() - acc0.double(), want) <= TOL[dtype], seed
        assert (zero == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,t,n", [(1, 1, 300), (4, 1, 1000)] if GPU else [(2, 1, 70), (1, 3, 40)])
def test_full_attention_oproj_epilogue_matches_torch(dtype, b, t, n):
    hq, hkv, d, s, hid = 6, 2, 64 if GPU else 32, 9 + t, 48
    q, k, v, kv_len, _ = _inputs(b, hq, hkv, t, d, s, dtype, 4)
    kd = torch.randn(1, hkv, n, d).to(DEV, dtype)
    vd = torch.randn(1, hkv, n, d).to(DEV, dtype)
    wo, acc0, zero = _oproj_inputs(b, hq, t, d, hid, dtype, 9)
    acc = acc0.clone()
    out = full_layer_attention(q, kd, vd, k, v, kv_len, d**-0.5, split_len=128, o_proj=(wo.t().contiguous(), acc),
                               zero=zero)
    kk = torch.cat([kd.expand(b, -1, -1, -1), k], 2)
    vv = torch.cat([vd.expand(b, -1, -1, -1), v], 2)
    ref, _ = local_attention_reference(q.double(), kk, vv, kv_len + n, torch.zeros_like(kv_len), d**-0.5)
    assert _rel(out, ref) <= TOL[dtype]
    want = ref.transpose(1, 2).reshape(b * t, hq * d) @ wo.double().t()
    assert _rel(acc.double() - acc0.double(), want) <= TOL[dtype]
    assert (zero == 0).all()


@pytest.mark.parametrize("block_i,split_k", [(8, False), (16, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,i_dim", [(1, 576, 1536), (4, 576, 1536), (2, 1024, 2816)] if GPU
                         else [(1, 48, 40), (3, 32, 24)])
def test_fused_mlp_matches_torch(dtype, m, k, i_dim, block_i, split_k):
    """add + RMSNorm + gate|up + SiLU·up + down-projection in one launch (split over the
    intermediate axis, fp32 atomics onto a non-zero accumulator) against the float64 torch path."""
    from nectar_kernels.fused import mlp_fused

    g = torch.Generator(device="cpu").manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    delta = torch.randn(m, k, generator=g).to(DEV)  # an fp32 accumulator
    nw = (torch.rand(k, generator=g) + 0.5).to(DEV)
    wgu = (torch.randn(2 * i_dim, k, generator=g) * k**-0.5).to(DEV, dtype)
    wd_t = (torch.randn(i_dim, k, generator=g) * i_dim**-0.5).to(DEV, dtype)
    acc0 = torch.randn(m, k, generator=g).to(DEV)
    acc, xo = acc0.clone(), torch.full((m, k), float("nan"), device=DEV, dtype=dtype)
    mlp_fused(x, delta, nw, 1e-5, xo, wgu, wd_t, acc, backend="triton", tuning={"block_i": block_i, "split_k": split_k})
    acc_r, xo_r = acc0.double().clone(), torch.empty(m, k, device=DEV, dtype=torch.float64)
    mlp_fused(x.double(), delta.double(), nw.double(), 1e-5, xo_r, wgu.double(), wd_t.double(), acc_r, backend="torch")
    assert _rel(acc.double() - acc0.double(), acc_r - acc0.double()) <= TOL[dtype]
    assert torch.equal(xo, (x.float() + delta).to(dtype))  # the new residual stream, rounded once


def test_qkv_rope_zeroes_the_accumulator():
    from nectar_kernels.fused import qkv_rope

    b, t, hq, hkv, d, k = 2, 1, 4, 2, 16, 48
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b * t, k, generator=g).to(DEV)
    w = (torch.randn((hq + 2 * hkv) * d, k, generator=g) * k**-0.5).to(DEV)
    pos = torch.tensor([[5], [9]], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEV)
    slot = torch.tensor([1, 2], dtype=torch.int32, device=DEV)
    q = torch.empty(b, hq, t, d, device=DEV)
    kc, vc = torch.zeros(b, hkv, 4, d, device=DEV), torch.zeros(b, hkv, 4, d, device=DEV)
    zero = torch.randn(b * t, k, generator=g).to(DEV)
    qkv_rope(x, w, None, torch.ones(k, device=DEV), 1e-5, None, pos, inv, slot, q, kc, vc, hq, hkv,
             backend="triton", zero=zero)
    assert (zero == 0).all()


@pytest.mark.parametrize("method", ["nectar", "full"])
def test_fused_layer_step_matches_unfused_step(method):
    """A whole decode step of a small random model (SmolLM2-like head counts): the 3-launch layer
    (forced) against the unfused step (GPU: fused GEMVs, 5 launches a layer; CPU: plain torch),
    same state, same logits within the dtype's tolerance; batch 3, one token."""
    from nectar_models.config import ModelConfig
    from nectar_runtime.backends.cuda_graph import FusedDecoder

    dtype = torch.bfloat16 if GPU else torch.float32
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=192 if GPU else 48, intermediate_size=320 if GPU else 40,
                      num_layers=2, num_heads=6, num_kv_heads=2, head_dim=32 if GPU else 16, rms_eps=1e-5,
                      tie_embeddings=True, max_position=4096)
    dec = FusedDecoder.random(cfg, dtype, DEV, seed=5)
    n, b = 300, 3
    if method == "nectar":
        dec.set_nectar_document([random_layer("mlp", 48, 2, cfg.head_dim, dtype=dtype, device=DEV, seed=l) + ("mlp", 48)
                                 for l in range(2)], n)
    else:
        g = torch.Generator(device="cpu").manual_seed(2)
        ks = [torch.randn(1, 2, n, cfg.head_dim, generator=g).to(DEV, dtype) for _ in range(2)]
        vs = [torch.randn(1, 2, n, cfg.head_dim, generator=g).to(DEV, dtype) for _ in range(2)]
        dec.set_full_document(ks, vs, n)
    st = dec.new_state(b, 16)
    g = torch.Generator(device="cpu").manual_seed(3)
    st.k.copy_(torch.randn(st.k.shape, generator=g).to(dtype))
    st.v.copy_(torch.randn(st.v.shape, generator=g).to(dtype))
    st.slot.copy_(torch.tensor([7, 3, 9], dtype=torch.int32))
    st.kv_len.copy_(st.slot + 1)
    st.kv_start.copy_(torch.tensor([0, 2, 1], dtype=torch.int32))
    ids = torch.tensor([[5], [17], [60]], device=DEV)
    pos = (st.slot.long() + n)[:, None]
    with torch.inference_mode():
        want = dec.forward(ids, pos, st, fused=False)
        got = dec.forward(ids, pos, st, fused=True)
    assert not got.isnan().any()
    assert _rel(got, want) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("early", [True, False], ids=["early", "loop"])
def test_deferred_merge_shares_match_reference(dtype, shape, early):
    """nectar_layer_shares + its torch merge == the reference layer attention, with the weights
    held in registers (early) and through the h1 loop; the poisoned workspace shows that every
    element the merge reads is written."""
    from nectar_kernels.triton_nectar import nectar_layer_shares, shares_numel

    b, hq, hkv, t, d, s, width = shape
    tuning = {} if early else {"early_max": 0, "block_k": 32}
    for seed in range(2):
        q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, dtype, 20 + seed)
        hw, hb = random_layer("mlp", width, hkv, d, dtype=dtype, device=DEV, seed=seed + 5)
        ws = torch.full((shares_numel(b, hq, t, d, width, tuning) + 5,), float("nan"), device=DEV)
        sh = nectar_layer_shares(q, k, v, kv_len, hw, hb, width, d**-0.5, kv_start, workspace=ws, tuning=tuning)
        ref = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start,
                                               compute_dtype=torch.float64)
        o = sh.merged().view(b, t, hq, d).transpose(1, 2)
        assert not o.isnan().any()
        assert _rel(o, ref) <= TOL[dtype], (_rel(o, ref), seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,t", [(1, 1), (2, 2)] if GPU else [(1, 1), (2, 1)])
def test_merge_gemv_matches_merge_then_linear(dtype, b, t):
    """The o-projection with the merge in its prologue (one launch) == torch merge, rounded to the
    model dtype, then linear."""
    from nectar_kernels.fused import merge_gemv
    from nectar_kernels.triton_nectar import nectar_layer_shares

    hq, hkv, d, s, width, hidden = (9, 3, 64, 40, 256, 576) if GPU else (6, 2, 32, 37, 48, 40)
    q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, dtype, 31)
    hw, hb = random_layer("mlp", width, hkv, d, dtype=dtype, device=DEV, seed=2)
    sh = nectar_layer_shares(q, k, v, kv_len, hw, hb, width, d**-0.5, kv_start)
    w = (torch.randn(hidden, hq * d) / (hq * d) ** 0.5).to(DEV, dtype)
    y = merge_gemv(sh, w, dtype, backend="triton")
    ref = torch.nn.functional.linear(sh.merged().to(dtype).double(), w.double())
    assert y.shape == (b * t, hidden) and y.dtype == dtype
    assert _rel(y, ref) <= TOL[dtype]
    assert torch.equal(merge_gemv(sh, w, dtype, backend="torch"),
                       torch.nn.functional.linear(sh.merged().to(dtype), w))


@pytest.mark.skipif(not GPU, reason="the deferred merge runs only inside the CUDA decode step")
def test_deferred_merge_step_matches_merged_step(monkeypatch):
    """A whole decode step (5-launch layer, batch 3) with the merge deferred to the o-projection
    against the same step with the merge inside the attention kernel; the deferred path must
    actually be taken on every layer."""
    from nectar_models.config import ModelConfig
    from nectar_runtime.backends.cuda_graph import FusedDecoder, StepOptions

    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=192, intermediate_size=320, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=32, rms_eps=1e-5, tie_embeddings=True, max_position=4096)
    dec = FusedDecoder.random(cfg, torch.bfloat16, DEV, seed=6, options=StepOptions(deferred_merge=False))
    widths = [48, 176]  # two layer widths: one shared workspace sized for the widest
    dec.set_nectar_document([random_layer("mlp", w, 2, 32, dtype=torch.bfloat16, device=DEV, seed=l) + ("mlp", w)
                             for l, w in enumerate(widths)], 300)
    st = dec.new_state(3, 16)
    g = torch.Generator(device="cpu").manual_seed(4)
    st.k.copy_(torch.randn(st.k.shape, generator=g).to(torch.bfloat16))
    st.v.copy_(torch.randn(st.v.shape, generator=g).to(torch.bfloat16))
    st.slot.copy_(torch.tensor([7, 3, 9], dtype=torch.int32))
    st.kv_len.copy_(st.slot + 1)
    st.kv_start.copy_(torch.tensor([0, 2, 1], dtype=torch.int32))
    ids = torch.tensor([[5], [17], [60]], device=DEV)
    pos = (st.slot.long() + 300)[:, None]
    taken = []
    orig = FusedDecoder.attention_shares

    def spy(self, i, q, st_):
        out = orig(self, i, q, st_)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(FusedDecoder, "attention_shares", spy)
    with torch.inference_mode():
        want = dec.forward(ids, pos, st, fused=False)
        assert taken == [False, False]
        dec.set_options(StepOptions(deferred_merge=True))
        got = dec.forward(ids, pos, st, fused=False)
        assert taken[2:] == [True, True]
    assert not got.isnan().any()
    assert _rel(got, want) <= TOL[torch.bfloat16]


def test_recording_captures_launches_without_running_them():
    """Inside `recording`, launches are recorded (one per call, equal variant keys for equal
    calls) and nothing runs: the poisoned output stays NaN; outside, the same call runs."""
    from nectar_kernels.launch import _variant_key, recording

    b, hq, hkv, t, d, s, width = SHAPES[0]
    q, k, v, kv_len, kv_start = _inputs(b, hq, hkv, t, d, s, torch.float32, 40)
    hw, hb = random_layer("mlp", width, hkv, d, device=DEV, seed=1)
    out = torch.full_like(q, float("nan"))
    calls = []
    with recording(calls):
        for _ in range(2):
            nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start=kv_start, out=out)
    assert len(calls) == 2 and out.isnan().all()
    keys = {_variant_key(kern, args, kw) for kern, _, args, kw in calls}
    assert len(keys) == 1
    nectar_layer_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start=kv_start, out=out)
    assert not out.isnan().any()


@pytest.mark.skipif(not GPU, reason="compiles CUDA kernels")
def test_precompile_then_step_matches_a_fresh_decoder():
    """FusedDecoder.precompile compiles the step's variants on a thread pool without touching the
    decoder's state: the next step's logits equal those of a decoder that never precompiled."""
    from nectar_models.config import ModelConfig
    from nectar_runtime.backends.cuda_graph import FusedDecoder

    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=192, intermediate_size=320, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=32, rms_eps=1e-5, tie_embeddings=True, max_position=4096)
    g = torch.Generator(device="cpu").manual_seed(2)
    ks = [torch.randn(1, 2, 300, 32, generator=g).to(DEV) for _ in range(2)]
    vs = [torch.randn(1, 2, 300, 32, generator=g).to(DEV) for _ in range(2)]
    logits = []
    for pre in (True, False):
        dec = FusedDecoder.random(cfg, torch.float32, DEV, seed=7)
        dec.set_full_document(ks, vs, 300)
        if pre:
            assert dec.precompile([16, 5], (1, 64)) > 0
        st = dec.new_state(16, 128)
        st.slot.zero_()
        st.kv_len.fill_(1)
        with torch.inference_mode():
            logits.append(dec.forward(torch.arange(16, device=DEV)[:, None], torch.full((16, 1), 300, device=DEV), st))
    assert not logits[0].isnan().any()
    assert torch.equal(logits[0], logits[1])

