"""Longer documents for the fidelity check: two man-page excerpts joined into one ~7K-token document.

The manuals are 2.8K-4.5K tokens; SmolLM2's window is 8,192. A user's document may fill most of it,
where the networks must stand for twice as many keys, probes reach fewer positions past the document
and the local window left for the question and answer is short. Each pair here is one document (A's
text, a blank line, B's text) whose questions are A's then B's (ids prefixed with the manual's name),
so `benchmarks/nectar_quality.py run --manuals OUT` scores it like any manual.

    python benchmarks/long_documents.py --out /tmp/long      # writes PAIR.txt, PAIR.questions.jsonl, manifest.json
    python benchmarks/long_documents.py --report benchmarks/results/long_docs_h100
        # after nectar_quality.py run/report on them: the table of docs/results.md ("Longer documents"),
        # benchmarks/results/long_documents.json and docs/img/long_documents.png

Pairs (fixed, chosen by length only: as long as fits with >= 600 local tokens): jq + sed and curl + make
(development manuals), journalctl + tar (held-out manuals, benchmarks/heldout); since 2026-11-25 also
tmux + sed, ssh + make and xargs + journalctl (6.9K-7.2K tokens), to test the budget cap on more documents.
`--pairs a_b,c_d` picks some of them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("jq", "sed"), ("journalctl", "tar"), ("curl", "make"), ("tmux", "sed"), ("ssh", "make"), ("xargs", "journalctl"))


def join_pair(dirs: list[Path], a: str, b: str, out: Path) -> dict:
    """Write `{a}_{b}.txt` and its questions into `out`; returns the manifest entry."""
    def find(name: str, suffix: str) -> Path:
        for d in dirs:
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
        raise SystemExit(f"{name}{suffix}: not found in {', '.join(map(str, dirs))}")

    text = find(a, ".txt").read_text("utf-8").rstrip("\n") + "\n\n" + find(b, ".txt").read_text("utf-8")
    name = f"{a}_{b}"
    (out / f"{name}.txt").write_text(text, "utf-8")
    lines = []
    for m in (a, b):
        for line in find(m, ".questions.jsonl").read_text("utf-8").splitlines():
            if line.strip():
                q = json.loads(line)
                lines.append(json.dumps({**q, "id": f"{m}:{q.get('id', len(lines))}"}))
    (out / f"{name}.questions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    return {"name": name, "file": f"{name}.txt", "parts": [a, b], "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "questions": len(lines)}


METRICS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")


def setting(rec: dict) -> str:
    """A record's setting: the retained tokens per head and, when set, the MB budget."""
    fc = rec["fit_config"]
    budget = f"--budget-mb {fc['budget_mb']:g}" if fc.get("budget_mb") else "default budget"
    return f"{budget}, {fc['retain_heads']} × {fc['retain_tokens']} retained"


def report(records_dir: Path) -> int:
    """Markdown table (stdout), JSON and PNG of the nectar_quality records in `records_dir`."""
    recs = sorted((json.loads(p.read_text()) for p in records_dir.glob("*.json")),
                  key=lambda r: (r["manual"], r["fit_config"].get("budget_mb") or 1e9, r["fit_config"]["retain_tokens"]))
    rows = []
    print("| document | n | setting | bytes % of KV | method | " + " | ".join(METRICS) + " |")
    print("|---|---:|---|---:|---|" + "---:|" * len(METRICS))
    for r in recs:
        share = 100 * r["artifact_bytes"] / r["kv_bytes"]
        baselines = not r["fit_config"].get("budget_mb") and r["fit_config"]["retain_tokens"] == 2048
        for m in ("nectar", "streaming", "none") if baselines else ("nectar",):
            v = r["methods"][m]
            rows.append({"document": r["manual"], "n": r["n_tokens"], "setting": setting(r), "bytes_share": share,
                         "method": m, **{k: v[k] for k in METRICS}})
            print(f"| {r['manual']} | {r['n_tokens']} | {setting(r)} | {share:.1f} | {m} | "
                  + " | ".join("-" if v[k] is None else f"{v[k]:.4f}" if k == "kl" else f"{v[k]:.3f}" for k in METRICS) + " |")
    out = ROOT / "benchmarks" / "results" / "long_documents.json"
    out.write_text(json.dumps({"records": str(records_dir), "rows": rows}, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for doc in sorted({r["document"] for r in rows}):
        pts = sorted((r["bytes_share"], r["agreement"], r["kl"], r["setting"]) for r in rows
                     if r["document"] == doc and r["method"] == "nectar")
        for ax, i in ((axes[0], 1), (axes[1], 2)):
            ax.plot([p[0] for p in pts if "2048" in p[3]], [p[i] for p in pts if "2048" in p[3]], "o-", label=f"{doc}, 2,048 tokens")
            more = [p for p in pts if "2048" not in p[3]]
            ax.plot([p[0] for p in more], [p[i] for p in more], "s", label=f"{doc}, 45%+ of n")
    axes[0].set_ylabel("next-token agreement")
    axes[1].set_ylabel("KL(full ‖ nectar)")
    for ax in axes:
        ax.set_xlabel("artifact bytes, % of the document's fp16 KV")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, ~7.3K-token documents: artifact size and retained tokens")
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "img" / "long_documents.png", dpi=110)
    print(f"wrote {out} and docs/img/long_documents.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the documents here")
    ap.add_argument("--report", default=None, metavar="RECORDS_DIR", help="summarize nectar_quality records instead")
    ap.add_argument("--manuals", default=str(ROOT.parent / "shared" / "data" / "manuals"))
    ap.add_argument("--heldout", default=str(ROOT / "benchmarks" / "heldout"))
    ap.add_argument("--pairs", default=None, help="comma-separated pair names (a_b); default: all")
    a = ap.parse_args(argv)
    if a.report:
        return report(Path(a.report))
    if not a.out:
        ap.error("--out or --report")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = PAIRS
    if a.pairs:
        known = {f"{x}_{y}": (x, y) for x, y in PAIRS}
        unknown = [p for p in a.pairs.split(",") if p not in known]
        if unknown:
            ap.error(f"--pairs: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        pairs = [known[p] for p in a.pairs.split(",")]
    docs = [join_pair([Path(a.manuals), Path(a.heldout)], x, y, out) for x, y in pairs]
    (out / "manifest.json").write_text(json.dumps({"set": "long", "description": __doc__.split("\n")[0],
                                                   "documents": docs}, indent=2) + "\n")
    for d in docs:
        print(f"{d['file']}: {d['chars']} chars, {d['questions']} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
