"""What binding the past in pages saves a `nectar run` / `nectar chat` decode on this CPU.

The graph reads every bound past slot, used or not. `nectar run` reserves the prompt plus
`--max-new-tokens` (256 by default) slots; the ORT backend binds them in pages of
`ort_backend.PAGE` as the tokens fill them. This times G greedy tokens after the benchmark question
with that reservation, paged (PAGE = 64) and with one page holding the whole reservation (what
the backend did before pages), the two alternating in every round, for each bundle given.

    python benchmarks/past_pages_cpu.py --bundles DIR1,DIR2 [--steps 64] [--max-new-tokens 256] [--repeats 6]

Writes benchmarks/results/past_pages_cpu.json, docs/img/past_pages_cpu.png and the docs/benchmarks.md
section between `<!-- past_pages_cpu:begin -->` and `<!-- past_pages_cpu:end -->`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_cpu import machine_info, write_docs  # noqa: E402
from ort_decode import THREADS, BundleTimer  # noqa: E402

BEGIN, END = "<!-- past_pages_cpu:begin -->", "<!-- past_pages_cpu:end -->"


def time_decode(timer: BundleTimer, steps: int, capacity: int, page: int) -> float:
    """ms per token (median) of `steps` greedy tokens with `capacity` slots reserved, pages of `page`."""
    from nectar_runtime.backends import ort_backend

    ort_backend.PAGE = page
    be, n, prompt = timer.be, timer.b.context_len, timer.prompt
    be.reset(1, capacity)
    logits = be.step(np.array([prompt]), n + np.arange(len(prompt))[None])
    stamps = [time.perf_counter()]
    for i in range(steps):
        logits = be.step(np.array([[int(logits[0].argmax())]]), np.array([[n + len(prompt) + i]]))
        stamps.append(time.perf_counter())
    return 1000 * statistics.median(np.diff(stamps))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    y = np.arange(len(rows))
    ax.barh(y + 0.2, [r["one_page_ms"] for r in rows], 0.4, label="one page (the whole reservation)")
    ax.barh(y - 0.2, [r["paged_ms"] for r in rows], 0.4, label="pages of 64 slots")
    ax.set_yticks(y, [r["bundle"] for r in rows])
    ax.set_xlabel("ms per decode token (median of rounds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True, help="comma-separated bundle directories")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the reservation beyond the prompt (nectar run's default)")
    ap.add_argument("--repeats", type=int, default=6)
    a = ap.parse_args(argv)
    from nectar_runtime.backends.ort_backend import PAGE

    timers = [BundleTimer(Path(p)) for p in a.bundles.split(",")]
    runs: dict[tuple[str, str], list[float]] = {}
    for r in range(-1, a.repeats):  # round -1: warm-up, untimed
        for t in timers:
            cap = len(t.prompt) + a.max_new_tokens - 1
            for form, page in ((("paged", PAGE), ("one_page", cap)) if r % 2 else (("one_page", cap), ("paged", PAGE))):
                ms = time_decode(t, a.steps, cap, page)
                if r >= 0:
                    runs.setdefault((t.path.name, form), []).append(ms)
        if r >= 0:
            print(f"round {r + 1}/{a.repeats}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.2f}" for k, v in runs.items()), flush=True)
    rows = []
    for t in timers:
        p, o = runs[(t.path.name, "paged")], runs[(t.path.name, "one_page")]
        rows.append({"bundle": t.path.name, "n": t.b.context_len, "prompt_tokens": len(t.prompt),
                     "reserved_slots": len(t.prompt) + a.max_new_tokens - 1, "paged_ms": statistics.median(p),
                     "one_page_ms": statistics.median(o), "paired_saving": statistics.median(1 - x / y for x, y in zip(p, o)),
                     "paged_runs_ms": p, "one_page_runs_ms": o})
    cmd = "python benchmarks/past_pages_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS), "page": PAGE,
           "steps": a.steps, "max_new_tokens": a.max_new_tokens, "rows": rows}
    (ROOT / "benchmarks" / "results" / "past_pages_cpu.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(rows, ROOT / "docs" / "img" / "past_pages_cpu.png")
    lines = [
        BEGIN,
        "## The past bound in pages (CPU decode)",
        "",
        f"Command: `{cmd}` — {out['machine']['cpu_model']}, {THREADS} threads, {out['date']}; record "
        "`benchmarks/results/past_pages_cpu.json`. Each round times "
        f"{a.steps} greedy tokens after the benchmark question with the prompt + {a.max_new_tokens} − 1 slots "
        f"that `nectar run` reserves, bound in pages of {PAGE} slots and as one page (the backend before pages), "
        "the two alternating in every round; medians over "
        f"{a.repeats} rounds.",
        "",
        "| bundle | n | reserved slots | one page ms/token | pages ms/token | paired saving |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['bundle']} | {r['n']} | {r['reserved_slots']} | {r['one_page_ms']:.2f} | {r['paged_ms']:.2f} | "
              f"{100 * r['paired_saving']:.1f}% |" for r in rows]
    lines += ["", "![ms per token, paged vs one page](img/past_pages_cpu.png)", "", END]
    write_docs(ROOT / "docs" / "benchmarks.md", "\n".join(lines), BEGIN, END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
