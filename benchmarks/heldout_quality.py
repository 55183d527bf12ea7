"""Nectar on manuals never used in development, beside the development manuals, per retained-head
token budget (docs/results.md, "Held-out manuals and the token budget"):

    none        the defaults (no retained heads)
    18 × 1,024  `--retain-heads 18 --retain-tokens 1024`
    18 × 2,048  `--retain-heads 18 --retain-tokens 2048`
    18 × all    `--retain-heads 18 --retain-tokens 0` (decode then grows with n)

Records (`benchmarks/nectar_quality.py run` on an H100; docs/results.md has the device commands; semantic
similarity filled in on the CPU with `nectar_quality.py report --no-docs --out-dir DIR`):

    benchmarks/results/heldout_h100            held-out manuals (benchmarks/heldout), all four settings
    benchmarks/results/retain_tokens_h100/m2048   development manuals: defaults again and 18 × 2,048
    benchmarks/results/retain_tokens_h100      development manuals: 18 × 1,024 (one fit)
    benchmarks/results/retained_int8_h100      development manuals: 18 × all (int8)

Two held-out records (xargs at 1,024 and 2,048 tokens) did not come back from the device (a per-call
file-count limit); their agreement, KL and exact match are read from the run's own log
(`heldout_h100/q.log`), and their semantic similarity is missing.

    python benchmarks/heldout_quality.py      # JSON summary, PNG, table in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import write_docs  # noqa: E402

BEGIN, END = "<!-- heldout:begin -->", "<!-- heldout:end -->"
RESULTS = ROOT / "benchmarks" / "results"
HELDOUT = ("journalctl", "ssh", "tar", "xargs")
SETTINGS = ("none", "18 × 1,024", "18 × 2,048", "18 × all")
METRICS = ("agreement", "kl", "exact_match", "semantic_similarity")


def setting_of(rec: dict) -> str | None:
    fc = rec.get("fit_config") or {}
    if not fc.get("retain_heads"):
        return "none"
    if fc["retain_heads"] != 18 or fc.get("retain_dtype", "int8") != "int8":
        return None
    m = fc.get("retain_tokens", 0)
    return {0: "18 × all", 1024: "18 × 1,024", 2048: "18 × 2,048"}.get(m)


def records(folder: Path, keep: set[str]) -> dict[tuple[str, str], dict]:
    out = {}
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        s = setting_of(r)
        if s in keep:
            out[(r["manual"], s)] = {"source": str(p.relative_to(ROOT)), "n_tokens": r["n_tokens"],
                                     "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                                     **{m: r["methods"]["nectar"].get(m) for m in METRICS}}
    return out


_LOG = re.compile(r"^(\w+)\s.*bytes=\s*([\d.]+)%\s+agree=([\d.]+) kl=([\d.]+) em=([\d.]+)")


def log_rows(log: Path, n_tokens: dict[str, int]) -> dict[tuple[str, str], dict]:
    """Rows of a quality run's log (for records that did not come back): no semantic similarity."""
    out = {}
    for line in log.read_text().splitlines():
        if not (m := _LOG.match(line.strip())):
            continue
        man = m.group(1)
        tokens = (t := re.search(r"retained 18x(\d+) tokens", line)) and t.group(1)
        s = "none" if tokens is None else {"1024": "18 × 1,024", "2048": "18 × 2,048"}.get(tokens, "18 × all")
        out[(man, s)] = {"source": str(log.relative_to(ROOT)), "n_tokens": n_tokens.get(man), "bytes_pct_of_kv": float(m.group(2)),
                         "agreement": float(m.group(3)), "kl": float(m.group(4)), "exact_match": float(m.group(5)),
                         "semantic_similarity": None}
    return out


def collect() -> dict[tuple[str, str], dict]:
    rows = records(RESULTS / "retained_int8_h100", {"18 × all"})
    rows.update(records(RESULTS / "retain_tokens_h100", {"18 × 1,024"}))
    rows.update(records(RESULTS / "retain_tokens_h100" / "m2048", {"none", "18 × 2,048"}))
    held = records(RESULTS / "heldout_h100", set(SETTINGS))
    n = {k[0]: v["n_tokens"] for k, v in held.items()}
    for k, v in log_rows(RESULTS / "heldout_h100" / "q.log", n).items():
        held.setdefault(k, v)
    rows.update(held)
    return rows


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: dict) -> str:
    manuals = sorted({m for m, _ in rows}, key=lambda m: (m in HELDOUT, m))
    head = "| manual | set | n | " + " | ".join(f"{s}: agreement / EM / similarity" for s in SETTINGS) + " |"
    lines = [head, "|---|---|---:|" + "---|" * len(SETTINGS)]
    for man in manuals:
        cells = []
        for s in SETTINGS:
            r = rows.get((man, s))
            cells.append("not run" if r is None else
                         f"{r['agreement']:.3f} / {r['exact_match']:.2f} / {fmt(r['semantic_similarity'], '.3f')}")
        n = next(r["n_tokens"] for (m, _), r in rows.items() if m == man and r["n_tokens"])
        lines.append(f"| {man} | {'held-out' if man in HELDOUT else 'development'} | {n} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| setting | manuals | agreement ≥ 0.95 | exact match ≥ 0.60 | similarity ≥ 0.90 | mean agreement | mean KL | mean exact match |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in SETTINGS:
        rs = [r for (m, ss), r in rows.items() if ss == s]
        sims = [r["semantic_similarity"] for r in rs if r["semantic_similarity"] is not None]
        lines.append(f"| {s} | {len(rs)} | {sum(r['agreement'] >= 0.95 for r in rs)} of {len(rs)} | "
                     f"{sum(r['exact_match'] >= 0.6 for r in rs)} of {len(rs)} | {sum(x >= 0.9 for x in sims)} of {len(sims)} | "
                     f"{sum(r['agreement'] for r in rs) / len(rs):.3f} | {sum(r['kl'] for r in rs) / len(rs):.4f} | "
                     f"{sum(r['exact_match'] for r in rs) / len(rs):.2f} |")
    return "\n".join(lines)


def plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manuals = sorted({m for m, _ in rows}, key=lambda m: (m in HELDOUT, m))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric in zip(axes, ("agreement", "exact_match", "semantic_similarity")):
        for j, s in enumerate(SETTINGS):
            pts = [(i + 0.15 * (j - 1.5), rows[(m, s)][metric]) for i, m in enumerate(manuals)
                   if (m, s) in rows and rows[(m, s)][metric] is not None]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=s, s=22)
        ax.axvline(len([m for m in manuals if m not in HELDOUT]) - 0.5, color="grey", lw=0.8)
        ax.axhline({"agreement": 0.95, "exact_match": 0.6, "semantic_similarity": 0.9}[metric], color="grey", ls=":", lw=0.8)
        ax.set_xticks(range(len(manuals)), manuals, rotation=45, fontsize=8)
        ax.set_title(metric + " (right of the line: held-out)", fontsize=9)
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="lower center", ncol=4, fontsize=8, title="retained heads × kept tokens", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "heldout_quality.json"))
    a = ap.parse_args(argv)
    rows = collect()
    Path(a.out).write_text(json.dumps({"rows": [{"manual": m, "setting": s, **r} for (m, s), r in sorted(rows.items())]}, indent=1))
    plot(rows, ROOT / "docs" / "img" / "heldout_quality.png")
    t = table(rows)
    write_docs(ROOT / "docs" / "results.md", "\n".join([BEGIN, t, "", "![held-out quality](img/heldout_quality.png)", END]), BEGIN, END)
    print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
