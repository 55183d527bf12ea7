"""The capped default budget (`--budget-tokens 4096`) with every retained token up to 4,096, against the
default before it (a budget proportional to n, 18 retained heads × max(2,048, 45% of n) tokens): Nectar's
fidelity on the same documents, same probes and training, one H100 fit each (docs/results.md, "Every token
of the retained heads, under a capped budget").

Two sets of documents:
  * the ten manuals (six development, four held out; 2.8K-4.5K tokens): before = the records of
    `benchmarks/results/defaults_retained_h100`, after = `benchmarks/results/defaults_budget_tokens_h100`
    (`nectar_quality.py run` with no setting flags, before and after the change);
  * six ~7K-token documents (`benchmarks/long_documents.py`: two manuals joined), where the cap binds: before
    = the uncapped budget with ~45% of n retained, after = 0.24 of a 4,096-token document's KV (22.649 MB)
    and 4,096 retained tokens (records `benchmarks/results/long_docs_h100` and `.../budget_tokens_h100`).

    python benchmarks/budget_tokens_quality.py    # table (stdout and docs/results.md), JSON, PNG

Semantic similarity must be filled in first (`nectar_quality.py report --no-docs --out-dir DIR`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import write_docs  # noqa: E402

R = ROOT / "benchmarks" / "results"
METRICS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity")
BEGIN, END = "<!-- budget_tokens:begin -->", "<!-- budget_tokens:end -->"
MANUALS = ("curl", "grep", "jq", "make", "sed", "tmux", "journalctl", "ssh", "tar", "xargs")
# (document, before record, after record): the long documents' records by file name
LONG = (("curl_make", "long_docs_h100/curl_make_mlp_adaptive_0.24_q16.json",
         "long_docs_h100/curl_make_mlp_adaptive_0.24_budget_mb22.649_retain_tokens4096_q16.json"),
        ("journalctl_tar", "long_docs_h100/journalctl_tar_mlp_adaptive_0.24_retain_tokens3300_q16.json",
         "long_docs_h100/journalctl_tar_mlp_adaptive_0.24_budget_mb22.649_retain_tokens4096_q16.json"),
        ("jq_sed", "long_docs_h100/jq_sed_mlp_adaptive_0.24_retain_tokens3300_q16.json",
         "long_docs_h100/jq_sed_mlp_adaptive_0.24_budget_mb22.649_retain_tokens4096_q16.json"),
        *((d, f"budget_tokens_h100/{d}_mlp_adaptive_0.24_q16.json",
           f"budget_tokens_h100/{d}_mlp_adaptive_0.24_budget_mb22.649_retain_tokens4096_q16.json")
          for d in ("ssh_make", "tmux_sed", "xargs_journalctl")))


def side(path: Path) -> dict:
    r = json.loads(path.read_text())
    v = r["methods"]["nectar"]
    if v.get("semantic_similarity") is None:
        raise SystemExit(f"{path}: no semantic similarity yet; run `benchmarks/nectar_quality.py report --no-docs "
                         f"--out-dir {path.parent}` first")
    return {"record": str(path.relative_to(ROOT)), "n": r["n_tokens"], "bytes_pct": 100 * r["artifact_bytes"] / r["kv_bytes"],
            "retained": f"{r['fit_config']['retain_heads']} × {r['retained_tokens']}", **{k: v[k] for k in METRICS}}


def rows() -> list[dict]:
    out = [{"set": "manuals", "document": m, "before": side(R / "defaults_retained_h100" / f"{m}_mlp_adaptive_0.24_q16.json"),
            "after": side(R / "defaults_budget_tokens_h100" / f"{m}_mlp_adaptive_0.24_q16.json")} for m in MANUALS]
    out += [{"set": "~7K tokens", "document": d, "before": side(R / b), "after": side(R / a)} for d, b, a in LONG]
    return out


def summary(rs: list[dict]) -> dict:
    """Per set: mean change of each metric (after − before) and on how many documents it improved."""
    out = {}
    for s in sorted({r["set"] for r in rs}):
        sub = [r for r in rs if r["set"] == s]
        out[s] = {k: {"mean_before": statistics.mean(r["before"][k] for r in sub),
                      "mean_after": statistics.mean(r["after"][k] for r in sub),
                      "better": sum((r["after"][k] < r["before"][k]) if k == "kl" else (r["after"][k] > r["before"][k]) for r in sub),
                      "worse": sum((r["after"][k] > r["before"][k]) if k == "kl" else (r["after"][k] < r["before"][k]) for r in sub),
                      "documents": len(sub)} for k in METRICS}
    return out


def table(rs: list[dict], summ: dict) -> str:
    lines = ["| set | document | n | before: bytes % of KV, retained | after | agreement | KL | exact match | ROUGE-L | similarity |",
             "|---|---|---:|---|---|---|---|---|---|---|"]
    for r in rs:
        b, a = r["before"], r["after"]
        cells = [f"{b[k]:.4f} → {a[k]:.4f}" if k == "kl" else f"{b[k]:.3f} → {a[k]:.3f}" for k in METRICS]
        lines.append(f"| {r['set']} | {r['document']} | {a['n']} | {b['bytes_pct']:.1f}%, {b['retained']} | "
                     f"{a['bytes_pct']:.1f}%, {a['retained']} | " + " | ".join(cells) + " |")
    for s, m in summ.items():
        cells = [f"{v['mean_before']:.4f} → {v['mean_after']:.4f} ({v['better']}↑ {v['worse']}↓)" if k == "kl"
                 else f"{v['mean_before']:.3f} → {v['mean_after']:.3f} ({v['better']}↑ {v['worse']}↓)" for k, v in m.items()]
        lines.append(f"| **{s}, mean** | ({m['kl']['documents']} documents; ↑ better, ↓ worse) | | | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["document"] for r in rs]
    for ax, k in zip(axes, ("kl", "exact_match", "semantic_similarity")):
        x = range(len(rs))
        ax.bar([i - 0.2 for i in x], [r["before"][k] for r in rs], 0.4, label="before (proportional budget, 2,048 / 45% retained)")
        ax.bar([i + 0.2 for i in x], [r["after"][k] for r in rs], 0.4, label="after (--budget-tokens 4096, all ≤ 4,096 retained)")
        ax.set_xticks(list(x), names, rotation=45, ha="right")
        ax.set_title(k.replace("_", " ") + (" (lower is better)" if k == "kl" else ""))
        ax.axvline(len(MANUALS) - 0.5, color="k", lw=0.8, ls=":")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, H100 fits: the default before and after the budget cap (ten manuals | six ~7K-token documents)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-docs", action="store_true")
    a = ap.parse_args(argv)
    rs = rows()
    summ = summary(rs)
    out = R / "budget_tokens_quality.json"
    out.write_text(json.dumps({"rows": rs, "summary": summ}, indent=1) + "\n")
    png = ROOT / "docs" / "img" / "budget_tokens_quality.png"
    plot(rs, png)
    text = table(rs, summ)
    print(text)
    if not a.no_docs:
        write_docs(ROOT / "docs" / "results.md", f"{BEGIN}\n{text}\n\n![budget cap](img/budget_tokens_quality.png)\n{END}", BEGIN, END)
    print(f"wrote {out.relative_to(ROOT)} and {png.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
