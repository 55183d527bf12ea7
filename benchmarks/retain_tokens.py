"""Retained heads under a token budget (`nectar fit --retain-heads 18 --retain-tokens M`): Nectar at the
default budget without retained heads, and with 18 int8 retained heads that keep only M document tokens
each, per manual, in the variants measured on the way (docs/results.md, "Retained heads with a token
budget"):

    one fit     (the code) the heads and tokens are chosen after the probe fit; the retained heads'
                networks are fitted to the tokens not kept; log-sum-exp merge (records at the top level)
    two fits    the same, with a full first fit to choose the heads and a second one (`two_fits/`)
    blend       networks fitted to the whole document, kept tokens weighted by the score network (`blend/`)
    alone       the kept tokens alone, no network for the rest (`without_merge/`)

The records come from `benchmarks/nectar_quality.py run` on an H100 (docs/results.md has the device
commands); semantic similarity is filled in on the CPU first, then:

    for d in "" two_fits blend without_merge; do
        python benchmarks/nectar_quality.py report --no-docs --out-dir benchmarks/results/retain_tokens_h100/$d; done
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


VARIANTS = (("one fit", ""), ("two fits", "two_fits"), ("blend", "blend"), ("alone", "without_merge"))


def rows_of(folder: Path, variant: str) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        fc = r.get("fit_config") or {}
        err = r.get("retained_heldout_error") or {}
        out.append({"manual": r["manual"], "n_tokens": r["n_tokens"], "tokens": fc.get("retain_tokens", 0) if fc.get("retain_heads") else None,
                    "variant": variant if fc.get("retain_heads") else None, "bytes_pct_of_kv": round(100 * r["artifact_bytes"] / r["kv_bytes"], 1),
                    "heldout_error_o": err.get("o"), "heldout_error_lse": err.get("lse"),
                    **{m: r["methods"]["nectar"].get(m) for m in METRICS}})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| manual | retained heads | variant | bytes % of KV | agreement | kl | exact_match | semantic_similarity | "
             "retained heads' held-out error: o rel / lse |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    order = [v for v, _ in VARIANTS]
    key = lambda x: (x["manual"], x["tokens"] is not None, order.index(x["variant"]) if x["variant"] else -1, -(x["tokens"] or 0))  # noqa: E731
    for x in sorted(rows, key=key):
        what = "none" if x["tokens"] is None else f"18 int8 × {x['tokens']} tokens"
        err = f"{x['heldout_error_o']:.3f} / {x['heldout_error_lse']:.3f}" if x["heldout_error_o"] is not None else "-"
        sem = "" if x["semantic_similarity"] is None else f"{x['semantic_similarity']:.3f}"
        lines.append(f"| {x['manual']} | {what} | {x['variant'] or '-'} | {x['bytes_pct_of_kv']} | {x['agreement']:.3f} | {x['kl']:.3f} | "
                     f"{x['exact_match']:.2f} | {sem} | {err} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    manuals = sorted({x["manual"] for x in rows})
    marks = {"one fit": "o", "two fits": "s", "blend": "^", "alone": "x"}
    for ax, m, title in zip(axes, ("agreement", "kl"), ("next-token agreement", "mean KL(full ‖ Nectar)")):
        for v, mk in marks.items():
            xs = [i + 0.12 * list(marks).index(v) for i, man in enumerate(manuals)
                  for x in rows if x["manual"] == man and x["variant"] == v and x["tokens"] == 1024]
            ys = [x[m] for man in manuals for x in rows if x["manual"] == man and x["variant"] == v and x["tokens"] == 1024]
            ax.scatter(xs, ys, marker=mk, label=f"18 × 1,024 tokens, {v}")
        ax.scatter(range(len(manuals)), [next(x[m] for x in rows if x["manual"] == man and x["tokens"] is None) for man in manuals],
                   marker="_", s=300, color="k", label="no retained heads")
        ax.set_xticks(range(len(manuals)), manuals)
        ax.set_title(title)
    axes[0].axhline(0.95, color="grey", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", default=str(ROOT / "benchmarks" / "results" / "retain_tokens_h100"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "retain_tokens_h100.json"))
    a = ap.parse_args(argv)
    folder = Path(a.records)
    rows = rows_of(folder, "one fit") + [x for v, sub in VARIANTS[1:] for x in rows_of(folder / sub, v) if x["tokens"] is not None]
    Path(a.out).write_text(json.dumps({"rows": rows}, indent=1))
    plot(rows, ROOT / "docs" / "img" / "retain_tokens.png")
    write_docs(ROOT / "docs" / "results.md", "\n".join([BEGIN, table(rows), "", "![retain tokens](img/retain_tokens.png)", END]), BEGIN, END)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
