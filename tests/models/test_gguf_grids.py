"""GGUF quantization grids: each decoder against gguf's own dequantization on fresh random blocks,
the stacking rules, and both real GGUF files against the weights the loader dequantizes."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from nectar_models.gguf_grids import DECODERS, QuantGrid, concat_rows, decode_grid

# byte offsets of each type's fp16 fields (random bytes there could be NaN or inf)
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_K": [0, 2],
              "Q6_K": [208]}


def _random_tensor(type_name: str, n: int, k: int, rng, flat_every: int = 0) -> np.ndarray:
    """Raw bytes of an [n, k] tensor: random codes and scale bytes, finite fp16 scales (every
    `flat_every`-th block with d = 0: a constant block)."""
    per, nbytes, _, _ = DECODERS[type_name]
    blocks = rng.integers(0, 256, (n * k // per, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[type_name]:
        d = (rng.standard_normal(len(blocks)) * 0.02).astype(np.float16)
        if flat_every and off == F16_FIELDS[type_name][0]:
            d[::flat_every] = 0
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.ravel()


def _gguf_dequantize(raw: np.ndarray, type_name: str, n: int, k: int) -> np.ndarray:
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(raw.reshape(n, -1), GGMLQuantizationType[type_name]).reshape(n, k)


@pytest.mark.parametrize("type_name", sorted(DECODERS))
@pytest.mark.parametrize("flat_every", [0, 3])
def test_grid_is_the_gguf_weight(type_name, flat_every):
    rng = np.random.default_rng([zlib.crc32(type_name.encode()), flat_every])
    n, k = 6, 512
    raw = _random_tensor(type_name, n, k, rng, flat_every)
    grid = decode_grid(raw, type_name, n, k)
    ref = _gguf_dequantize(raw, type_name, n, k)
    assert grid.shape == (n, k) and grid.codes.dtype == np.uint8
    assert grid.codes.max() <= grid.levels and grid.bits == (4 if grid.levels == 15 else 8)
    assert grid.block == (16 if type_name == "Q6_K" else 32)
    np.testing.assert_allclose(grid.dequantize(), ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())
    if type_name in ("Q4_1", "Q4_K", "Q5_1", "Q5_K"):
        assert not grid.integer_zero  # float zero points: int4 applies them through block sums
    else:
        assert grid.integer_zero


def test_a_constant_block_is_exact_with_an_integer_zero_point():
    """A Q4_1 block with d = 0 holds m everywhere: stored as scale |m|/7, zero 7, codes 0 or 14."""
    rng = np.random.default_rng(5)
    raw = _random_tensor("Q4_1", 2, 64, rng).reshape(4, 20)
    raw[1, :2] = np.array([0], np.float16).view(np.uint8)
    raw[1, 2:4] = np.array([-0.3], np.float16).view(np.uint8)
    raw[2, :4] = 0  # d = m = 0
    grid = decode_grid(raw.ravel(), "Q4_1", 2, 64)
    np.testing.assert_allclose(grid.dequantize(), _gguf_dequantize(raw.ravel(), "Q4_1", 2, 64), rtol=1e-6)
    assert grid.zero[0, 1] == 7 and set(grid.codes[0, 1].tolist()) == {0} and grid.zero[1, 0] == 7
    assert np.isfinite(grid.scale).all() and (grid.scale != 0).all()


def _grid(type_name: str, n: int, k: int, seed: int) -> QuantGrid:
    return decode_grid(_random_tensor(type_name, n, k, np.random.default_rng(seed)), type_name, n, k)


def test_stacked_grids():
    q, v = _grid("Q5_0", 4, 256, 1), _grid("Q6_K", 2, 256, 2)
    qv = concat_rows([q, v])  # integer zero points: blocks of 16, 8-bit codes
    assert qv.block == 16 and qv.bits == 8 and qv.source == "Q5_0+Q6_K"
    np.testing.assert_array_equal(qv.dequantize(), np.concatenate([q.dequantize(), v.dequantize()]))
    a, b = _grid("Q4_1", 3, 256, 3), _grid("Q4_K", 2, 256, 4)
    assert concat_rows([a, b]).bits == 4  # float zero points, all 4-bit, blocks of 32
    av = concat_rows([a, v])  # a float zero point and 6-bit codes: a true grid, which no integer-zero MatMulNBits holds
    assert av.bits == 8 and av.block == 16 and not av.integer_zero
    np.testing.assert_array_equal(av.dequantize(), np.concatenate([a.dequantize(), v.dequantize()]))
    assert concat_rows([a, None]) is None  # an unquantized part: the stack is rounded
    assert concat_rows([q, _grid("Q5_0", 2, 512, 5)]) is None  # different input widths
    order = np.array([1, 0, 3, 2])
    np.testing.assert_array_equal(q.rows(order).dequantize(), q.dequantize()[order])


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_gguf_grids_are_the_loaded_weights(which, request):
    """Every 2-D weight of the real files has a grid (SmolLM2: Q4_1 + Q8_0; Gemma 3 270M Q4_K_M:
    Q4_K, Q5_0, Q6_K, Q8_0), and it dequantizes to the weights the torch model holds — after
    llama's q/k row permutation is undone."""
    from nectar_models.loading import load_model, read_gguf_weight_grids

    path = request.getfixturevalue({"smollm2": "smollm2_gguf", "gemma3": "gemma3_gguf"}[which])
    state = load_model(path).model.state_dict()
    grids = read_gguf_weight_grids(path)
    matrices = {k for k, v in state.items() if v.dim() == 2 and k != "lm_head.weight"}
    assert set(grids) == matrices
    for name, grid in grids.items():
        w = state[name].numpy()
        assert np.abs(grid.dequantize() - w).max() <= 1e-6 * np.abs(w).max(), name
    types = {g.source for g in grids.values()}
    assert types == ({"Q4_1", "Q8_0"} if which == "smollm2" else {"Q4_K", "Q5_0", "Q6_K", "Q8_0"})
