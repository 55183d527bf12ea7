"""The defaults against issue 3's targets on all ten manuals (six development, four held out), as
`nectar fit` makes artifacts since the budget cap of 2026-11-25 (`--budget-tokens 4096`; 18 retained KV heads
keeping every document token up to 4,096 on SmolLM2): per manual Nectar, the equal-bytes StreamingLLM cache and no document, and the verdict per
target (docs/results.md, "The defaults against the targets").

Records: `benchmarks/nectar_quality.py run` with no setting flags on an H100 (4,800 steps), semantic
similarity filled in on the CPU (`nectar_quality.py report --no-docs --out-dir DIR`):

    benchmarks/results/defaults_budget_tokens_h100     one record per manual, and the runs' logs
    (before the cap: benchmarks/results/defaults_retained_h100, 18 heads × 2,048 tokens)

    python benchmarks/defaults_quality.py         # JSON summary, PNG, table in docs/results.md

The CPU defaults (`nectar fit --device cpu`: half the probes, 1,200 steps of 512 samples; H100 fits in
fp32 standing in, `nectar_quality.py run --extra-only --steps 1200 --probe-scale 0.5 --extra
"0.24:adaptive:mlp:0:batch=512;train_dtype=float32"`), section "The CPU defaults against the targets":

    python benchmarks/defaults_quality.py --records benchmarks/results/cpu_defaults_budget_tokens_h100 --name cpu
    (before the cap: benchmarks/results/cpu_defaults_h100)

Documents of other genres (benchmarks/other_genres: a license, a design spec; section "Other genres"):

    python benchmarks/defaults_quality.py --records benchmarks/results/other_genres_h100 --name genres

The same two at the CPU defaults, fitted and evaluated end to end on the 2-core CPU (`nectar_quality.py run
--manuals benchmarks/other_genres --only apache2,dpkg_triggers --device cpu --out-dir benchmarks/results/other_genres_cpu`):

    python benchmarks/defaults_quality.py --records benchmarks/results/other_genres_cpu --name genres_cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import write_docs  # noqa: E402

TITLES = {"": "default settings (budget capped at 4,096 tokens' KV; 18 retained heads × every token up to 4,096), H100 fits",
          "cpu": "CPU defaults (half the probes, 1,200 steps × 512; 18 retained heads × every token up to 4,096), H100 fits in fp32",
          "genres": "default settings of 2026-11-24 (18 retained heads × 2,048 tokens) on documents of other genres, H100 fits",
          "genres_cpu": "CPU defaults of 2026-11-24 (half the probes, 1,200 steps × 512; 18 retained heads × 2,048 tokens) on "
                        "documents of other genres, fitted on this 2-core CPU"}
HELDOUT = ("journalctl", "ssh", "tar", "xargs")
METRICS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")
METHODS = ("nectar", "streaming", "none")


def collect(folder: Path) -> list[dict]:
    """One row per manual: the record's methods (nectar, streaming, none; full for QA accuracy)."""
    rows = []
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        fc = r.get("fit_config") or {}
        rows.append({"manual": r["manual"], "heldout": r["manual"] in HELDOUT, "n_tokens": r["n_tokens"],
                     "source": str(p.relative_to(ROOT)), "steps": r["steps"], "retained": f"{fc.get('retain_heads')} × {r.get('retained_tokens')}",
                     "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                     "full_qa_accuracy": r["methods"]["full"]["qa_accuracy"],
                     **{m: {k: r["methods"][m].get(k) for k in METRICS} for m in METHODS}})
    return rows


def strictly_better(row: dict) -> list[str]:
    """The metrics on which Nectar is not strictly better than both streaming and no document."""
    n, s, z = row["nectar"], row["streaming"], row["none"]
    return [k for k in METRICS if not (n[k] < min(s[k], z[k]) if k == "kl" else n[k] > max(s[k], z[k]))]


def verdicts(rows: list[dict]) -> dict[str, str]:
    k = len(rows)

    def count(pred) -> int:
        return sum(1 for r in rows if pred(r))

    lo = {m: min(r["nectar"][m] for r in rows) for m in METRICS}
    hi = {m: max(r["nectar"][m] for r in rows) for m in METRICS}
    better = count(lambda r: not strictly_better(r))
    return {
        "next-token agreement ≥ 0.95": f"{count(lambda r: r['nectar']['agreement'] >= 0.95)} of {k} ({lo['agreement']:.3f}–{hi['agreement']:.3f})",
        "mean KL ≤ 0.10": f"{count(lambda r: r['nectar']['kl'] <= 0.10)} of {k} ({lo['kl']:.4f}–{hi['kl']:.4f})",
        "≥ 60% greedy answers identical": f"{count(lambda r: r['nectar']['exact_match'] >= 0.60)} of {k} ({lo['exact_match']:.2f}–{hi['exact_match']:.2f})",
        "semantic similarity ≥ 0.90": f"{count(lambda r: r['nectar']['semantic_similarity'] >= 0.90)} of {k} "
                                      f"({lo['semantic_similarity']:.3f}–{hi['semantic_similarity']:.3f})",
        "strictly better than streaming and no document on every metric": f"{better} of {k}; not on "
        + "; ".join(f"{r['manual']}: {', '.join(strictly_better(r))} (QA accuracy {r['nectar']['qa_accuracy']:.2f}, streaming "
                    f"{r['streaming']['qa_accuracy']:.2f}, full context {r['full_qa_accuracy']:.2f})" for r in rows if strictly_better(r)),
        "artifact ≤ 25% of the fp16 KV": f"{count(lambda r: r['bytes_pct_of_kv'] <= 25)} of {k} "
                                         f"({min(r['bytes_pct_of_kv'] for r in rows)}–{max(r['bytes_pct_of_kv'] for r in rows)}%)",
    }


def table(rows: list[dict]) -> str:
    head = ["| manual | n | bytes % of KV | method | agreement | KL | exact match | ROUGE-L | similarity | QA accuracy (full context) |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    out = []
    for r in sorted(rows, key=lambda r: (r["heldout"], r["manual"])):
        name = r["manual"] + (" (held out)" if r["heldout"] else "")
        for m in METHODS:
            v = r[m]
            qa = f"{v['qa_accuracy']:.2f}" + (f" ({r['full_qa_accuracy']:.2f})" if m == "nectar" else "")
            out.append(f"| {name if m == 'nectar' else ''} | {r['n_tokens'] if m == 'nectar' else ''} | "
                       f"{r['bytes_pct_of_kv'] if m == 'nectar' else ''} | {m} | {v['agreement']:.3f} | {v['kl']:.4f} | "
                       f"{v['exact_match']:.2f} | {v['rouge_l']:.3f} | {v['semantic_similarity']:.3f} | {qa} |")
    return "\n".join(head + out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (r["heldout"], r["manual"]))
    names = [r["manual"] + ("*" if r["heldout"] else "") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (metric, line) in zip(axes, (("agreement", 0.95), ("semantic_similarity", 0.90), ("exact_match", 0.60))):
        w = 0.27
        for i, m in enumerate(METHODS):
            ax.bar([x + (i - 1) * w for x in range(len(rows))], [r[m][metric] for r in rows], w, label=m)
        ax.axhline(line, color="k", ls=":", lw=1, label=f"target {line}")
        ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
        ax.set_title(metric.replace("_", " "))
        ax.set_ylim(0, 1.02)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {title}" + ("; * held out" if any(r["heldout"] for r in rows) else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", default=str(ROOT / "benchmarks" / "results" / "defaults_budget_tokens_h100"))
    ap.add_argument("--name", default="", choices=sorted(TITLES),
                    help="which defaults: '' (GPU, section 'defaults'), 'cpu' (section 'defaults_cpu'), 'genres' "
                         "(other genres, section 'defaults_genres') or 'genres_cpu' (the same at the CPU defaults); names the JSON and PNG")
    ap.add_argument("--json", default=None, help="default benchmarks/results/defaults_quality[_NAME].json")
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args(argv)
    suffix = f"_{a.name}" if a.name else ""
    a.json = a.json or str(ROOT / "benchmarks" / "results" / f"defaults_quality{suffix}.json")
    png = f"defaults_quality{suffix}.png"
    BEGIN, END = f"<!-- defaults{suffix}:begin -->", f"<!-- defaults{suffix}:end -->"
    rows = collect(Path(a.records).resolve())
    if not rows:
        print(f"defaults_quality: no records in {a.records}; run benchmarks/nectar_quality.py run there first", file=sys.stderr)
        return 1
    if any(r["nectar"]["semantic_similarity"] is None for r in rows):
        print(f"defaults_quality: {a.records} lacks semantic similarity; run `benchmarks/nectar_quality.py report --no-docs "
              f"--out-dir {a.records}` first", file=sys.stderr)
        return 1
    v = verdicts(rows)
    Path(a.json).write_text(json.dumps({"rows": rows, "verdicts": v}, indent=1))
    plot(rows, ROOT / "docs" / "img" / png, TITLES[a.name])
    lines = [f"- {k}: {x}" for k, x in v.items()]
    print("\n".join(lines))
    if not a.no_docs:
        write_docs(ROOT / "docs" / "results.md", "\n".join([BEGIN, f"Targets (issue 3), {TITLES[a.name].split(' (')[0]}:", "", *lines, "",
                                                              table(rows), "", f"![defaults against the targets](img/{png})",
                                                              END]), BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
