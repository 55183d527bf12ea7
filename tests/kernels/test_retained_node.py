"""The TensorRT plugin `NectarRetainedAttention`'s computation (triton_nectar.nectar_retained_attention:
the fused Triton kernel, then the retained heads' rows in torch ops) against its fp64 reference, on
fresh random inputs. Runs where the plugin runs: a CUDA GPU with triton (skipped elsewhere; the CPU
suite checks the reference against the torch model in tests/export/test_trt_graph.py)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("the plugin's kernels need a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from nectar_kernels.reference import nectar_layer_attention_reference, nectar_retained_attention_reference  # noqa: E402
from nectar_kernels.triton_nectar import nectar_retained_attention  # noqa: E402
from nectar_kernels.weights import random_layer  # noqa: E402

TOL = {torch.float32: 1e-3, torch.float16: 1e-2}


@pytest.mark.parametrize("subset", [False, True], ids=["all-tokens", "token-budget"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 64, 40, 176, 2, 300), (1, 9, 3, 7, 64, 60, 96, 1, 50)], ids=str)
def test_retained_node_matches_reference(subset, dtype, shape):
    b, hq, hkv, t, d, s, width, r, c = shape
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(*sh, generator=g).cuda().to(dtype) for sh in ((b, hq, t, d), (b, hkv, s, d), (b, hkv, s, d)))
        kv_len = torch.full((b,), s, dtype=torch.int32, device="cuda")
        kv_start = torch.zeros_like(kv_len)
        ret_k, ret_v = (torch.randn(r, c, d, generator=g).cuda().to(dtype) for _ in range(2))
        heads = torch.sort(torch.randperm(hkv, generator=g)[:r]).values.to(torch.int32).cuda()
        hw, hb = random_layer("mlp", width, hkv, d, dtype=torch.float32, device="cuda", seed=seed + 3)
        out = torch.full_like(q, float("nan"))
        nectar_retained_attention(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, ret_k, ret_v, heads, subset,
                                  kv_start=kv_start, out=out)
        ref = nectar_retained_attention_reference(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, ret_k, ret_v, heads,
                                                  subset, kv_start, compute_dtype=torch.float64)
        assert torch.isfinite(out).all()
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < TOL[dtype], rel
        # the retained rows differ from the plain kernel's: the stored KV is what they read
        g_ = hq // hkv
        rows = (heads.long()[:, None] * g_ + torch.arange(g_, device="cuda")).reshape(-1)
        plain = nectar_layer_attention_reference(q, k, v, kv_len, hw, hb, "mlp", width, d**-0.5, kv_start,
                                                 compute_dtype=torch.float64)
        assert (ref.double()[:, rows] - plain.double()[:, rows]).abs().max() > 1e-2
        others = torch.ones(hq, dtype=torch.bool, device="cuda")
        others[rows] = False
        assert torch.equal(ref[:, others], plain.to(ref.dtype)[:, others])
