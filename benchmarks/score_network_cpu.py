"""The MLP heads' score network in its own fp32 matmuls (the exporter since 2026-11-25, late) in quantized
bundles, against the same network at 8 bits (`ExportConfig(quantize_lse=True)`), CPU.

Each KV head's target network f and score network g (a quarter of f's width) used to share one
block-diagonal middle and output matmul, whose zero blocks were stored and read at every token (about
a third of the middle matmul), and of which quantized bundles kept only g's output column fp32
(lse_column_cpu.py). The graph now computes g by its own two matmuls
(`…/nectar_heads/{lse_mid,lse}/MatMul`, weights `…nectar_heads.{w2,w3}_lse`, docs/onnx.md), kept fp32
in every kind: g's error moves the merge weight σ(g − lse_loc) of all output dimensions at once. Per
artifact: fp32, int4 and int8 bundles with the score network's middle and output weights fp32 and at 8 bits (its
first layer shares the input matmul `wa` with the target network); fidelity to the fp32
bundle over the answers to manual questions, size and round-robin decode time, as gguf_grids_cpu.py
measures them.

    python benchmarks/score_network_cpu.py --artifacts A.nectar,B.nectar [--questions 8] [--repeats 5]

Writes benchmarks/results/score_network_cpu.json, docs/img/score_network_cpu.png and the section of
docs/benchmarks.md between `<!-- score_network_cpu:begin -->` and `<!-- score_network_cpu:end -->`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_grids_cpu  # noqa: E402

VARIANTS = [("fp32", {}),
            ("int4", {"quantize": "int4"}), ("int4_score-8bit", {"quantize": "int4", "quantize_lse": True}),
            ("int8", {"quantize": "int8"}), ("int8_score-8bit", {"quantize": "int8", "quantize_lse": True})]

if __name__ == "__main__":
    sys.exit(gguf_grids_cpu.main(variants=VARIANTS, name="score_network_cpu",
                                 title="The score network in its own fp32 matmuls (CPU)", doc=__doc__))
