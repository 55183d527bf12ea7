"""One layer's Nectar heads packed into two flat tensors, the form the kernel (and a TensorRT
plugin) takes: no module objects, just tensors plus (variant, width).

    heads_w: [Hkv, P_w]  the matrices, in the weight dtype (fp32, bf16 or fp16)
    heads_b: [Hkv, P_b]  biases and standardization statistics, always fp32

Row j is KV head j's module. Layouts, each block stored row-major (D = head dim):

    mlp (width H, HS = score_width(H) = max(16, H // 4)):
      heads_w = w1 [D, H] | w2 [H, H] | w3 [H, D] | skip [D, D] | s1 [D, HS] | s2 [HS, HS] | s3 [HS]
      heads_b = b1 [H] | b2 [H] | b3 [D] | sb1 [HS] | sb2 [HS] | sb3 [1]
                | q_mean [D] | q_std [1] | o_mean [D] | o_std [1] | l_mean [1] | l_std [1]
    quadrature (m nodes):
      heads_w = keys [m, D] | values [m, D]
      heads_b = bias [m]

`layout(variant, width, d)` gives every block's (offset, shape) in both tensors; the kernel
computes the same offsets from (D, H, HS).
"""

from __future__ import annotations


def score_width(width: int) -> int:
    """The score network's width for a target network of `width` (nectar_export.heads builds them so)."""
    return max(16, width // 4)


def _mlp_blocks(width: int, d: int) -> tuple[list, list]:
    """-> ([(name, shape)] of heads_w, the same of heads_b) for an mlp of width H = `width`."""
    h, hs = width, score_width(width)
    w_blocks = [("w1", (d, h)), ("w2", (h, h)), ("w3", (h, d)), ("skip", (d, d)),
                ("s1", (d, hs)), ("s2", (hs, hs)), ("s3", (hs,))]
    b_blocks = [("b1", (h,)), ("b2", (h,)), ("b3", (d,)), ("sb1", (hs,)), ("sb2", (hs,)), ("sb3", (1,)),
                ("q_mean", (d,)), ("q_std", (1,)), ("o_mean", (d,)), ("o_std", (1,)),
                ("l_mean", (1,)), ("l_std", (1,))]
    return w_blocks, b_blocks


def _quadrature_blocks(width: int, d: int) -> tuple[list, list]:
    """-> ([(name, shape)] of heads_w, the same of heads_b) for m = `width` nodes."""
    return [("keys", (width, d)), ("values", (width, d))], [("bias", (width,))]


# variant -> (width, d) -> its blocks, in packing order
_BLOCKS = {"mlp": _mlp_blocks, "quadrature": _quadrature_blocks}


def layout(variant: str, width: int, d: int) -> tuple[dict, dict]:
    """-> ({name: (offset, shape)} for heads_w, the same for heads_b)."""
    if variant not in _BLOCKS:
        raise ValueError(f"variant must be 'mlp' or 'quadrature', got {variant!r}")
    w_blocks, b_blocks = _BLOCKS[variant](width, d)

    def offsets(blocks):
        out, off = {}, 0
        for name, shape in blocks:
            out[name] = (off, shape)
            n = 1
            for s in shape:
                n *= s
            off += n
        return out, off

    (w, _), (b, _) = offsets(w_blocks), offsets(b_blocks)
    return w, b


def packed_sizes(variant: str, width: int, d: int) -> tuple[int, int]:
    """(P_w, P_b)."""
    w, b = layout(variant, width, d)
    end = lambda blocks: max(o + _numel(s) for o, s in blocks.values())
    return end(w), end(b)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unpack(heads_w, heads_b, variant: str, width: int, d: int | None = None) -> dict:
    """Views of the packed tensors: {name: [Hkv, *shape]} (the inverse of `pack_layer`). `d`: the
    head dim when the caller knows it (checked against the sizes), else recovered from them."""
    hkv = heads_w.shape[0]
    if d is None:
        d = _head_dim(heads_w, heads_b, variant, width)
    elif packed_sizes(variant, width, d) != (heads_w.shape[1], heads_b.shape[1]):
        raise ValueError(f"packed heads of shape {tuple(heads_w.shape)}/{tuple(heads_b.shape)} do not match head dim {d} "
                         f"for {variant} width {width}")
    w, b = layout(variant, width, d)
    out = {}
    for src, blocks in ((heads_w, w), (heads_b, b)):
        for name, (off, shape) in blocks.items():
            out[name] = src[:, off : off + _numel(shape)].reshape(hkv, *shape)
    return out


def _head_dim(heads_w, heads_b, variant: str, width: int) -> int:
    """Recover D from the packed sizes (P_w is increasing in D)."""
    for d in range(1, 1025):
        pw, pb = packed_sizes(variant, width, d)
        if pw == heads_w.shape[1] and pb == heads_b.shape[1]:
            return d
    raise ValueError(f"packed heads of shape {tuple(heads_w.shape)}/{tuple(heads_b.shape)} match no head dim for {variant} width {width}")


def _mlp_tensors(grp) -> dict:
    """MLPGroup of M modules -> {block name: [M, *shape]} (the blocks of `_mlp_blocks`)."""
    return {
        "w1": grp.w1, "w2": grp.w2, "w3": grp.w3, "skip": grp.skip, "s1": grp.s1, "s2": grp.s2,
        "s3": grp.s3[..., 0], "b1": grp.b1[:, 0], "b2": grp.b2[:, 0], "b3": grp.b3[:, 0],
        "sb1": grp.sb1[:, 0], "sb2": grp.sb2[:, 0], "sb3": grp.sb3[:, 0],
        "q_mean": grp.q_mean[:, 0], "q_std": grp.q_std[:, 0], "o_mean": grp.o_mean[:, 0],
        "o_std": grp.o_std[:, 0], "l_mean": grp.l_mean, "l_std": grp.l_std,
    }


def _quadrature_tensors(grp) -> dict:
    """QuadratureGroup of M modules -> {block name: [M, *shape]} (the blocks of `_quadrature_blocks`)."""
    return {"keys": grp.keys, "values": grp.values, "bias": grp.bias[:, 0]}


# variant -> group (nectar_export.heads) -> its tensors by block name
_TENSORS = {"mlp": _mlp_tensors, "quadrature": _quadrature_tensors}


def pack_layer(heads, layer: int, dtype=None):
    """NectarHeads (nectar_export.heads) -> (heads_w [Hkv, P_w] in `dtype` (default fp32),
    heads_b [Hkv, P_b] fp32, variant, width) for layer `layer`, on the heads' device."""
    import torch

    spec = heads.spec
    gi, start = heads.layer_slot[layer]
    grp, sel = heads.groups[gi], slice(start, start + spec.kv_heads)
    width, d, hkv = spec.widths[layer], spec.head_dim, spec.kv_heads
    w_lay, b_lay = layout(spec.variant, width, d)
    t = _TENSORS[spec.variant](grp)
    with torch.no_grad():
        parts_w = [t[n][sel].reshape(hkv, -1).float() for n in w_lay]
        parts_b = [t[n][sel].reshape(hkv, -1).float() for n in b_lay]
        heads_w = torch.cat(parts_w, dim=1).to(dtype or torch.float32).contiguous()
        heads_b = torch.cat(parts_b, dim=1).contiguous()
    return heads_w, heads_b, spec.variant, width


def _mlp_random_statistics(heads_b, b_lay: dict, width: int, g, lse_mean: float):
    """heads_b: [Hkv, P_b] random biases -> the same with standardization statistics near fitted ones."""
    import torch

    kv_heads = heads_b.shape[0]
    for name, lo, hi in (("q_std", 0.5, 2.0), ("o_std", 0.05, 0.5), ("l_std", 0.5, 2.0)):
        off = b_lay[name][0]
        heads_b[:, off] = lo + (hi - lo) * torch.rand(kv_heads, generator=g)
    heads_b[:, b_lay["l_mean"][0]] = lse_mean + torch.randn(kv_heads, generator=g)
    return heads_b


def _quadrature_random_statistics(heads_b, b_lay: dict, width: int, g, lse_mean: float):
    """heads_b: [Hkv, m] random node biases -> shifted so that lse ≈ `lse_mean`."""
    import torch

    return heads_b + lse_mean - torch.log(torch.tensor(float(width)))


# variant -> (heads_b, b_lay, width, generator, lse_mean) -> heads_b with its statistics
_RANDOM_STATISTICS = {"mlp": _mlp_random_statistics, "quadrature": _quadrature_random_statistics}


def random_layer(variant: str, width: int, kv_heads: int, d: int, dtype=None, device="cpu", seed: int = 0,
                 lse_mean: float = 8.0):
    """Random packed heads (for tests and latency profiles at shapes without fitted artifacts):
    weights ~ U(±1/sqrt(fan_in)), statistics near what fitted heads hold."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    w_lay, b_lay = layout(variant, width, d)
    pw, pb = packed_sizes(variant, width, d)
    heads_w = torch.empty(kv_heads, pw)
    for name, (off, shape) in w_lay.items():
        fan_in = shape[0] if len(shape) == 2 and name not in ("keys", "values") else d
        n = _numel(shape)
        heads_w[:, off : off + n] = (torch.rand(kv_heads, n, generator=g) * 2 - 1) / fan_in**0.5
    heads_b = 0.1 * torch.randn(kv_heads, pb, generator=g)
    heads_b = _RANDOM_STATISTICS[variant](heads_b, b_lay, width, g, lse_mean)
    return heads_w.to(device=device, dtype=dtype or torch.float32), heads_b.to(device)
