"""The quantization grids of a GGUF file's weights: the codes, scales and zero points llama.cpp
stored, before dequantization (loading.read_gguf dequantizes them for torch).

A grid holds a weight exactly as   w[n, b·B + i] = scale[n, b] · (code[n, b, i] − zero[n, b])
for output row n, block b of B inputs. The exporter (nectar_export/export/quantize.py) writes such
a weight into `MatMulNBits` with the very codes the GGUF holds instead of rounding the dequantized
floats a second time: a quantized bundle of a GGUF model then computes with the weights llama.cpp
runs. Types read here, and their grids:

    Q4_0   B = 32, codes 0..15, zero 8                 (w = d·(q − 8))
    Q4_1   B = 32, codes 0..15, zero −m/d (a float)    (w = d·q + m)
    Q4_K   B = 32, codes 0..15, zero dmin·m/(d·sc)     (w = d·sc·q − dmin·m, 6-bit sc, m per 32)
    Q5_0   B = 32, codes 0..31, zero 16                (w = d·(q − 16))
    Q5_1   B = 32, codes 0..31, zero −m/d (a float)    (w = d·q + m)
    Q5_K   B = 32, codes 0..31, zero dmin·m/(d·sc)     (as Q4_K, with a fifth bit per code)
    Q6_K   B = 16, codes 0..63, zero 32                (w = d·sc·(q − 32), int8 sc per 16)
    Q8_0   B = 32, codes 0..255, zero 128              (w = d·q, q int8, stored as q + 128)

Others (F32/F16/BF16, Q2_K, Q3_K, the IQ types, …) have no grid here: the exporter rounds those.
Grids with float zero points and 5-bit codes (Q5_1, Q5_K) fit no integer-zero-point MatMulNBits exactly;
the exporter rounds them to 8 bits (int4 too), never to 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QK_K = 256  # weights per K-quant super-block


@dataclass(frozen=True)
class QuantGrid:
    """codes uint8 [N, K/B, B]; scale, zero fp32 [N, K/B]; `levels`: codes lie in 0..levels."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    levels: int
    source: str  # the GGUF type(s), e.g. "Q4_K" or "Q5_0+Q8_0"

    @property
    def block(self) -> int:
        return self.codes.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K]: the weight as torch holds it (outputs × inputs)."""
        return self.codes.shape[0], self.codes.shape[1] * self.codes.shape[2]

    @property
    def bits(self) -> int:
        """Bits a code needs in MatMulNBits: 4 or 8."""
        return 4 if self.levels <= 15 else 8

    @property
    def integer_zero(self) -> bool:
        """Whether every zero point is an integer code, 0..levels (ORT's fast kernels take integer zero
        points only, stored in the codes' bits)."""
        return bool(np.all((self.zero == np.rint(self.zero)) & (self.zero >= 0) & (self.zero <= self.levels)))

    def dequantize(self) -> np.ndarray:
        """-> [N, K] float32 (computed in float32: within ~1e-7 of the weight, relative)."""
        w = self.scale[..., None] * (self.codes.astype(np.float32) - self.zero[..., None])
        return w.reshape(self.shape)

    def with_block(self, block: int) -> QuantGrid:
        """The same weight in blocks of `block` inputs (a divisor of B): each block splits, exactly."""
        if block == self.block:
            return self
        if self.block % block:
            raise ValueError(f"blocks of {self.block} do not split into blocks of {block}")
        r = self.block // block
        n, nb, _ = self.codes.shape
        return QuantGrid(self.codes.reshape(n, nb * r, block), np.repeat(self.scale, r, axis=1),
                         np.repeat(self.zero, r, axis=1), self.levels, self.source)

    def rows(self, order: np.ndarray) -> QuantGrid:
        """Output rows reordered: row i of the result is row order[i]."""
        return QuantGrid(self.codes[order], self.scale[order], self.zero[order], self.levels, self.source)


def concat_rows(grids: list[QuantGrid | None]) -> QuantGrid | None:
    """Grids of weights stacked along the outputs (q|k|v, gate|up) as one grid, in the smallest block
    and the widest codes (splitting a block is exact); None when a part has no grid or the input
    widths differ. Whether one MatMulNBits holds the stack exactly is the exporter's question
    (quantize.weight_form: integer zero points, or 4-bit float ones in blocks of 32); a stack of
    Q4_K and Q6_K, say, is rounded to 8 bits as a whole rather than to 4."""
    if any(g is None for g in grids) or len({g.shape[1] for g in grids}) != 1:
        return None
    block = min(g.block for g in grids)
    parts = [g.with_block(block) for g in grids]
    sources = "+".join(dict.fromkeys(g.source for g in grids))
    return QuantGrid(np.concatenate([g.codes for g in parts]), np.concatenate([g.scale for g in parts]),
                     np.concatenate([g.zero for g in parts]), max(g.levels for g in grids), sources)


# ---------------------------------------------------------------- per-type decoders
# Each takes the tensor's bytes as [blocks, bytes per block] (one block of 32, or one super-block of
# 256 for the K-quants, per row) and returns codes [blocks, sub, B], scale [blocks, sub] and the
# offset o [blocks, sub] of w = scale·code + o (zero = −o/scale, fixed for zero scales below).


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: elements 0..15 in the low nibbles, 16..31 in the high ones (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles_32(b[:, 2:18])[:, None], d, -8 * d


def _q4_1(b):
    return _nibbles_32(b[:, 4:20])[:, None], _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_0(b):
    d = _f16(b[:, :2])
    high = np.unpackbits(np.ascontiguousarray(b[:, 2:6]), axis=-1, bitorder="little")  # bit i: element i
    return (_nibbles_32(b[:, 6:22]) | (high << 4))[:, None], d, -16 * d


def _q8_0(b):
    d = _f16(b[:, :2])
    return (np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)[:, None], d, -128 * d


def _q5_1(b):
    high = np.unpackbits(np.ascontiguousarray(b[:, 4:8]), axis=-1, bitorder="little")
    return (_nibbles_32(b[:, 8:24]) | (high << 4))[:, None], _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_scales(b):
    """The 6-bit scales and mins of a Q4_K/Q5_K super-block's 8 sub-blocks, packed in 12 bytes -> [n, 8] each."""
    s = b.reshape(b.shape[0], 3, 4)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1).astype(np.float32)
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1).astype(np.float32)
    return sc, m


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)  # bit j: sub-block j
    qs = b[:, 48:176].reshape(n, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32) | ((qh & 1).reshape(n, 8, 32) << 4)
    return codes, d * sc, -(dmin * m)


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 32)  # chunk c: sub-block 2c in the low nibbles, 2c + 1 in the high
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)
    return codes, d * sc, -(dmin * m)  # d, dmin: [n, 1]


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, 8, 32)
    codes = (ql | (qh << 4)).reshape(n, 16, 16)
    scale = _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    return codes, scale, -32 * scale


# name: (weights per block of bytes, bytes per block, levels, decoder)
DECODERS = {
    "Q4_0": (32, 18, 15, _q4_0),
    "Q4_1": (32, 20, 15, _q4_1),
    "Q5_0": (32, 22, 31, _q5_0),
    "Q5_1": (32, 24, 31, _q5_1),
    "Q8_0": (32, 34, 255, _q8_0),
    "Q4_K": (QK_K, 144, 15, _q4_k),
    "Q5_K": (QK_K, 176, 31, _q5_k),
    "Q6_K": (QK_K, 210, 63, _q6_k),
}


def decode_grid(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantGrid | None:
    """A tensor's raw bytes (uint8, N rows of K weights) -> its grid, or None for a type without one."""
    if type_name not in DECODERS:
        return None
    per, nbytes, levels, decode = DECODERS[type_name]
    if k % per or raw.size != n * (k // per) * nbytes:
        raise ValueError(f"{type_name}: {raw.size} bytes do not hold {n} rows of {k} weights")
    codes, scale, offset = decode(np.ascontiguousarray(raw).reshape(n * (k // per), nbytes))
    sub = codes.shape[1]
    codes = codes.reshape(n, (k // per) * sub, -1)
    scale, offset = scale.reshape(n, -1).astype(np.float32), offset.reshape(n, -1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(scale != 0, -offset / np.where(scale != 0, scale, 1), 0).astype(np.float32)
    # A block with scale 0 holds the constant o for every code. Stored as scale |o|/c, zero c and
    # codes c − o/scale (0 or 2c), c = the middle code's floor: exact, and an integer zero point.
    flat = scale == 0
    if flat.any():
        c = levels // 2
        alt = np.where(offset != 0, np.abs(offset) / c, 1.0).astype(np.float32)
        code = np.rint(c + offset / alt).astype(np.uint8)  # c + o/(|o|/c) = 0 or 2c; c when o = 0
        codes = np.where(flat[..., None], code[..., None], codes)
        scale, zero = np.where(flat, alt, scale), np.where(flat, np.float32(c), zero)
    return QuantGrid(np.ascontiguousarray(codes, np.uint8), scale, zero, levels, type_name)


def read_gguf_grids(path: str | Path, names: dict[str, str] | None = None, table: list | None = None) -> dict[str, QuantGrid]:
    """{GGUF tensor name: grid} of every 2-D tensor of `path` whose type has one (`names`: only those,
    renamed to their values; `table`: the file's tensor table if already read). Rows stay in the
    file's order (loading.read_gguf undoes llama's q/k permutation; apply the same order with QuantGrid.rows)."""
    from gguf.constants import GGMLQuantizationType

    from nectar_runtime.gguf_metadata import read_gguf_tensor_table

    if table is None:
        _, table = read_gguf_tensor_table(Path(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for t in table:
        if len(t.dims) != 2 or (names is not None and t.name not in names):
            continue
        grid = decode_grid(data[t.offset: t.offset + t.n_bytes], GGMLQuantizationType(t.ggml_type).name, t.dims[1], t.dims[0])
        if grid is not None:
            out[names[t.name] if names is not None else t.name] = grid
    return out
