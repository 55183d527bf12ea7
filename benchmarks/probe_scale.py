"""More probes: Nectar quality with the default probe set and with 4x its probes, per manual.

The records come from `benchmarks/nectar_quality.py run` (see docs/results.md, "More probes", for
the device commands); semantic similarity is filled in on the CPU first:

    python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/probe_scale_h100
    python benchmarks/probe_scale.py        # JSON summary, PNG, table in docs/results.md

Pairs are (manual, training steps, distillation steps) at budget 0.24 with fp32-stored queries (the
first run's): the same eval questions and the same generation batch, only the probe set differs.
Manuals with three or more probe scales also get a saturation plot (agreement, KL and held-out
attention error against the probe scale).
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
        err = r["heldout"]["o_rel_error"]
        rows.append({"manual": r["manual"], "probe_scale": probe_scale(r), "steps": r["steps"],
                     "budget_fraction": r["budget_fraction"], "query_dtype": fc.get("query_dtype", "float32"),
                     "heldout_o_rel_error_mean": round(sum(err) / len(err), 4),
                     "distill_steps": fc.get("distill_steps", 0), "probe_tokens": r["probes"]["tokens"],
                     "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                     "probes_and_queries_s": r["timings_s"]["probes_and_queries"], "fit_s": r["timings_s"]["fit"],
                     "nectar": {m: r["methods"]["nectar"][m] for m in METRICS},
                     "streaming": {m: r["methods"]["streaming"][m] for m in METRICS}})
    return sorted(rows, key=lambda x: (x["manual"], x["budget_fraction"], x["steps"], x["distill_steps"], x["probe_scale"],
                                       x["query_dtype"] != "float32"))


def table(rows: list[dict]) -> list[str]:
    lines = ["| manual | budget | steps | probes | probe tokens (train) | bytes % of KV | held-out o rel | "
             + " | ".join(METRICS) + " | streaming agreement / kl |",
             "|---|---:|---:|---|---:|---:|---:|" + "---:|" * len(METRICS) + "---|"]
    for x in rows:
        probes = f"{x['probe_scale']:g}×" + (f" + distill {x['distill_steps']}" if x["distill_steps"] else "")
        probes += ", fp16 queries" if x["query_dtype"] == "float16" else ""
        s = x["nectar"]
        lines.append(f"| {x['manual']} | {x['budget_fraction']:g} | {x['steps']} | {probes} | {x['probe_tokens']:,} | "
                     f"{x['bytes_pct_of_kv']} | {x['heldout_o_rel_error_mean']:.3f} | "
                     + " | ".join(f"{s[m]:.3f}" if s[m] is not None else "-" for m in METRICS)
                     + f" | {x['streaming']['agreement']:.3f} / {x['streaming']['kl']:.3f} |")
    return lines


def paired(rows: list[dict], steps: int, scale: float) -> list[tuple[dict, dict]]:
    """(1x, scale x) pairs at `steps` training steps without distillation, per manual."""
    key = {(x["manual"], x["probe_scale"]): x for x in rows if x["steps"] == steps and not x["distill_steps"]
           and x["budget_fraction"] == 0.24 and x["query_dtype"] == "float32"}
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


def saturation(rows: list[dict]) -> dict:
    """{(manual, steps): [rows by probe scale]} at budget 0.24 without distillation, for the manual and
    step counts measured at three or more scales (one row per scale: the first stored)."""
    out: dict = {}
    for x in rows:
        if x["budget_fraction"] == 0.24 and not x["distill_steps"]:
            out.setdefault((x["manual"], x["steps"]), {}).setdefault(x["probe_scale"], x)
    return {k: [v[s] for s in sorted(v)] for k, v in out.items() if len(v) >= 3}


def plot_saturation(curves: dict, img: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (manual, steps), pts in sorted(curves.items()):
        xs = [x["probe_scale"] for x in pts]
        for ax, get in zip(axes, (lambda x: x["nectar"]["agreement"], lambda x: x["nectar"]["kl"],
                                  lambda x: x["heldout_o_rel_error_mean"])):
            ax.plot(xs, [get(x) for x in pts], "o-", label=f"{manual}, {steps} steps")
    for ax, title in zip(axes, ("agreement", "kl", "held-out o rel error (mean over layers)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1×", "2×", "4×", "8×"])
        ax.set_xlabel("probe scale")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, budget 0.24, H100: more probes help up to 4×, not beyond")
    fig.tight_layout()
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
               "saturation": {f"{m}@{st}": [{"probe_scale": x["probe_scale"], "agreement": x["nectar"]["agreement"],
                                              "kl": x["nectar"]["kl"], "heldout_o_rel_error_mean": x["heldout_o_rel_error_mean"]}
                                             for x in pts] for (m, st), pts in saturation(rows).items()},
               "rows": rows}
    Path(a.json).write_text(json.dumps(summary, indent=1))
    lines = table(rows)
    print("\n".join(lines))
    print("deltas (scaled - default): " + "; ".join(f"{m} " + ", ".join(f"{d:+.3f}" for d in ds) for m, ds in deltas.items()))
    if a.docs:
        img = ROOT / "docs" / "img" / "probe_scale.png"
        plot(pairs, a.scale, img)
        curves = saturation(rows)
        if curves:
            plot_saturation(curves, img.with_name("probe_scale_saturation.png"))
        doc = ROOT / "docs" / "results.md"
        text = doc.read_text()
        block = "\n".join(["<!-- probe_scale:begin -->", *lines, "", "![default vs more probes](img/probe_scale.png)",
                           *(["", "![probe scale saturation](img/probe_scale_saturation.png)"] if curves else []),
                           "<!-- probe_scale:end -->"])
        start, end = text.index("<!-- probe_scale:begin -->"), text.index("<!-- probe_scale:end -->") + len("<!-- probe_scale:end -->")
        doc.write_text(text[:start] + block + text[end:])
        print(f"wrote {a.json}, {img} and {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
