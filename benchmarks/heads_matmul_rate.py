"""What one 8-bit `MatMulNBits` costs on this CPU at the shapes of Nectar heads (ONNX Runtime, CPU).

Two measurements, each a chain of matmuls in one graph, timed over `--repeats` runs after warm-up:
  * fixed cost per call: a chain of 270 tiny 64 × 64 matmuls (one token of a SmolLM2 bundle has 270
    heads calls), 8-bit `MatMulNBits` against fp32 `MatMul`;
  * weight rate: chains of 30 square K × K matmuls (K = 608, 761: the widest default-budget heads of
    a 7,000-token document, plain and block-diagonal), with 1 and 3 activation rows (a KV head serves
    its G = 3 query heads), in GB/s of weights read;
  * break-even (`--break-even`): a whole heads matmul as the exporter writes it — one batched fp32
    `MatMul` of x [1, 3, 3, K] by w [3, K, K] against the quantizer's Split → 3 × 8-bit
    `MatMulNBits` → Concat — in chains of 30 (one per layer), K = 64 … 768, to place
    `nectar_export.export.bundle.HEADS_MIN_BYTES` (below it a heads weight stays fp32).

    python benchmarks/heads_matmul_rate.py [--threads 2] [--break-even [--heads-block 128 --out PATH]]

Writes benchmarks/results/heads_matmul_rate.json (`--break-even`: heads_break_even.json beside it) and
prints a table (docs/benchmarks.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def chain(kind: str, k: int, rows: int, length: int, rng):
    """A graph x [1, 1, rows, k] -> `length` k × k matmuls in a row ('nbits': 8-bit MatMulNBits)."""
    from onnx import TensorProto, helper, numpy_helper
    from nectar_export.export.graph_builder import portable_model

    from nectar_export.export.quantize import quantize_blockwise

    nodes, inits, x = [], [], "x"
    for i in range(length):
        w = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
        if kind == "nbits":
            packed, scales, zeros = quantize_blockwise(w, 8, pad=True)
            b = f"w{i}"
            inits += [numpy_helper.from_array(packed, b), numpy_helper.from_array(scales, b + ".s"),
                      numpy_helper.from_array(zeros, b + ".z")]
            nodes.append(helper.make_node("MatMulNBits", [x, b, b + ".s", b + ".z"], [f"y{i}"], domain="com.microsoft",
                                          K=k, N=k, bits=8, block_size=32, accuracy_level=4))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"]))
        x = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, rows, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return portable_model(g, [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def heads_chain(k: int, quantized: bool, rng, hkv: int = 3, rows: int = 3, length: int = 30, block: int = 32):
    """30 layers' worth of one heads matmul, x [1, hkv, rows, k] @ w [hkv, k, k], as exported
    (`quantized`: through quantize_graph, i.e. Split → per-head MatMulNBits-8 in blocks of `block` → Concat)."""
    from onnx import TensorProto, helper, numpy_helper
    from nectar_export.export.graph_builder import portable_model

    from nectar_export.export.quantize import quantize_graph

    nodes, inits, x = [], [], "x"
    for i in range(length):
        w = (rng.standard_normal((hkv, k, k)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"model.layers.{i}.nectar_heads.w2"))
        nodes.append(helper.make_node("MatMul", [x, f"model.layers.{i}.nectar_heads.w2"], [f"y{i}"],
                                      name=f"/model/layers.{i}/attn/nectar_heads/mid/MatMul"))
        x = f"y{i}"
    g = helper.make_graph(nodes, "heads", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hkv, rows, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    m = portable_model(g, [helper.make_opsetid("", 17)])
    if quantized:
        quantize_graph(m, "int8", heads_min_bytes=0, heads_block=block)
    return m


def time_ms(model, rows: int, k: int, threads: int, repeats: int, rng, hkv: int = 1) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, hkv, rows, k)).astype(np.float32)
    for _ in range(20):
        sess.run(None, {"x": x})
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return 1000 * float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--break-even", action="store_true", help="only the fp32 vs 8-bit heads break-even")
    ap.add_argument("--heads-block", type=int, default=32, help="--break-even: the 8-bit heads' block (the exporter's: 128)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "heads_matmul_rate.json"))
    a = ap.parse_args(argv)
    import onnxruntime

    rng = np.random.default_rng(0)
    if a.break_even:
        return break_even(a, rng)
    rows_out = []
    for kind in ("nbits", "fp32"):
        ms = time_ms(chain(kind, 64, 3, 270, rng), 3, 64, a.threads, a.repeats, rng)
        rows_out.append({"what": "fixed cost", "kind": kind, "k": 64, "rows": 3, "calls": 270, "ms": ms, "us_per_call": 1000 * ms / 270})
    for k in (608, 761):
        for rows in (1, 3):
            for kind in ("nbits", "fp32"):
                ms = time_ms(chain(kind, k, rows, 30, rng), rows, k, a.threads, a.repeats // 2, rng)
                nbytes = 30 * k * k * (1 if kind == "nbits" else 4)
                rows_out.append({"what": "weight rate", "kind": kind, "k": k, "rows": rows, "calls": 30, "ms": ms,
                                 "weight_gb_per_s": nbytes / (ms / 1000) / 1e9})
    report = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "onnxruntime": onnxruntime.__version__, "rows": rows_out}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print("| measurement | kind | K | rows | ms | µs per call | weight GB/s |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['what']} | {r['kind']} | {r['k']} | {r['rows']} | {r['ms']:.2f} | {r.get('us_per_call', float('nan')):.2f} | "
              f"{r.get('weight_gb_per_s', float('nan')):.1f} |")
    return 0


def break_even(a, rng) -> int:
    """fp32 vs 8-bit heads matmuls per layer, median of 5 alternating passes (the machine is noisy)."""
    import onnxruntime

    from nectar_export.export.bundle import HEADS_MIN_BYTES

    out = Path(a.out).with_name("heads_break_even.json") if a.out.endswith("heads_matmul_rate.json") else Path(a.out)
    rows_out = []
    for k in (64, 128, 192, 256, 320, 384, 512, 768):
        models = {q: heads_chain(k, q, rng, block=a.heads_block) for q in (False, True)}
        ms = {False: [], True: []}
        for _ in range(5):
            for q, m in models.items():
                ms[q].append(time_ms(m, 3, k, a.threads, a.repeats // 2, rng, hkv=3))
        f, e = float(np.median(ms[False])), float(np.median(ms[True]))
        rows_out.append({"k": k, "fp32_bytes_per_weight": 3 * k * k * 4, "fp32_us_per_layer": 1000 * f / 30,
                         "int8_us_per_layer": 1000 * e / 30, "ratio_int8_to_fp32": e / f})
    report = {"date": time.strftime("%Y-%m-%d"), "threads": a.threads, "onnxruntime": onnxruntime.__version__,
              "heads_min_bytes": HEADS_MIN_BYTES, "heads_block": a.heads_block, "rows": rows_out}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}\n| K | fp32 KB per weight | fp32 µs per layer | 8-bit µs per layer | 8-bit / fp32 |\n|---:|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['k']} | {r['fp32_bytes_per_weight'] / 1e3:.0f} | {r['fp32_us_per_layer']:.1f} | {r['int8_us_per_layer']:.1f} | "
              f"{r['ratio_int8_to_fp32']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
