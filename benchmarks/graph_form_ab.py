"""A/B of the quantized bundles' graph forms on this CPU: what the ORT-fused ops and the size floor
for 8-bit heads each change in decode time, measured in one process, interleaved.

One artifact (default: the fixed-budget n=512 artifact benchmarks/ort_decode.py leaves in its work
folder), exported once per variant and quantization kind:

    before      standard ops, every heads weight at 8 bits   (ExportConfig(ort_fused=False, heads_min_bytes=0))
    fused       ORT-fused RoPE and residual norms, heads at 8 bits (ort_fused=True, heads_min_bytes=0)
    heads-fp32  standard ops, heads under the size floor fp32 (ort_fused=False, default heads_min_bytes)
    after       both: the exporter's defaults

Each bundle decodes in blocks of `--block` tokens after a 40-token prompt (the first 8 of a block
are not timed), blocks rotating over the bundles for `--rounds` rounds, so that drift of this noisy
machine hits every variant alike; the result is the median ms per token, plus the graph's node
count after ORT's optimizations.

    python benchmarks/graph_form_ab.py [--artifact ART] [--kinds int4,int8] [--rounds 12]

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
    """Markdown table of a report; "paired": per round, the variant's block median over the "before"
    block's of the same round (drift of the machine cancels), median over rounds and how many were faster."""
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
    ap.add_argument("--block", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "graph_form_ab"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "graph_form_ab.json"))
    a = ap.parse_args(argv)
    import onnxruntime

    from nectar_export.export.bundle import ExportConfig, export_onnx_bundle
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.bundle import read_bundle

    work = Path(a.work)
    bundles = {}
    for kind in a.kinds.split(","):
        for name, kw in VARIANTS.items():
            out = work / f"{kind}_{name}"
            print(f"[graph_form_ab] export {out.name}", file=sys.stderr, flush=True)
            export_onnx_bundle(a.artifact, out, ExportConfig(quantize=kind, **kw), log=lambda s: None)
            bundles[(kind, name)] = out
    backends = {}
    for key, path in bundles.items():
        b = read_bundle(path)
        backends[key] = (b, OrtBackend.from_bundle(b, threads=a.threads))
    rng = np.random.default_rng(0)
    times = {key: [] for key in bundles}
    per_round = {key: [] for key in bundles}  # median ms per token of each block: the spread of the noise
    for r in range(a.rounds):
        for key, (b, be) in backends.items():
            block = []
            be.reset(1, 40 + a.block + 1)
            be.step(rng.integers(0, 1000, (1, 40)), np.arange(40)[None] + b.context_len)
            for i in range(a.block):
                t = time.perf_counter()
                be.step(np.array([[5 + i]]), np.array([[40 + i + b.context_len]]))
                if i >= 8:
                    block.append(time.perf_counter() - t)
            times[key] += block
            per_round[key].append(1000 * float(np.median(block)))
        print(f"[graph_form_ab] round {r + 1}/{a.rounds}", file=sys.stderr, flush=True)
    rows = []
    for (kind, name), path in bundles.items():
        m = json.loads((path / "manifest.json").read_text())
        rows.append({"kind": kind, "variant": name, "ort_fused": m["ort_fused"], "heads_min_bytes": m["heads_min_bytes"],
                     "quantize_heads": m["quantize_heads"], "ms_per_token": 1000 * float(np.median(times[(kind, name)])),
                     "ms_per_token_per_round": per_round[(kind, name)],
                     "nodes_after_ort": optimized_nodes(path / "model.onnx", a.threads), "export_check": m["export_check"]})
    art = Path(a.artifact).resolve()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(a.threads), "threads": a.threads,
              "onnxruntime": onnxruntime.__version__, "artifact": str(art.relative_to(REPO)) if art.is_relative_to(REPO) else str(art),
              "rounds": a.rounds, "block": a.block, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {a.out}\n" + table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
