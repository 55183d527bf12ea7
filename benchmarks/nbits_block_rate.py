"""What the block size costs ORT's 8-bit `MatMulNBits` (accuracy level 4) at Nectar-heads shapes on this
CPU: chains of 30 square K × K matmuls (random weights), 1 and 3 activation rows (a KV head serves its
G = 3 query heads), blocks of 32, 64 and 128 inputs, timed round-robin (`--rounds` rounds of 60 runs each).

    python benchmarks/nbits_block_rate.py [--k 640] [--threads 2] [--rounds 15]

Writes benchmarks/results/nbits_block_rate.json and prints the medians (docs/benchmarks.md, "Larger
blocks for the 8-bit heads").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LENGTH = 30


def chain(k: int, rows: int, block: int, threads: int, seed: int = 0):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from nectar_export.export.graph_builder import portable_model

    from nectar_export.export.quantize import quantize_blockwise

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(LENGTH):
        w = (rng.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
        packed, scales, zeros = quantize_blockwise(w, 8, block=block, pad=True)
        b = f"w{i}"
        inits += [numpy_helper.from_array(packed, b), numpy_helper.from_array(scales, b + ".s"), numpy_helper.from_array(zeros, b + ".z")]
        nodes.append(helper.make_node("MatMulNBits", [x, b, b + ".s", b + ".z"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=k, bits=8, block_size=block, accuracy_level=4))
        x = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, rows, k])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    m = portable_model(g, [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    configs = [(rows, block) for rows in (1, 3) for block in (32, 64, 128)]
    sessions = {c: chain(a.k, *c, a.threads) for c in configs}
    times: dict = {c: [] for c in configs}
    for _ in range(a.rounds):
        for c, s in sessions.items():
            x = np.random.default_rng(1).standard_normal((1, 1, c[0], a.k)).astype(np.float32) * 0.1
            for _ in range(5):
                s.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(60):
                s.run(None, {"x": x})
            times[c].append((time.perf_counter() - t) / 60 * 1e3)
    rows = [{"rows": r, "block": b, "ms_per_chain_median": statistics.median(times[(r, b)]), "runs_ms": times[(r, b)]}
            for r, b in configs]
    cmd = "python benchmarks/nbits_block_rate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd.strip(), "date": time.strftime("%Y-%m-%d"), "k": a.k, "chain": LENGTH, "threads": a.threads, "rows": rows}
    (REPO / "benchmarks" / "results" / "nbits_block_rate.json").write_text(json.dumps(out, indent=1) + "\n")
    for r in rows:
        print(f"{r['rows']} row(s), blocks of {r['block']:3d}: {r['ms_per_chain_median']:.3f} ms per chain of {LENGTH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
