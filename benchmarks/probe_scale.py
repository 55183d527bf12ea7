"""More probes: Nectar quality with the default probe set and with 4x its probes, per manual.

The records come from `benchmarks/nectar_quality.py run` (see docs/results.md, "More probes", for
the device commands); semantic similarity is filled in on the CPU first:

    python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/probe_scale_h100
    python benchmarks/probe_scale.py        # JSON summary, PNG, table in docs/results.md

Pairs are (manual, training steps, distillation steps): the same eval questions and the same
generation batch, only the probe set differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")


def probe_scale(rec: dict) -> float:
    """Probe-count multiplier of a record: its templated questions over the default's."""
    from nectar_export.probes import ProbeConfig

    if rec.get("probe_scale") and rec["probe_scale"] != 1:
        return rec["probe_scale"]
    over = rec.get("probe_config") or {}
    return over.get("templated_questions", ProbeConfig().templated_questions) / ProbeConfig().templated_questions


def summarize(recs: list[dict]) -> list[dict]:
    """One row per record: manual, scale, steps, distill steps, probe tokens, fit seconds, metrics."""
    rows = []
    for r in recs:
        fc = r.get("fit_config") or {}
        rows.append({"manual": r["manual"], "probe_scale": probe_scale(r), "steps": r["steps"],
                     "distill_steps": fc.get("distill_steps", 0), "probe_tokens": r["probes"]["tokens"],
                     "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                     "probes_and_queries_s": r["timings_s"]["probes_and_queries"], "fit_s": r["timings_s"]["fit"],
                     "nectar": {m: r["methods"]["nectar"][m] for m in METRICS},
                     "streaming": {m: r["methods"]["streaming"][m] for m in METRICS}})
    return sorted(rows, key=lambda x: (x["manual"], x["steps"], x["distill_steps"], x["probe_scale"]))


def table(rows: list[dict]) -> list[str]:
    lines = ["| manual | steps | probes | probe tokens (train) | bytes % of KV | " + " | ".join(METRICS) + " | streaming agreement / kl |",
             "|---|---:|---|---:|---:|" + "---:|" * len(METRICS) + "---|"]
    for x in rows:
        probes = f"{x['probe_scale']:g}×" + (f" + distill {x['distill_steps']}" if x["distill_steps"] else "")
        s = x["nectar"]
        lines.append(f"| {x['manual']} | {x['steps']} | {probes} | {x['probe_tokens']:,} | {x['bytes_pct_of_kv']} | "
                     + " | ".join(f"{s[m]:.3f}" if s[m] is not None else "-" for m in METRICS)
                     + f" | {x['streaming']['agreement']:.3f} / {x['streaming']['kl']:.3f} |")
    return lines


def paired(rows: list[dict], steps: int, scale: float) -> list[tuple[dict, dict]]:
    """(1x, scale x) pairs at `steps` training steps without distillation, per manual."""
    key = {(x["manual"], x["probe_scale"]): x for x in rows if x["steps"] == steps and not x["distill_steps"]}
    return [(key[(m, 1.0)], key[(m, scale)]) for m in sorted({m for m, _ in key}) if (m, 1.0) in key and (m, scale) in key]


def plot(pairs: list[tuple[dict, dict]], scale: float, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    xs = range(len(pairs))
    for ax, metric in zip(axes, ("agreement", "kl", "semantic_similarity")):
        ax.bar([i - 0.2 for i in xs], [a["nectar"][metric] for a, _ in pairs], 0.4, label="default probes (1×)")
        ax.bar([i + 0.2 for i in xs], [b["nectar"][metric] for _, b in pairs], 0.4, label=f"{scale:g}× probes")
        ax.plot(list(xs), [a["streaming"][metric] for a, _ in pairs], "kx", label="equal-bytes streaming")
        ax.set_xticks(list(xs), [a["manual"] for a, _ in pairs])
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0.85, 1.0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, budget 0.24, {pairs[0][0]['steps']} steps, H100: default vs {scale:g}× probes")
    fig.tight_layout()
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", default=str(ROOT / "benchmarks" / "results" / "probe_scale_h100"))
    p.add_argument("--steps", type=int, default=9600, help="the training steps of the paired comparison")
    p.add_argument("--scale", type=float, default=4.0)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "probe_scale_h100.json"))
    p.add_argument("--no-docs", dest="docs", action="store_false")
    a = p.parse_args(argv)
    recs = [json.loads(f.read_text()) for f in sorted(Path(a.records).glob("*.json"))]
    if not recs:
        print(f"error: {a.records}: no records; run benchmarks/nectar_quality.py run first", file=sys.stderr)
        return 1
    rows = summarize(recs)
    pairs = paired(rows, a.steps, a.scale)
    if not pairs:
        print(f"error: {a.records}: no manual has both a 1x and a {a.scale:g}x record at {a.steps} steps", file=sys.stderr)
        return 1
    deltas = {m: [b["nectar"][m] - x["nectar"][m] for x, b in pairs] for m in METRICS}
    summary = {"records": str(Path(a.records).resolve().relative_to(ROOT)) if Path(a.records).resolve().is_relative_to(ROOT) else a.records,
               "steps": a.steps, "scale": a.scale, "manuals": [x["manual"] for x, _ in pairs],
               "delta_nectar": deltas,
               "better_on_every_manual": {m: all((d < 0) if m == "kl" else (d > 0) for d in ds) for m, ds in deltas.items()},
               "rows": rows}
    Path(a.json).write_text(json.dumps(summary, indent=1))
    lines = table(rows)
    print("\n".join(lines))
    print("deltas (scaled - default): " + "; ".join(f"{m} " + ", ".join(f"{d:+.3f}" for d in ds) for m, ds in deltas.items()))
    if a.docs:
        img = ROOT / "docs" / "img" / "probe_scale.png"
        plot(pairs, a.scale, img)
        doc = ROOT / "docs" / "results.md"
        text = doc.read_text()
        block = "\n".join(["<!-- probe_scale:begin -->", *lines, "", "![default vs more probes](img/probe_scale.png)",
                           "<!-- probe_scale:end -->"])
        start, end = text.index("<!-- probe_scale:begin -->"), text.index("<!-- probe_scale:end -->") + len("<!-- probe_scale:end -->")
        doc.write_text(text[:start] + block + text[end:])
        print(f"wrote {a.json}, {img} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
