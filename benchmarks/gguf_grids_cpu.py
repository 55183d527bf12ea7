"""Quantized bundles that keep the base GGUF's own codes against bundles that round its dequantized
weights again (CPU): fidelity to the fp32 bundle, size and decode time.

A GGUF holds each weight on a quantization grid (SmolLM2: Q4_1 + a Q8_0 embedding; Gemma 3 270M
Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0). Since 2026-11-25 `nectar export --quantize` writes each weight
from those codes where the kind allows (nectar_export/export/quantize.py `weight_form`; int4: 4-bit
types at 4 bits, the 5/6/8-bit ones at 8) instead of rounding the dequantized floats
(`ExportConfig(source_grids=False)`, the exporter before). Per artifact this exports the fp32 bundle
and int8 / int4 with and without the grids, and int4-rtn; measures each quantized bundle's top-1
agreement and mean KL(fp32 ‖ quantized), teacher-forced over the fp32 bundle's greedy answers to the
first Q questions of the manual the document starts with (quant_quality.py's functions), and times
them round-robin (ort_decode.py's timer: 2 threads, G greedy tokens after its question, median of R runs).

    python benchmarks/gguf_grids_cpu.py --artifacts A.nectar,B.nectar [--questions 8] [--repeats 5]

Writes benchmarks/results/gguf_grids_cpu.json, docs/img/gguf_grids_cpu.png and the section of
docs/benchmarks.md between `<!-- gguf_grids_cpu:begin -->` and `<!-- gguf_grids_cpu:end -->`.
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
from default_heads_cpu import manual_of  # noqa: E402
from ort_decode import THREADS, export, time_bundles  # noqa: E402
from quant_quality import fidelity_to_reference  # noqa: E402

# (bundle suffix, ExportConfig fields)
VARIANTS = [("fp32", {}),
            ("int8", {"quantize": "int8"}), ("int8_rounded", {"quantize": "int8", "source_grids": False}),
            ("int4", {"quantize": "int4"}), ("int4_rounded", {"quantize": "int4", "source_grids": False}),
            ("int4-rtn", {"quantize": "int4-rtn"})]
TITLE = "Quantized bundles on the GGUF's own codes (CPU)"


def log(msg: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def plot(report: dict, path: Path) -> None:
    """Two bar charts per artifact and variant: KL to the fp32 bundle (log scale) and ms per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    arts = [a["name"] for a in report["artifacts"]]
    names = report["variants"][1:]
    width = 0.8 / len(names)
    for ax, key, label in ((axes[0], "kl", "mean KL(fp32 ‖ bundle), log scale"), (axes[1], "ms", "ms per decode token (median)")):
        for i, v in enumerate(names):
            rows = [next(r for r in report["bundles"] if r["artifact_name"] == a and r["variant"] == v) for a in arts]
            ys = [r["fidelity"]["kl"] if key == "kl" else r["ms_per_token_median"] for r in rows]
            bars = ax.bar([j + i * width for j in range(len(arts))], ys, width, label=v.replace("_", ", "))
            ax.bar_label(bars, fmt="%.4f" if key == "kl" else "%.1f", fontsize=6)
        if key == "kl":
            ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arts))], [a["model"] for a in report["artifacts"]])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['title'].removesuffix(' (CPU)')} ({THREADS} CPU threads, ONNX Runtime)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def docs_section(report: dict, png_rel: str) -> str:
    m = report["machine"]
    lines = [report["begin"], f"## {report['title']}", "",
             f"Command: `python benchmarks/{report['script']} {report['argv']}` — {m['cpu_model']}, {THREADS} threads, "
             f"onnxruntime {report['onnxruntime']}, {report['date']}; fidelity against each artifact's fp32 bundle, teacher-forced "
             f"over its greedy answers (≤ {report['max_tokens']} tokens) to the first {report['questions']} questions of the "
             f"manual the document starts with; decode: {report['steps']} greedy tokens after the question, median of "
             f"{report['repeats']} round-robin runs. Other processes used "
             f"{100 * (report['contention'] or {}).get('other_processes_share_of_cores', 0):.1f}% of the cores during the timing.", "",
             "| model (GGUF) | n | bundle | weight matmuls on the GGUF's codes | bundle MB | top-1 vs fp32 | KL(fp32 ‖ q) | answer tokens | ms/token (median) | vs fp32 |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for a in report["artifacts"]:
        rows = [r for r in report["bundles"] if r["artifact_name"] == a["name"]]
        base = next(r for r in rows if r["variant"] == report["variants"][0])
        for r in rows:
            q = r.get("fidelity") or {}
            fid = f"{q['agreement']:.3f} | {q['kl']:.4f} | {q['tokens']}" if q else "(reference) | | "
            g = r.get("quantized_weights")
            on = "" if not g else f"{g['on_source_grid']} of {g['weights']}" + (
                f" ({', '.join(f'{t} {c}' for t, c in g['types'].items())})" if g["types"] else "")
            lines.append(f"| {a['model']} | {a['n']} | {r['variant'].replace('_', ', ')} | {on} | {r['bundle_bytes'] / 1e6:.0f} | {fid} | "
                         f"{r['ms_per_token_median']:.2f} | {base['ms_per_token_median'] / r['ms_per_token_median']:.2f}× |")
    lines += ["", f"![KL and ms per token]({png_rel})", "", report["end"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None, variants=VARIANTS, name: str = "gguf_grids_cpu", title: str = TITLE,
         doc: str | None = None) -> int:
    """Export, time and compare `variants` ([(bundle suffix, ExportConfig fields)], the first the fp32
    reference) of each artifact; records `name`.json/.png and the docs/benchmarks.md section `name`."""
    ap = argparse.ArgumentParser(description=(doc or __doc__).split("\n")[0])
    ap.add_argument("--artifacts", required=True, help="comma-separated artifact directories (fitted on a manual's text)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / name))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / f"{name}.json"))
    a = ap.parse_args(argv)
    import onnxruntime

    work = Path(a.work)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    report = {"date": time.strftime("%Y-%m-%d"), "argv": " ".join(argv if argv is not None else sys.argv[1:]),
              "script": f"{name}.py", "title": title, "begin": begin, "end": end, "variants": [v for v, _ in variants],
              "machine": machine_info(THREADS), "onnxruntime": onnxruntime.__version__, "steps": a.steps,
              "repeats": a.repeats, "questions": a.questions, "max_tokens": a.max_tokens, "artifacts": [], "bundles": []}
    planned = []
    for art in (Path(p) for p in a.artifacts.split(",")):
        man = json.loads((art / "manifest.json").read_text())
        art_name = art.name.removesuffix(".nectar")
        report["artifacts"].append({"name": art_name, "path": str(art), "model": man["base_model"]["name"],
                                    "n": man["document"]["n_tokens"], "manual": manual_of(art).name})
        for v, kw in variants:
            planned.append((art_name, v, export(art, work / f"{art_name}_{v}", log=log, **kw)))
    contention = CpuContention()
    log(f"timing {len(planned)} bundles round-robin …")
    for (art_name, v, path), r in zip(planned, time_bundles([p for _, _, p in planned], a.steps, a.repeats, log)):
        man = json.loads((path / "manifest.json").read_text())
        r.update(artifact_name=art_name, variant=v, quantized_weights=man.get("quantized_weights"),
                 export_check=man.get("export_check"))
        report["bundles"].append(r)
    report["contention"] = contention.result()
    fidelity_to_reference(report, work, variants[0][0], a.questions, a.max_tokens, log)
    png = REPO / "docs" / "img" / f"{name}.png"
    write_outputs(report, Path(a.out), png, plot, docs_section, begin, end, REPO / "docs" / "benchmarks.md")
    log(f"wrote {a.out}, {png}, docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
