"""Weight-only quantization of a decoder graph: 2-D weight MatMuls -> `MatMulNBits` (ONNX Runtime's
com.microsoft op; CPU, CUDA and DirectML kernels).

Block-wise asymmetric quantization along the input dimension with *float* zero points:
w ≈ (q − z) · s per block of 32 inputs. A GGUF Q4_1 weight (w = d·q + m per block of 32 along
the input, the SmolLM2 file's format) lies exactly on such a grid — s = d, z = −m/d — so an int4
bundle of a Q4_1 model holds the very weights llama.cpp runs, not a second rounding of them.

    int4: transformer matmuls at 4 bits; the LM head at 8 bits (as the GGUF keeps its tied
          embedding at Q8_0: the LM head is the one matmul whose error reaches the logits directly)
    int8: every 2-D matmul at 8 bits

Nectar heads and baked KV (3-D, small) stay fp32. `accuracy_level` 4 lets ORT's CPU kernels
quantize activations to int8 per block and use integer dot products.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

BLOCK = 32


def quantize_blockwise(w: np.ndarray, bits: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w: [K, N] (x @ w) -> packed [N, K/block, block*bits/8] uint8, scales [N*K/block] fp32,
    zero points [N*K/block] (fp32 at 4 bits; uint8 at 8 bits, as ORT's CPU kernel requires), with
    w ≈ (q − z) · s."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    levels = (1 << bits) - 1
    wb = w.T.reshape(n, k // block, block).astype(np.float64)
    lo, hi = wb.min(-1), wb.max(-1)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)  # a constant block: any scale, q = 0, z = −lo/s
    zero = -lo / scale
    if bits == 8:  # integer zero point: the grid shifts by < half a step
        zero = np.clip(np.rint(zero), 0, levels)
    q = np.clip(np.rint(wb / scale[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    if bits == 4:
        return (np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)), scale.astype(np.float32).ravel(),
                zero.astype(np.float32).ravel())
    if bits == 8:
        return np.ascontiguousarray(q), scale.astype(np.float32).ravel(), zero.astype(np.uint8).ravel()
    raise ValueError("bits must be 4 or 8")


def quantize_graph(proto, kind: str, accuracy_level: int = 4) -> dict:
    """Replace 2-D weight MatMuls of `proto` in place; returns {node name: bits}.

    4-bit weights use ORT's fast symmetric kernel (implicit zero point 8) plus an exact
    correction for the true per-block offset: x @ W = MatMulNBits(x) + blocksum(x) @ C with
    blocksum(x) = x @ (block indicator [K, K/32]) and
    C[b, n] = s·(8 − z) per block b — one [K/32, N] fp32 matmul, 1/32 of the weight's size, whose
    block sums are shared by the matmuls reading the same input.
    """
    if kind not in ("int4", "int8"):
        raise ValueError(kind)
    inits = {t.name: t for t in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    done, new_nodes, drop, blocksums = {}, [], set(), {}
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        # model weights only ("...weight" / "...weight_t"): never the RoPE rotation or the heads
        if w is None or len(w.dims) != 2 or w.dims[0] % BLOCK or not w.name.rsplit(".", 1)[-1].startswith("weight"):
            new_nodes.append(node)
            continue
        bits = 8 if kind == "int8" or "lm_head" in node.name else 4
        k, n = w.dims
        packed, scales, zeros = quantize_blockwise(numpy_helper.to_array(w).astype(np.float32), bits)
        base, name = f"{w.name}.q{bits}", node.name.replace("/MatMul", f"/MatMulNBits{bits}")
        extra = [numpy_helper.from_array(packed, base), numpy_helper.from_array(scales, f"{base}.scales")]
        if bits == 8:
            extra.append(numpy_helper.from_array(zeros, f"{base}.zero_points"))
            new_nodes.append(_nbits(node.input[0], base, True, list(node.output), name, k, n, bits, accuracy_level))
        else:
            x = node.input[0]
            if x not in blocksums:  # x @ Bk, Bk [K, K/32] the block indicator: one small matmul
                ind = _const(proto, f"/quantize/const/block_indicator_{k}",
                             np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0))
                xs = helper.make_node("MatMul", [x, ind], [f"{name}/blocksum/output_0"], name=f"{name}/blocksum/MatMul")
                new_nodes.append(xs)
                blocksums[x] = xs.output[0]
            corr = (scales * (8.0 - zeros)).reshape(n, k // BLOCK).T  # [K/32, N]
            extra.append(numpy_helper.from_array(np.ascontiguousarray(corr, np.float32), f"{base}.offset"))
            main = _nbits(x, base, False, [f"{name}/output_0"], name, k, n, bits, accuracy_level)
            fix = helper.make_node("MatMul", [blocksums[x], f"{base}.offset"], [f"{name}/offset/output_0"], name=f"{name}/offset/MatMul")
            add = helper.make_node("Add", [main.output[0], fix.output[0]], list(node.output), name=f"{name}/offset/Add")
            new_nodes += [main, fix, add]
        proto.graph.initializer.extend(extra)
        done[node.name] = bits
        users[w.name] -= 1
        if users[w.name] == 0:
            drop.add(w.name)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _nbits(x, base, with_zero, outputs, name, k, n, bits, accuracy_level):
    inputs = [x, base, f"{base}.scales"] + ([f"{base}.zero_points"] if with_zero else [])
    return helper.make_node("MatMulNBits", inputs, outputs, name=name, domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=BLOCK, accuracy_level=accuracy_level)


def _const(proto, name: str, value: np.ndarray) -> str:
    if not any(t.name == name for t in proto.graph.initializer):
        proto.graph.initializer.append(numpy_helper.from_array(value, name))
    return name
