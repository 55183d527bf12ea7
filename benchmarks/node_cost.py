"""What one small ONNX Runtime node costs on this CPU: chains of 500 nodes of one kind on a
[1, 3, 3, 64] tensor (the shape of one KV head group's queries in a SmolLM2 decode step), no
graph optimizations, timed per run after warm-up, 1 and 2 intra-op threads.

    python benchmarks/node_cost.py [--repeats 200]

Writes benchmarks/results/node_cost.json and prints a table (docs/benchmarks.md quotes it, section
"Fewer nodes in quantized bundles").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = [1, 3, 3, 64]
KINDS = ("Add", "Reshape", "Transpose", "Softmax", "Split+Concat", "MatMul 64x64")


def chain(kind: str, length: int, rng):
    from onnx import TensorProto, helper, numpy_helper
    from nectar_export.export.graph_builder import portable_model

    nodes, inits, x = [], [], "x"
    for i in range(length):
        y = f"y{i}"
        if kind == "Add":
            inits.append(numpy_helper.from_array(rng.standard_normal(SHAPE).astype(np.float32), f"c{i}"))
            nodes.append(helper.make_node("Add", [x, f"c{i}"], [y]))
        elif kind == "Reshape":
            inits.append(numpy_helper.from_array(np.array(SHAPE, np.int64), f"c{i}"))
            nodes.append(helper.make_node("Reshape", [x, f"c{i}"], [y]))
        elif kind == "Transpose":
            nodes.append(helper.make_node("Transpose", [x], [y], perm=[0, 2, 1, 3]))
        elif kind == "Softmax":
            nodes.append(helper.make_node("Softmax", [x], [y], axis=-1))
        elif kind == "Split+Concat":
            parts = [f"s{i}_{j}" for j in range(3)]
            nodes.append(helper.make_node("Split", [x], parts, axis=1, num_outputs=3))
            nodes.append(helper.make_node("Concat", parts, [y], axis=1))
        else:
            inits.append(numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), f"c{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"c{i}"], [y]))
        x = y
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return portable_model(g, [helper.make_opsetid("", 18)]), len(nodes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "node_cost.json"))
    a = ap.parse_args(argv)
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    rows = []
    for kind in KINDS:
        model, count = chain(kind, a.length, rng)
        row = {"kind": kind, "nodes": count}
        for threads in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for _ in range(20):
                sess.run(None, {"x": x})
            ts = []
            for _ in range(a.repeats):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            row[f"us_per_node_{threads}t"] = 1e6 * float(np.median(ts)) / count
        rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__, "shape": SHAPE, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}\n| node | µs per node, 1 thread | 2 threads |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['us_per_node_1t']:.2f} | {r['us_per_node_2t']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
