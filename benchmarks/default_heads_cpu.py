"""Default-size Nectar heads in ONNX bundles on a CPU: fp32 heads against 8-bit heads.

At the default budget (0.24 of the document's fp16 KV) the heads grow with the document: 10.5 M
parameters for grep.txt (n = 4,032), 18.8 M for 7,000 tokens. A decode step reads all of them, so
in a quantized bundle whose transformer weights are 4 bits, fp32 heads can cost more than the model.
This benchmark times, per artifact, the fp32 bundle and the int8 / int4 bundles with the heads at 8
bits (the exporter's default: every heads weight of at least 256 KiB of fp32; smaller ones stay fp32),
at fp32 (`ExportConfig(quantize_heads=False)`, the exporter before 2026-11-23) and, for int4, at 4 bits
(`ExportConfig(heads_bits=4)`), and measures each
quantized bundle's fidelity to the fp32 bundle.

    python benchmarks/default_heads_cpu.py --artifacts A.nectar,B.nectar [--model GGUF]

Artifacts: default `nectar fit` runs (`bash benchmarks/gpu_session.sh fitdefault` fits grep.txt and the
first 7,000 tokens of the manuals on an H100; the heads' decode cost depends on their sizes, their
fidelity on real training). Timing: ort_decode.py's round-robin timer (2 threads, greedy, G tokens
after its question, median of R runs). Fidelity: top-1 agreement and mean KL(fp32 ‖ quantized),
teacher-forced over the fp32 bundle's greedy answers to the first Q questions of the manual the
document starts with (quant_quality.py's functions): quantization error only, the heads are the same.

Writes benchmarks/results/default_heads_cpu.json, docs/img/default_heads_cpu.png and the section of
docs/benchmarks.md between `<!-- default_heads_cpu:begin -->` and `<!-- default_heads_cpu:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import CpuContention, machine_info, write_outputs  # noqa: E402
from ort_decode import THREADS, export, time_bundles  # noqa: E402
from quant_quality import fidelity_to_reference  # noqa: E402

MANUALS = REPO.parent / "shared" / "data" / "manuals"
BEGIN, END = "<!-- default_heads_cpu:begin -->", "<!-- default_heads_cpu:end -->"
# (bundle suffix, ExportConfig fields)
VARIANTS = [("fp32", {}), ("int8", {"quantize": "int8"}), ("int8_heads-fp32", {"quantize": "int8", "quantize_heads": False}),
            ("int4", {"quantize": "int4"}), ("int4_heads-fp32", {"quantize": "int4", "quantize_heads": False}),
            ("int4_heads-4bit", {"quantize": "int4", "heads_bits": 4})]


def log(msg: str) -> None:
    print(f"[default_heads_cpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def manual_of(art: Path) -> Path:
    """The development manual whose text the artifact's document starts with."""
    doc = (art / "document.txt").read_text("utf-8")
    for m in sorted(MANUALS.glob("*.txt")):
        if doc.startswith(m.read_text("utf-8")[:500]):
            return m
    raise SystemExit(f"{art}: its document starts with none of the manuals in {MANUALS}; pass artifacts fitted on them")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arts = [a["name"] for a in report["artifacts"]]
    names = [v for v, _ in VARIANTS]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(names)
    for i, v in enumerate(names):
        ys = [next(r["ms_per_token_median"] for r in report["bundles"] if r["artifact_name"] == a and r["variant"] == v) for a in arts]
        bars = ax.bar([j + i * width for j in range(len(arts))], ys, width, label=v.replace("_", ", "))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arts))],
                  [f"{a['name']} (n={a['n']}, heads {a['params_m']:.1f} M)" for a in report["artifacts"]])
    ax.set_ylabel(f"ms per decode token ({THREADS} threads, median)")
    ax.set_title("Default-budget Nectar bundles on ONNX Runtime (CPU)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def docs_section(report: dict, png_rel: str) -> str:
    m = report["machine"]
    lines = [BEGIN, "## Default-size heads in quantized bundles (CPU decode)", "",
             f"Command: `python benchmarks/default_heads_cpu.py {report['argv']}` — {m['cpu_model']}, {THREADS} threads, "
             f"onnxruntime {report['onnxruntime']}, {report['date']}; {report['steps']} greedy tokens after the question, median of "
             f"{report['repeats']} round-robin runs. Other processes used "
             f"{100 * (report['contention'] or {}).get('other_processes_share_of_cores', 0):.1f}% of the cores during the run. "
             "Artifacts: default `nectar fit` on an H100 (`bash benchmarks/gpu_session.sh fitdefault`). Fidelity: against the "
             f"fp32 bundle, teacher-forced over its greedy answers (≤ {report['max_tokens']} tokens) to the first "
             f"{report['questions']} questions of the manual the document starts with.", "",
             "| document | bundle | heads | bundle MB | ms/token (median) | tok/s | vs fp32 bundle | top-1 vs fp32 | KL(fp32 ‖ q) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in report["artifacts"]:
        rows = [r for r in report["bundles"] if r["artifact_name"] == a["name"]]
        base = next(r for r in rows if r["variant"] == "fp32")
        for r in rows:
            q = r.get("fidelity") or {}
            fid = f"{q['agreement']:.3f} | {q['kl']:.4f}" if q else "(reference) | "
            # "8-bit": the exporter's default, heads weights of >= heads_min_bytes (256 KiB) at 8 bits, smaller ones fp32
            heads = "fp32" if r["variant"] == "fp32" or r["variant"].endswith("heads-fp32") else \
                "4-bit (≥ 256 KiB)" if r["variant"].endswith("heads-4bit") else "8-bit (≥ 256 KiB)"
            lines.append(f"| {a['name']} (n={a['n']}, {a['params_m']:.1f} M head params) | {r['quantize']} | {heads} | "
                         f"{r['bundle_bytes'] / 1e6:.0f} | {r['ms_per_token_median']:.2f} | {r['tokens_per_s']:.1f} | "
                         f"{base['ms_per_token_median'] / r['ms_per_token_median']:.2f}× | {fid} |")
    lines += ["", f"![ms per token]({png_rel})", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True, help="comma-separated artifact directories")
    ap.add_argument("--model", default=None, help="base model (default: the one in each manifest)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "default_heads"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "default_heads_cpu.json"))
    a = ap.parse_args(argv)
    import onnxruntime

    work = Path(a.work)
    arts = [Path(p) for p in a.artifacts.split(",")]
    report = {"date": time.strftime("%Y-%m-%d"), "argv": " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(THREADS), "onnxruntime": onnxruntime.__version__, "steps": a.steps,
              "repeats": a.repeats, "questions": a.questions, "max_tokens": a.max_tokens, "artifacts": [], "bundles": []}
    planned = []
    for art in arts:
        man = json.loads((art / "manifest.json").read_text())
        name = art.name.removesuffix(".nectar")
        report["artifacts"].append({"name": name, "path": str(art), "n": man["document"]["n_tokens"],
                                    "artifact_bytes": man["artifact_bytes"], "widths": man["widths"],
                                    "params_m": man["param_count"] / 1e6, "manual": manual_of(art).name})
        for v, kw in VARIANTS:
            planned.append((name, v, export(art, work / f"{name}_{v}", model=a.model, log=log, **kw)))
    contention = CpuContention()
    log(f"timing {len(planned)} bundles round-robin …")
    for (name, v, _), r in zip(planned, time_bundles([p for _, _, p in planned], a.steps, a.repeats, log)):
        r.update(artifact_name=name, variant=v)
        report["bundles"].append(r)
    report["contention"] = contention.result()
    fidelity_to_reference(report, work, "fp32", a.questions, a.max_tokens, log)
    png = REPO / "docs" / "img" / "default_heads_cpu.png"
    write_outputs(report, Path(a.out), png, plot, docs_section, BEGIN, END, REPO / "docs" / "benchmarks.md")
    log(f"wrote {a.out}, {png}, docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
