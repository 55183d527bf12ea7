"""A/B of the quantized bundles' graph forms on this CPU: what the ORT-fused ops and the size floor
for 8-bit heads each change in decode time, measured in one process, interleaved.

One artifact (default: the fixed-budget n=512 artifact benchmarks/ort_decode.py leaves in its work
folder), exported once per variant and quantization kind:

    before      standard ops, every heads weight at 8 bits   (ExportConfig(ort_fused=False, heads_min_bytes=0))
    fused       ORT-fused RoPE and residual norms, heads at 8 bits (ort_fused=True, heads_min_bytes=0)
    heads-fp32  standard ops, heads under the size floor fp32 (ort_fused=False, default heads_min_bytes)
    after       both: the exporter's defaults

The bundles are timed by ort_decode.py's round-robin timer (`time_bundles`: greedy decoding of
`--steps` tokens after its question, one run of every bundle per round, `--rounds` rounds, 2
threads), so that drift of this noisy machine hits every variant alike; the result is the median ms
per token, each round's median (for paired comparisons), and the graph's node count after ORT's
optimizations.

    python benchmarks/graph_form_ab.py [--artifact ART] [--kinds int4,int8] [--rounds 12]

Bundles already in the work folder with the same quantization and graph form are reused.

Writes benchmarks/results/graph_form_ab.json and prints a table (docs/benchmarks.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import machine_info  # noqa: E402
from ort_decode import THREADS, export, time_bundles  # noqa: E402

VARIANTS = {"before": {"ort_fused": False, "heads_min_bytes": 0}, "fused": {"ort_fused": True, "heads_min_bytes": 0},
            "heads-fp32": {"ort_fused": False}, "after": {}}


def optimized_nodes(graph: Path, threads: int) -> int:
    import onnx
    import onnxruntime as ort

    from nectar_runtime.backends.ort_backend import session_options

    with tempfile.TemporaryDirectory() as d:
        so = session_options(threads)
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(str(Path(d) / "opt.onnx"), load_external_data=False).graph.node)


def table(report: dict) -> str:
    """Markdown table of a report; "paired": per round, the variant's run median over the "before"
    run's of the same round (drift of the machine cancels), median over rounds and how many were faster."""
    lines = ["| bundle | graph form | ms/token (median) | vs before | paired: median change, rounds faster | nodes after ORT | "
             "8-bit heads | export check top-1 / KL |", "|---|---|---:|---:|---|---:|---|---|"]
    for r in report["rows"]:
        base = next(x for x in report["rows"] if x["kind"] == r["kind"] and x["variant"] == "before")
        d = np.array(r["ms_per_token_per_round"]) / np.array(base["ms_per_token_per_round"]) - 1
        paired = "—" if r is base else f"{np.median(d):+.1%}, {int((d < 0).sum())} of {len(d)}"
        c = r["export_check"]
        lines.append(f"| {r['kind']} | {r['variant']} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / base['ms_per_token'] - 1:+.1%} | "
                     f"{paired} | {r['nodes_after_ort']} | {'yes' if r['quantize_heads'] else 'no'} | "
                     f"{c['top1_agreement']:.3f} / {c['mean_kl']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=str(REPO / "benchmarks" / "work" / "ort_decode" / "art_512_fixed"))
    ap.add_argument("--kinds", default="int4,int8")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=64, help="greedy tokens per timed run")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "graph_form_ab"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "graph_form_ab.json"))
    a = ap.parse_args(argv)
    import onnxruntime

    def log(msg: str) -> None:
        print(f"[graph_form_ab] {msg}", file=sys.stderr, flush=True)

    work = Path(a.work)
    bundles = {(kind, name): export(Path(a.artifact), work / f"{kind}_{name}", log=log, quantize=kind, **kw)
               for kind in a.kinds.split(",") for name, kw in VARIANTS.items()}
    keys = list(bundles)
    timed = time_bundles([bundles[k] for k in keys], a.steps, a.rounds, log=log)
    results = dict(zip(keys, timed))
    rows = []
    for (kind, name), path in bundles.items():
        m = json.loads((path / "manifest.json").read_text())
        rows.append({"kind": kind, "variant": name, "ort_fused": m["ort_fused"], "heads_min_bytes": m["heads_min_bytes"],
                     "quantize_heads": m["quantize_heads"], "ms_per_token": results[(kind, name)]["ms_per_token_median"],
                     "ms_per_token_per_round": [r["ms_per_token_median"] for r in results[(kind, name)]["runs"]],
                     "nodes_after_ort": optimized_nodes(path / "model.onnx", THREADS), "export_check": m["export_check"]})
    art = Path(a.artifact).resolve()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS), "threads": THREADS,
              "onnxruntime": onnxruntime.__version__, "artifact": str(art.relative_to(REPO)) if art.is_relative_to(REPO) else str(art),
              "rounds": a.rounds, "steps": a.steps, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}\n" + table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
