"""Retained heads: Nectar at the default budget (0.24 of the document's fp16 KV) without and with
the stored document KV (fp16 or int8) of the 15–36 worst-served KV heads inside that budget
(`nectar fit --retain-heads K --retain-dtype D`), per manual, against the equal-bytes StreamingLLM
cache and no document.

The records come from `benchmarks/nectar_quality.py run` on an H100 (docs/results.md, "Retained
heads", has the device commands); semantic similarity is filled in on the CPU first:

    python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/retained_h100
    python benchmarks/retained_heads.py     # JSON summary, PNG, table in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")
TARGETS = {"agreement": (">=", 0.95), "kl": ("<=", 0.10), "exact_match": (">=", 0.60), "semantic_similarity": (">=", 0.90)}


def summarize(recs: list[dict]) -> list[dict]:
    """One row per record: manual, retained heads, bytes, Nectar / streaming / none metrics."""
    rows = []
    for r in recs:
        fc = r.get("fit_config") or {}
        k = fc.get("retain_heads", 0)
        rows.append({"manual": r["manual"], "retain_heads": k, "retain_dtype": fc.get("retain_dtype", "float16") if k else "-", "budget_fraction": r["budget_fraction"],
                     "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                     "retained_modules": r.get("retained_modules"), "steps": r["steps"],
                     **{m: {c: r["methods"][m][c] for c in METRICS} for m in ("nectar", "streaming", "none")}})
    return sorted(rows, key=lambda x: (x["manual"], x["retain_dtype"] == "int8", x["retain_heads"]))


def setting(x: dict) -> str:
    return "none" if not x["retain_heads"] else f"{x['retain_heads']} {'int8' if x['retain_dtype'] == 'int8' else 'fp16'}"


def strictly_better(x: dict) -> list[str]:
    """Metrics on which Nectar is not strictly better than both streaming and no document."""
    worse = []
    for c in METRICS:
        n, s, o = x["nectar"][c], x["streaming"][c], x["none"][c]
        if None in (n, s, o):
            continue
        better = (n < s and n < o) if c == "kl" else (n > s and n > o)
        if not better:
            worse.append(c)
    return worse


def table(rows: list[dict]) -> list[str]:
    lines = ["| manual | retained heads | bytes % of KV | " + " | ".join(METRICS) + " | not strictly better than streaming and none on |",
             "|---|---:|---:|" + "---:|" * len(METRICS) + "---|"]
    for x in rows:
        lines.append(f"| {x['manual']} | {setting(x)} | {x['bytes_pct_of_kv']} | "
                     + " | ".join(f"{x['nectar'][c]:.3f}" for c in METRICS) + f" | {', '.join(strictly_better(x)) or '-'} |")
    return lines


def targets_met(rows: list[dict]) -> dict:
    """Per retained-head count and target metric: how many manuals meet it, and the range."""
    out = {}
    for k in sorted({setting(x) for x in rows}, key=lambda t: (t != "none", t)):
        sel = [x for x in rows if setting(x) == k]
        for c, (op, bar) in TARGETS.items():
            vals = [x["nectar"][c] for x in sel]
            met = sum((v >= bar) if op == ">=" else (v <= bar) for v in vals)
            out[f"{k}:{c}"] = {"met": met, "of": len(vals), "min": min(vals), "max": max(vals)}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manuals = sorted({x["manual"] for x in rows})
    ks = sorted({setting(x) for x in rows}, key=lambda t: (t != "none", t))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric in zip(axes, ("agreement", "exact_match", "semantic_similarity")):
        width = 0.8 / (len(ks) + 1)
        for i, k in enumerate(ks):
            vals = [next((x["nectar"][metric] for x in rows if x["manual"] == m and setting(x) == k), float("nan")) for m in manuals]
            ax.bar([j + i * width for j in range(len(manuals))], vals, width, label=f"Nectar, retained heads: {k}")
        vals = [next(x["streaming"][metric] for x in rows if x["manual"] == m) for m in manuals]
        ax.bar([j + len(ks) * width for j in range(len(manuals))], vals, width, label="StreamingLLM, equal bytes", color="0.6")
        if metric in TARGETS:
            ax.axhline(TARGETS[metric][1], color="k", ls="--", lw=0.8)
        ax.set_xticks([j + width * len(ks) / 2 for j in range(len(manuals))], manuals)
        ax.set_title(metric + " (dashed: target)")
        ax.set_ylim(0.8 if metric == "agreement" else 0, 1.0)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle("SmolLM2-135M, budget 0.24 of the fp16 KV (retained heads inside it), H100 fits")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="+", default=[str(ROOT / "benchmarks" / "results" / d) for d in ("retained_h100", "retained_int8_h100")])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "retained_h100.json"))
    p.add_argument("--png", default=str(ROOT / "docs" / "img" / "retained_heads.png"))
    p.add_argument("--no-docs", dest="docs", action="store_false")
    a = p.parse_args(argv)
    # the no-retention records of the second run repeat the first's (same probes, same numbers): kept once
    recs, seen = [], set()
    for d in a.records:
        for f in sorted(Path(d).glob("*.json")):
            r = json.loads(f.read_text())
            fc = r.get("fit_config") or {}
            key = (r["manual"], fc.get("retain_heads", 0), fc.get("retain_dtype", "float16") if fc.get("retain_heads") else "-")
            if key not in seen:
                seen.add(key)
                recs.append(r)
    if not recs:
        print(f"{' '.join(a.records)}: no records (run benchmarks/nectar_quality.py run first)", file=sys.stderr)
        return 2
    if any(m.get("semantic_similarity") is None for r in recs for m in r["methods"].values()):
        print(f"semantic similarity missing: run `python benchmarks/nectar_quality.py report --no-docs --out-dir DIR` "
              f"for each of {' '.join(a.records)} first", file=sys.stderr)
        return 2
    rows = summarize(recs)
    Path(a.json).write_text(json.dumps({"rows": rows, "targets": targets_met(rows)}, indent=1))
    plot(rows, Path(a.png))
    lines = table(rows)
    print("\n".join(lines))
    for key, v in targets_met(rows).items():
        print(f"{key}: {v['met']}/{v['of']} manuals, {v['min']:.3f}–{v['max']:.3f}")
    if a.docs:
        doc = ROOT / "docs" / "results.md"
        text = doc.read_text()
        block = "\n".join(["<!-- retained:begin -->", *lines, "", "![retained heads](img/retained_heads.png)", "<!-- retained:end -->"])
        if "<!-- retained:begin -->" in text:
            s, e = text.index("<!-- retained:begin -->"), text.index("<!-- retained:end -->") + len("<!-- retained:end -->")
            text = text[:s] + block + text[e:]
        else:
            raise SystemExit(f"{doc}: no <!-- retained:begin --> marker; add one where the table belongs")
        doc.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
