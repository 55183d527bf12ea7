"""The score networks' output column in quantized bundles: fp32 (the exporter's default since 2026-11-25)
against 8 bits inside the heads' output matmul as before (`ExportConfig(quantize_lse=True)`), CPU.

The MLP heads end in one matmul per KV head whose last column is the log-normalizer g(q); its error
moves the merge weight σ(g − lse_loc) of all 64 output dimensions at once. Export checks put most of
an int4 bundle's KL to the fp32 bundle there, so the graph now computes that column by a separate
fp32 MatMul (`…/nectar_heads/lse/MatMul`, weight `…nectar_heads.w3_lse`, docs/onnx.md). Per artifact:
fp32, int4 and int8 bundles with the column fp32 and at 8 bits; fidelity to the fp32 bundle over the
answers to manual questions and round-robin decode time, as gguf_grids_cpu.py measures them.

    python benchmarks/lse_column_cpu.py --artifacts A.nectar,B.nectar [--questions 8] [--repeats 5]

Superseded by score_network_cpu.py: since the score network has its own matmuls (2026-11-25, afternoon),
`quantize_lse=True` rounds its middle weights too and no graph holds the block-diagonal form any more, so a
rerun of this script measures the new form; its record and docs section are that morning's measurement.

Writes benchmarks/results/lse_column_cpu.json, docs/img/lse_column_cpu.png and the section of
docs/benchmarks.md between `<!-- lse_column_cpu:begin -->` and `<!-- lse_column_cpu:end -->`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_grids_cpu  # noqa: E402

VARIANTS = [("fp32", {}),
            ("int4", {"quantize": "int4"}), ("int4_lse-8bit", {"quantize": "int4", "quantize_lse": True}),
            ("int8", {"quantize": "int8"}), ("int8_lse-8bit", {"quantize": "int8", "quantize_lse": True})]

if __name__ == "__main__":
    sys.exit(gguf_grids_cpu.main(variants=VARIANTS, name="lse_column_cpu",
                                 title="The log-normalizer column at fp32 or 8 bits (CPU)", doc=__doc__))
