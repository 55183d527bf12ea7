"""Weight-only quantization of a decoder graph: 2-D weight MatMuls -> `MatMulNBits` (ONNX Runtime's
com.microsoft op; CPU, CUDA and DirectML kernels). Block-wise (32 inputs per block; 16 where a GGUF
Q6_K grid is kept), asymmetric (8-bit weights whose zero points are all 128, such as Q8_0, leave
them out: MatMulNBits' default, its symmetric kernel).

    int4        transformer matmuls at 4 bits, the LM head at 8 bits (the GGUF, too, keeps its tied
                embedding at Q8_0), reproducing a GGUF Q4_1 weight (w = d·q + m per block of 32
                inputs): it lies exactly on the grid (q − z)·s with the float zero point z = −m/d,
                so the bundle keeps the very 4-bit codes llama.cpp runs. ORT's fast kernel takes
                only integer zero points (float ones run ~25× slower), so the codes get the
                nearest integer z', and what z' misses, R[b, n] = s·(z' − z) per block b, is applied
                to the input's block sums inside the same matmul: x·W = MatMulNBits(x_aug) with
                x_aug = [x, x·Bd, x·Bd] (Bd: the block indicator) and R at 8 bits as two extra
                4-bit digits per block sum. The 8-bit grid moves a weight by ≤ 1/510 of R's range
                over 32 block sums (about one Q4_1 step), 16× finer than int8's rounding
    int4-rtn    round-to-nearest with integer zero points: ORT's fastest path (98.5 vs 89.1 tok/s
                for int4 at n = 7,000 on the 2-core CPU, docs/benchmarks.md "Bundles on ONNX Runtime"), but for weights that are already 4-bit (a Q4_1 GGUF) a
                second rounding, with a visible quality cost (docs/results.md)
    int8        every 2-D matmul at 8 bits (integer zero points: within half a step of a Q4_1
                grid point, 1/32 of a Q4_1 step)

With a GGUF base model the exporter passes the file's own grids (`grids`: codes, scales, zero points
per block; nectar_models/gguf_grids.py) and each weight keeps them where the kind allows
(`weight_form`): int4 writes 4-bit types (Q4_0; Q4_1 and Q4_K through the block-sum digits above) at
4 bits and 5- to 8-bit types (Q5_0, Q6_K in blocks of 16, Q8_0) at 8 bits, all exactly (up to the
digits' 8-bit grid), and rounds the 5-bit float-zero-point types (Q5_1, Q5_K) to 8 bits, not 4; int8
keeps the types with integer zero points (Q4_0, Q5_0, Q6_K, Q8_0) and rounds Q4_1/Q4_K; int4-rtn
keeps only integer-zero-point grids that fit its bits (the LM head's at 8). So an int4 bundle of
Gemma 3 270M's Q4_K_M file computes with the weights llama.cpp runs instead of rounding
Q5_0/Q6_K/Q8_0 weights to 4 bits (export check top-1 0.62, KL 0.37 before; docs/onnx.md). Weights
without a grid (safetensors sources, other GGUF types) are rounded from their floats as above.

Nectar MLP heads (the `[Hkv, K, N]` weights `…nectar_heads.{wa,w2,w3}`, applied to queries grouped
`[B, Hkv, G*T, K]`) go to 8 bits in every kind when a weight holds at least `heads_min_bytes` of
fp32 — but not the score network's `…{w2,w3}_lse`, whose log-normalizer g moves the merge weight of
every output dimension at once (its output column carried most of an int4 bundle's KL to fp32 at 8
bits) and which is small (a quarter of the target network's width, at least 16; its first layer is
part of `wa`); the threshold is the exporter's bundle.HEADS_MIN_BYTES.
Each such weight becomes one `MatMulNBits` per KV head between a Split and a Concat over the head
axis (ORT's kernel takes 2-D weights only; a single KV head needs neither), in blocks of
`heads_block` inputs (the exporter's: bundle.HEADS_BLOCK = 128; ORT's int8 kernel runs several query
rows much faster with larger blocks than with blocks of 32). At the default budget the heads hold
tens of MB of fp32 weights, read in full at every token; 8 bits keep their rounding (~1/255 of a
block's range) far below the heads' own ~0.15 relative error. Smaller weights stay one fp32 MatMul:
there the Hkv + 2 nodes cost more than the bytes saved. K need not be a multiple of the block: the
last block's weight rows are zero-padded (ORT reads only K inputs). Baked KV, retained KV and
(standard graph form) the RoPE rotation matrix stay as they are. `accuracy_level` 4 lets ORT's CPU
kernels quantize activations to int8 per block and use integer dot products.
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

BLOCK = 32


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
    if not float_zero:  # an integer zero point must be a code: the range takes in 0
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = (hi - lo) / levels
    scale = np.where(scale > 0, scale, 1.0)  # an all-zero block (or constant, float zero): any scale, q = 0, z = −lo/s
    if bits not in (4, 8) or (float_zero and bits != 4):
        raise ValueError("bits must be 4 or 8; float zero points only at 4 bits")
    zero = -lo / scale
    if not float_zero:  # integer zero point: the grid shifts by < half a step
        zero = np.clip(np.rint(zero), 0, levels)
    q = np.clip(np.rint(wb / scale[..., None] + zero[..., None]), 0, levels).astype(np.uint8)
    scale = scale.astype(np.float32).ravel()
    if bits == 8:
        return np.ascontiguousarray(q), scale, zero.astype(np.uint8).ravel()
    packed = _pack_codes(q)
    if float_zero:
        return packed, scale, zero.astype(np.float32).ravel()
    return packed, scale, _pack_nibbles(zero.astype(np.uint8))


def _pack_codes(q: np.ndarray) -> np.ndarray:
    """4-bit codes [N, blocks, block] (0..15) -> [N, blocks, block/2] uint8, low nibble first."""
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def _pack_nibbles(z: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, K/block] uint8 -> [N * ceil(K/block / 2)], two per byte, low nibble first."""
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray(z[:, 0::2] | (z[:, 1::2] << 4)).ravel()


def _augment_with_block_sums(proto, x: str, k: int, name: str, augmented: dict) -> list:
    """x [.., K] -> x_aug = Concat(x, S, S) [.., K + 64·nb], recorded in `augmented[x]` as
    (name, K + 64·nb): S = x @ Bd, Bd [K, 32·nb] the block indicator zero-padded to nb whole blocks
    of 32 (nb = ceil(K/32 / 32)), so x_aug carries x's K/32 block sums once per 4-bit digit of the
    zero-point residual (_q4_1_with_residual_digits). Shared by the matmuls reading x; nodes
    `{name}/blocksum/MatMul` and `{name}/augment/Concat`."""
    kb = k // BLOCK
    nb = -(-kb // BLOCK)
    ind = np.zeros((k, nb * BLOCK), np.float32)
    ind[np.arange(k), np.arange(k) // BLOCK] = 1.0
    bd = _const(proto, f"/quantize/const/block_sums_{k}", ind)
    sums = helper.make_node("MatMul", [x, bd], [f"{name}/blocksum/output_0"], name=f"{name}/blocksum/MatMul")
    cat = helper.make_node("Concat", [x, sums.output[0], sums.output[0]], [f"{name}/augment/output_0"],
                           name=f"{name}/augment/Concat", axis=-1)
    augmented[x] = (cat.output[0], k + 2 * nb * BLOCK)
    return [sums, cat]


def _q4_1_with_residual_digits(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, n: int, base: str) -> list:
    """A Q4_1 or Q4_K weight on its exact float-zero-point grid (`packed` [N, K/32, 16], `scales`, `zeros`
    fp32 [N·K/32]) -> MatMulNBits-4 initializers `base`, `.scales`, `.zero_points` over K + 64·nb
    inputs (see _augment_with_block_sums). The first K/32 blocks hold the 4-bit codes as they are
    with the nearest integer zero point z' (ORT's fast kernel); what z' misses per block,
    R[b, n] = s·(z' − z), multiplies block sum b of the input. R is quantized to 8 bits per
    32 block sums, R ≈ s8·(Q − Z), and its codes split into two 4-bit digits, Q = 16·Qh + Ql,
    Z = 16·Zh + Zl: R = 16·s8·(Qh − Zh) + s8·(Ql − Zl), i.e. 2·nb more blocks of the same
    4-bit matmul, exact up to the 8-bit grid (≤ 1/510 of R's range over 32 block sums)."""
    kb = k // BLOCK
    z = np.clip(np.rint(zeros), 0, 15).reshape(n, kb)  # ORT's fast kernel takes integer zero points only
    residual = np.ascontiguousarray((scales.reshape(n, kb) * (z - zeros.reshape(n, kb))).T, np.float32)  # [K/32, N]
    q8, s8, z8 = quantize_blockwise(residual, 8, block=BLOCK, pad=True)  # [N, nb, 32], [N·nb], [N·nb]
    nb = q8.shape[1]
    blocks = np.concatenate([packed, _pack_codes(q8 >> 4), _pack_codes(q8 & 15)], axis=1)
    s8 = s8.reshape(n, nb)
    all_scales = np.concatenate([scales.reshape(n, kb), 16 * s8, s8], axis=1).astype(np.float32)
    z8 = z8.reshape(n, nb)
    all_zeros = np.concatenate([z.astype(np.uint8), z8 >> 4, z8 & 15], axis=1)
    return [numpy_helper.from_array(np.ascontiguousarray(blocks), base),
            numpy_helper.from_array(all_scales.ravel(), f"{base}.scales"),
            numpy_helper.from_array(_pack_nibbles(all_zeros), f"{base}.zero_points")]


def weight_form(kind: str, grid, lm_head: bool) -> tuple[int, str]:
    """(bits, form) of a 2-D model weight in a `kind` bundle; `grid`: its GGUF quantization grid or None.

    Bits: int8 8; int4-rtn 4 (the LM head 8); int4 the grid's own (4 for 4-bit GGUF types, 8 for
    Q5_0, Q5_1, Q5_K, Q6_K, Q8_0 and stacks holding any of them; the LM head at least 8), else 4
    (the LM head 8). Forms:
      grid          the GGUF's codes, scales and integer zero points as they are (exact)
      grid-offsets  the GGUF's 4-bit codes, their float zero points through block-sum digits (int4)
      offsets       4-bit min/max blocks with float zero points through block-sum digits (int4; exact
                    for a Q4_1 weight read back from floats)
      rtn           min/max blocks, integer zero points
    """
    bits = 8 if kind == "int8" or lm_head else 4
    if kind == "int4" and grid is not None:
        # the LM head stays >= 8 bits: a tied embedding is looked up in its 8-bit weights (no float table)
        bits = max(grid.bits, 8) if lm_head else grid.bits
    if grid is not None and grid.integer_zero and grid.bits <= bits:
        return bits, "grid"
    if kind == "int4" and bits == 4:
        return bits, "grid-offsets" if grid is not None and grid.block == BLOCK else "offsets"
    return bits, "rtn"


def _heads_weight_sizing(w, inits: dict, heads_lse: bool):
    """The initializer whose size decides whether heads weight `w` is quantized: `w` itself, except for
    the score network's (`…w2_lse`, `…w3_lse`): the target network's `…w2` / `…w3` with `heads_lse`
    (quantized as those are), else None (kept fp32)."""
    if w is None or not w.name.endswith("_lse"):
        return w
    return inits.get(w.name.removesuffix("_lse")) if heads_lse else None


def _grid_is_weight(grid, w: np.ndarray) -> bool:
    """Whether `grid` ([N, K]) dequantizes to the graph's weight `w` ([K, N]) within float32 rounding."""
    return bool(np.abs(grid.dequantize().T - w).max() <= 1e-5 * max(float(np.abs(w).max()), 1e-30))


def _grid_initializers(grid, bits: int):
    """A grid with integer zero points -> (codes, scales, zero points, block) as MatMulNBits-`bits` takes them."""
    zero = np.rint(grid.zero).astype(np.uint8)
    if bits == 4:
        return _pack_codes(grid.codes), grid.scale.ravel(), _pack_nibbles(zero), grid.block
    return np.ascontiguousarray(grid.codes), grid.scale.ravel(), zero.ravel(), grid.block


def quantize_graph(proto, kind: str, accuracy_level: int = 4, heads: bool = True, *, heads_min_bytes: int,
                   heads_bits: int = 8, heads_block: int = BLOCK, heads_lse: bool = False, grids: dict | None = None,
                   sources: dict | None = None) -> dict:
    """Replace 2-D weight MatMuls of `proto` in place, and the Nectar heads' batched ones of at
    least `heads_min_bytes` fp32 bytes (per KV head, `heads_bits` bits) except the score network's
    (`…nectar_heads.{w2,w3}_lse`: fp32 unless `heads_lse`, then as `…w2` / `…w3`); returns {node
    name: bits}. `grids`: {weight name: QuantGrid} of a GGUF source (from_model.decoder_grids), kept
    exactly where the kind allows (weight_form); `sources`, when given, gets {weight name: GGUF type}.

    int4: x @ W = MatMulNBits-4(x_aug) with x_aug = [x, block sums of x] (one Concat per input,
    shared by the matmuls reading it): the 4-bit codes with integer zero points, then the zero
    points' per-block residual as two 4-bit digits per block sum (_q4_1_with_residual_digits).
    """
    if kind not in KINDS:
        raise ValueError(kind)
    inits = {t.name: t for t in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    done, new_nodes, drop, augmented, eight_bit, head_weights = {}, [], set(), {}, {}, set()
    for node in proto.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        sized = _heads_weight_sizing(w, inits, heads_lse)
        if heads and sized is not None and len(w.dims) == 3 and ".nectar_heads." in w.name \
                and 4 * int(np.prod(sized.dims)) >= heads_min_bytes:
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
        k, n = w.dims
        w_array = numpy_helper.to_array(w).astype(np.float32)
        grid = (grids or {}).get(w.name)
        if grid is not None and grid.shape != (n, k):
            raise ValueError(f"{w.name}: grid of shape {grid.shape}, weight [K, N] = [{k}, {n}]")
        if grid is not None and not _grid_is_weight(grid, w_array):
            grid = None  # the graph's weight is not the GGUF's (a transform the grid reader missed): round it
        bits, form = weight_form(kind, grid, "lm_head" in node.name)
        base, name = f"{w.name}.q{bits}", node.name.replace("/MatMul", f"/MatMulNBits{bits}")
        block = BLOCK
        if form == "grid":  # the source's codes with integer zero points, as they are
            packed, scales, zeros, block = _grid_initializers(grid, bits)
        elif form == "grid-offsets":
            packed, scales, zeros = _pack_codes(grid.codes), grid.scale.ravel(), grid.zero.ravel()
        else:
            packed, scales, zeros = quantize_blockwise(w_array, bits, float_zero=form == "offsets")
        if grid is not None and form.startswith("grid") and sources is not None:
            sources[w.name] = grid.source
        if form in ("offsets", "grid-offsets"):  # x_aug = [x, block sums of x]: shared by the matmuls reading x
            if node.input[0] not in augmented:
                new_nodes += _augment_with_block_sums(proto, node.input[0], k, name, augmented)
            x_aug, k_aug = augmented[node.input[0]]
            proto.graph.initializer.extend(_q4_1_with_residual_digits(packed, scales, zeros, k, n, base))
            new_nodes.append(_nbits(x_aug, base, True, list(node.output), name, k_aug, n, bits, accuracy_level))
        else:
            # 8-bit zero points all at MatMulNBits' default (128: Q8_0, symmetric grids) are left out: ORT then
            # runs its symmetric kernel, which reads no zero points (same outputs; a one-node check at the SmolLM2 LM
            # head's shape, random codes: 1.55 -> 1.43 ms)
            symmetric = bits == 8 and bool(np.all(zeros == 128))
            proto.graph.initializer.extend([numpy_helper.from_array(packed, base), numpy_helper.from_array(scales, f"{base}.scales")]
                                           + ([] if symmetric else [numpy_helper.from_array(zeros, f"{base}.zero_points")]))
            if bits == 8:
                eight_bit[w.name] = (base, k, n, scales, zeros, block)
            new_nodes.append(_nbits(node.input[0], base, not symmetric, list(node.output), name, k, n, bits, accuracy_level, block))
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
    `GatherBlockQuantized(q8 [V, H/B, B], ids) -> Reshape [B, T, H]` (B: the LM head's block, 32 or a
    GGUF Q6_K grid's 16) on the LM head's own packed
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
        base, k, n, scales, zeros, block = eight_bit[node.input[0]]
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
