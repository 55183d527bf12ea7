"""Weight-only quantization of a decoder graph: 2-D weight MatMuls -> `MatMulNBits` (ONNX Runtime's
com.microsoft op; CPU, CUDA and DirectML kernels). Block-wise (32 inputs per block), asymmetric.

    int4        transformer matmuls at 4 bits, the LM head at 8 bits (the GGUF, too, keeps its tied
                embedding at Q8_0), reproducing a GGUF Q4_1 weight (w = d·q + m per block of 32
                inputs): it lies exactly on the grid (q − z)·s with the float zero point z = −m/d,
                so the bundle holds the very 4-bit codes llama.cpp runs. ORT's fast kernel takes
                only integer zero points (float ones run ~25× slower), so the graph runs it with the
                nearest integer z' and adds what z' misses, the per-block residual s·(z' − z), as a
                small 8-bit matmul over the input's block sums: x·W = MatMulNBits(x) + (x·Bk)·R
                (Bk the [K, K/32] block indicator, R [K/32, N]; block sums shared by the matmuls
                reading one input). R's 8-bit grid moves a weight by ≤ 1/510 of R's range over a
                block of block sums (about one Q4_1 step), 16× finer than int8's rounding
    int4-rtn    round-to-nearest with integer zero points: ORT's fastest path (168 vs 147 tok/s
                for int4 on the 2-core CPU of docs/benchmarks.md), but for weights that are already 4-bit (a Q4_1 GGUF) a
                second rounding, with a visible quality cost (docs/results.md)
    int8        every 2-D matmul at 8 bits (integer zero points: within half a step of a Q4_1
                grid point, 1/32 of a Q4_1 step)

Nectar MLP heads (the `[Hkv, K, N]` weights `…nectar_heads.{wa,w2,w3}`, applied to queries grouped
`[B, Hkv, G*T, K]`) go to 8 bits in every kind when a weight holds at least `heads_min_bytes` of
fp32 (the exporter's default: bundle.HEADS_MIN_BYTES): one `MatMulNBits` per KV head between a
Split and a Concat over the head axis (ORT's kernel takes 2-D weights only; a single KV head needs
neither), in blocks of `heads_block` inputs (the exporter's: bundle.HEADS_BLOCK = 128; ORT's int8
kernel runs several query rows much faster with larger blocks than with blocks of 32). At the
default budget the heads hold tens of MB of fp32 weights, read in full at every token; 8 bits keep
their rounding (~1/255 of a block's range) far below the heads' own ~0.15 relative error. Smaller
weights stay one fp32 MatMul: there the Hkv + 2 nodes cost more than the bytes saved. K need not
be a multiple of the block: the last block's weight rows are zero-padded (ORT
reads only K inputs). Baked KV, retained KV and (standard graph form) the RoPE rotation matrix stay
as they are. `accuracy_level` 4 lets ORT's CPU kernels quantize activations to int8 per block and use
integer dot products.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

BLOCK = 32
OFFSET_BLOCK = 32  # the 8-bit offset residuals' blocks (over the K/32 block sums)


KINDS = ("int8", "int4", "int4-rtn")


def quantize_blockwise(w: np.ndarray, bits: int, block: int = BLOCK, float_zero: bool = False, pad: bool = False):
    """w: [K, N] (x @ w) -> (packed [N, K/block, block*bits/8] uint8, scales [N*K/block] fp32,
    zero points), w ≈ (q − z) · s. Zero points: fp32 [N*K/block] with `float_zero` (4 bits only),
    else integers as ORT packs them — uint8 [N*K/block] at 8 bits, two per byte at 4 bits
    ([N, ceil(K/block / 2)], low nibble first). `pad`: a K that is not a multiple of `block` gets
    zero rows up to the next multiple (K/block rounds up; MatMulNBits keeps the true K)."""
    k, n = w.shape
    if k % block and pad:
        w = np.concatenate([w, np.zeros((block - k % block, n), w.dtype)], axis=0)
        k = w.shape[0]
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    levels = (1 << bits) - 1
    wb = w.T.reshape(n, k // block, block).astype(np.float64)
    lo, hi = wb.min(-1), wb.max(-1)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)  # a constant block: any scale, q = 0, z = −lo/s
    if bits not in (4, 8) or (float_zero and bits != 4):
        raise ValueError("bits must be 4 or 8; float zero points only at 4 bits")
    zero = -lo / scale
    if not float_zero:  # integer zero point: the grid shifts by < half a step
        zero = np.clip(np.rint(zero), 0, levels)
    q = np.clip(np.rint(wb / scale[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    scale = scale.astype(np.float32).ravel()
    if bits == 8:
        return np.ascontiguousarray(q), scale, zero.astype(np.uint8).ravel()
    packed = np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))
    if float_zero:
        return packed, scale, zero.astype(np.float32).ravel()
    return packed, scale, _pack_nibbles(zero.astype(np.uint8))


def _pack_nibbles(z: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, K/block] uint8 -> [N * ceil(K/block / 2)], two per byte, low nibble first."""
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4)).ravel()


def _offset_nbits(blocksums: str, residual: np.ndarray, base: str, name: str, accuracy_level: int, extra: list):
    """`blocksums [.., K/32] @ residual [K/32, N]` as one 8-bit MatMulNBits (its weights appended to
    `extra`): a quarter of the fp32 matmul's bytes, which at decode are most of its time. The 8-bit
    grid moves each weight by ≤ 1/510 of the residuals' range over a block of block sums."""
    kb, n = residual.shape
    block = max(16, min(OFFSET_BLOCK, 1 << (kb.bit_length() - 1)))
    packed, scales, zeros = quantize_blockwise(residual, 8, block=block, pad=True)
    extra += [numpy_helper.from_array(packed, base), numpy_helper.from_array(scales, f"{base}.scales"),
              numpy_helper.from_array(zeros, f"{base}.zero_points")]
    return _nbits(blocksums, base, True, [f"{name}/output_0"], name, kb, n, 8, accuracy_level, block)


def quantize_graph(proto, kind: str, accuracy_level: int = 4, heads: bool = True, *, heads_min_bytes: int,
                   heads_bits: int = 8, heads_block: int = BLOCK) -> dict:
    """Replace 2-D weight MatMuls of `proto` in place, and the Nectar heads' batched ones of at
    least `heads_min_bytes` fp32 bytes (per KV head, `heads_bits` bits); returns {node name: bits}.

    int4: 4-bit weights on ORT's fast kernel with integer zero points, plus the per-block residual
    of the true (float) zero point: x @ W = MatMulNBits(x) + blocksum(x) @ R with
    blocksum(x) = x @ (block indicator [K, K/32]) and R[b, n] = s·(round(z) − z) — one 8-bit
    [K/32, N] MatMulNBits, whose block sums are shared by the matmuls reading the same input.
    """
    if kind not in KINDS:
        raise ValueError(kind)
    inits = {t.name: t for t in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    done, new_nodes, drop, blocksums, eight_bit, head_weights = {}, [], set(), {}, {}, set()
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if heads and w is not None and len(w.dims) == 3 and ".nectar_heads." in w.name \
                and 4 * int(np.prod(w.dims)) >= heads_min_bytes:
            new_nodes += _per_head_nbits(proto, node, numpy_helper.to_array(w).astype(np.float32), accuracy_level, head_weights,
                                         heads_bits, heads_block)
            done[node.name] = heads_bits
            users[w.name] -= 1
            if users[w.name] == 0:
                drop.add(w.name)
            continue
        # model weights only ("...weight" / "...weight_t"): never the RoPE rotation or baked/retained KV
        if w is None or len(w.dims) != 2 or w.dims[0] % BLOCK or not w.name.rsplit(".", 1)[-1].startswith("weight"):
            new_nodes.append(node)
            continue
        bits = 8 if kind == "int8" or "lm_head" in node.name else 4
        k, n = w.dims
        exact = kind == "int4" and bits == 4
        packed, scales, zeros = quantize_blockwise(numpy_helper.to_array(w).astype(np.float32), bits, float_zero=exact)
        base, name = f"{w.name}.q{bits}", node.name.replace("/MatMul", f"/MatMulNBits{bits}")
        extra = [numpy_helper.from_array(packed, base), numpy_helper.from_array(scales, f"{base}.scales")]
        if not exact:
            extra.append(numpy_helper.from_array(zeros, f"{base}.zero_points"))
            if bits == 8:
                eight_bit[w.name] = (base, k, n, scales, zeros)
            new_nodes.append(_nbits(node.input[0], base, True, list(node.output), name, k, n, bits, accuracy_level))
        else:
            x = node.input[0]
            if x not in blocksums:  # x @ Bk, Bk [K, K/32] the block indicator: one small matmul
                ind = _const(proto, f"/quantize/const/block_indicator_{k}",
                             np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0))
                xs = helper.make_node("MatMul", [x, ind], [f"{name}/blocksum/output_0"], name=f"{name}/blocksum/MatMul")
                new_nodes.append(xs)
                blocksums[x] = xs.output[0]
            z = np.clip(np.rint(zeros), 0, 15)  # the nearest integer zero point: ORT's fast kernel
            main = _nbits(x, base, True, [f"{name}/output_0"], name, k, n, bits, accuracy_level)
            extra.append(numpy_helper.from_array(_pack_nibbles(z.astype(np.uint8).reshape(n, k // BLOCK)), f"{base}.zero_points"))
            # what the integer zero point misses, per block: s·(z − z_float), |.| ≤ s/2 unless clipped
            residual = np.ascontiguousarray((scales * (z - zeros)).reshape(n, k // BLOCK).T, np.float32)  # [K/32, N]
            fix = _offset_nbits(blocksums[x], residual, f"{base}.offset.q8", f"{name}/offset/MatMulNBits8", accuracy_level, extra)
            add = helper.make_node("Add", [main.output[0], fix.output[0]], list(node.output), name=f"{name}/offset/Add")
            new_nodes += [main, fix, add]
        proto.graph.initializer.extend(extra)
        done[node.name] = bits
        users[w.name] -= 1
        if users[w.name] == 0:
            drop.add(w.name)
    new_nodes = _quantized_embedding_lookup(proto, new_nodes, eight_bit, users, drop)
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    keep = [t for t in proto.graph.initializer if t.name not in drop]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _quantized_embedding_lookup(proto, nodes: list, eight_bit: dict, users: dict, drop: set) -> list:
    """A tied embedding whose LM head is now 8-bit: look tokens up in those same 8-bit weights.

    The lookup `Gather(table_t [H, V], ids, axis=1) -> Transpose [B, T, H]` becomes
    `GatherBlockQuantized(q8 [V, H/32, 32], ids) -> Reshape [B, T, H]` on the LM head's own packed
    weights, so the fp32 table (113 MB on SmolLM2, more than the rest of an int4 bundle) is no longer
    stored; token embeddings get the LM head's 8-bit rounding. Other layouts are left as they are.
    """
    consumers: dict[str, list] = {}
    for node in nodes:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out, skip = [], set()
    for node in nodes:
        if id(node) in skip:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        after = consumers.get(node.output[0], []) if node.op_type == "Gather" else []
        perm = [list(a.ints) for a in after[0].attribute if a.name == "perm"] if len(after) == 1 else []
        if node.op_type != "Gather" or node.input[0] not in eight_bit or axis != 1 or after[0].op_type != "Transpose" \
                or perm != [[1, 2, 0]]:
            out.append(node)
            continue
        base, k, n, scales, zeros = eight_bit[node.input[0]]
        block = BLOCK
        _const(proto, f"{base}.scales_3d", scales.reshape(n, k // block, 1))
        _const(proto, f"{base}.zero_points_3d", zeros.reshape(n, k // block, 1))
        shape = _const(proto, f"/quantize/const/embed_shape_{k}", np.array([0, 0, k], np.int64))
        name = node.name.replace("/Gather", "/GatherBlockQuantized8")
        out.append(helper.make_node("GatherBlockQuantized", [base, node.input[1], f"{base}.scales_3d", f"{base}.zero_points_3d"],
                                    [f"{name}/output_0"], name=name, domain="com.microsoft", gather_axis=0, quantize_axis=2,
                                    block_size=block, bits=8))
        out.append(helper.make_node("Reshape", [f"{name}/output_0", shape], list(after[0].output),
                                    name=node.name.replace("/Gather", "/Reshape")))
        skip.add(id(after[0]))
        users[node.input[0]] -= 1
        if users[node.input[0]] == 0:
            drop.add(node.input[0])
    return out


def _per_head_nbits(proto, node, w: np.ndarray, accuracy_level: int, done_weights: set, bits: int = 8,
                    block: int = BLOCK) -> list:
    """`MatMul(x [B, H, R, K], w [H, K, N])` -> Split(x, axis 1) -> H × MatMulNBits-`bits` -> Concat(axis 1)
    (one MatMulNBits, no Split/Concat, when H = 1); integer zero points, blocks of `block` inputs (at
    most the largest power of two ≤ K, at least 16: ORT's kernel reads whole blocks).

    With `p` the MatMul's name without its last part (`…/nectar_heads/in`) and b = `bits`: nodes
    `p/heads/Split`, `p/head{i}/MatMulNBits{b}`, `p/heads/Concat`; weights `<w>.head{i}.q{b}` with
    `.scales` and `.zero_points`, stored once per weight (`done_weights`) however many MatMuls read it."""
    h, k, n = w.shape
    block = max(16, min(block, 1 << (k.bit_length() - 1)))
    base_name = node.name.rsplit("/", 1)[0] if node.name else node.output[0]
    if node.input[1] not in done_weights:
        done_weights.add(node.input[1])
        for i in range(h):
            packed, scales, zeros = quantize_blockwise(w[i], bits, block=block, pad=True)
            base = f"{node.input[1]}.head{i}.q{bits}"
            proto.graph.initializer.extend([numpy_helper.from_array(packed, base), numpy_helper.from_array(scales, f"{base}.scales"),
                                            numpy_helper.from_array(zeros, f"{base}.zero_points")])
    if h == 1:
        return [_nbits(node.input[0], f"{node.input[1]}.head0.q{bits}", True, list(node.output),
                       f"{base_name}/head0/MatMulNBits{bits}", k, n, bits, accuracy_level, block)]
    parts = [f"{base_name}/heads/Split/output_{i}" for i in range(h)]
    ones = _const(proto, f"/quantize/const/ones_{h}", np.ones(h, np.int64))
    out = [helper.make_node("Split", [node.input[0], ones], parts, name=f"{base_name}/heads/Split", axis=1)]
    ys = [f"{base_name}/head{i}/MatMulNBits{bits}/output_0" for i in range(h)]
    out += [_nbits(parts[i], f"{node.input[1]}.head{i}.q{bits}", True, [ys[i]], f"{base_name}/head{i}/MatMulNBits{bits}", k, n,
                   bits, accuracy_level, block) for i in range(h)]
    out.append(helper.make_node("Concat", ys, list(node.output), name=f"{base_name}/heads/Concat", axis=1))
    return out


def _nbits(x, base, with_zero, outputs, name, k, n, bits, accuracy_level, block: int = BLOCK):
    inputs = [x, base, f"{base}.scales"] + ([f"{base}.zero_points"] if with_zero else [])
    return helper.make_node("MatMulNBits", inputs, outputs, name=name, domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)


def _const(proto, name: str, value: np.ndarray) -> str:
    if not any(t.name == name for t in proto.graph.initializer):
        proto.graph.initializer.append(numpy_helper.from_array(value, name))
    return name
