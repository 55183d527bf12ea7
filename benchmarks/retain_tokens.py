"""Retained heads under a token budget (`nectar fit --retain-heads 18 --retain-tokens M`): Nectar at the
default budget without retained heads, and with 18 int8 retained heads that keep only M document tokens
each, per manual; with (the code) and without (the first run) the merge of the kept tokens with the
network for the rest of the document.

The records come from `benchmarks/nectar_quality.py run` on an H100 (docs/results.md, "Retained heads
with a token budget", has the device commands); semantic similarity is filled in on the CPU first:

    python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/retain_tokens_h100
    python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/retain_tokens_h100/without_merge
    python benchmarks/retain_tokens.py     # JSON summary, PNG, table in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import write_docs  # noqa: E402

BEGIN, END = "<!-- retain_tokens:begin -->", "<!-- retain_tokens:end -->"
METRICS = ("agreement", "kl", "exact_match", "semantic_similarity")


def rows_of(folder: Path, merged: bool) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        fc = r.get("fit_config") or {}
        err = r.get("retained_heldout_error") or {}
        out.append({"manual": r["manual"], "n_tokens": r["n_tokens"], "tokens": fc.get("retain_tokens", 0) if fc.get("retain_heads") else None,
                    "merged": merged if fc.get("retain_heads") else None, "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                    "heldout_error_o": err.get("o"), "heldout_error_lse": err.get("lse"),
                    **{m: r["methods"]["nectar"].get(m) for m in METRICS}})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| manual | retained heads | bytes % of KV | agreement | kl | exact_match | semantic_similarity | retained heads' held-out error: o rel / lse |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    key = lambda x: (x["manual"], x["tokens"] is not None, x["merged"] is not False, -(x["tokens"] or 0))  # noqa: E731
    for x in sorted(rows, key=key):
        if x["tokens"] is None:
            what = "none (the default)"
        else:
            what = f"18 int8 × {x['tokens']} tokens" + ("" if x["merged"] else ", kept tokens alone (first run)")
        err = f"{x['heldout_error_o']:.3f} / {x['heldout_error_lse']:.3f}" if x["merged"] and x["heldout_error_o"] is not None else "-"
        sem = "" if x["semantic_similarity"] is None else f"{x['semantic_similarity']:.3f}"
        lines.append(f"| {x['manual']} | {what} | {x['bytes_pct_of_kv']} | {x['agreement']:.3f} | {x['kl']:.3f} | "
                     f"{x['exact_match']:.2f} | {sem} | {err} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for manual in sorted({x["manual"] for x in rows}):
        base = next(x for x in rows if x["manual"] == manual and x["tokens"] is None)
        pts = sorted((x["tokens"], x) for x in rows if x["manual"] == manual and x["merged"])
        for ax, m in zip(axes, ("agreement", "kl")):
            line, = ax.plot([t for t, _ in pts], [x[m] for _, x in pts], "o-", label=manual)
            ax.axhline(base[m], color=line.get_color(), ls=":", lw=1)
    for ax, m in zip(axes, ("next-token agreement", "mean KL(full ‖ Nectar)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens kept per retained head (18 int8 heads)")
        ax.set_title(f"{m}\n(dotted: no retained heads)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=str(ROOT / "benchmarks" / "results" / "retain_tokens_h100"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retain_tokens_h100.json"))
    a = ap.parse_args(argv)
    folder = Path(a.records)
    rows = rows_of(folder, True) + [x for x in rows_of(folder / "without_merge", False) if x["tokens"] is not None]
    Path(a.out).write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, ROOT / "docs" / "img" / "retain_tokens.png")
    write_docs(ROOT / "docs" / "results.md", "\n".join([BEGIN, table(rows), "", "![retain tokens](img/retain_tokens.png)", END]), BEGIN, END)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
