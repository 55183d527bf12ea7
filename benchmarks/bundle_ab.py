"""Paired A/B of bundles of one artifact on this CPU (ONNX Runtime, 2 threads): decode time and
fidelity to the artifact's fp32 bundle. For comparing two ways of writing the same graph, e.g. a
bundle exported by an older commit (`git worktree add OLD <commit>`, then export there with
`PYTHONPATH=OLD`) against one exported now.

  * fidelity: top-1 agreement and mean KL(fp32 ‖ bundle), teacher-forced over the full-context
    fp32 bundle's greedy answers to the first `--questions` questions of the manual the document
    starts with (benchmarks/quant_quality.py's comparison);
  * decode time: reserved_slots_cpu.decode_step_ms (40 steps after a 30-token prompt, 95 slots),
    every bundle once per round, round-robin; medians and the paired change against the first.

    python benchmarks/bundle_ab.py --bundles A,B[,...] --fp32 FP32_BUNDLE --full FULL_BUNDLE --name NAME [--rounds 10]

Writes benchmarks/results/bundle_ab_NAME.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import quant_quality  # noqa: E402
from decode_cpu import machine_info  # noqa: E402
from heads_block_ab import CAPACITY, time_round_robin  # noqa: E402
from reserved_slots_cpu import PROMPT, STEPS, THREADS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True, help="comma-separated bundle folders; the first is the reference")
    ap.add_argument("--fp32", required=True, help="the artifact's fp32 bundle")
    ap.add_argument("--full", required=True, help="full-context fp32 bundle of the same document")
    ap.add_argument("--name", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--questions", type=int, default=12)
    a = ap.parse_args(argv)
    paths = [Path(p) for p in a.bundles.split(",")]
    for p in paths + [Path(a.fp32), Path(a.full)]:
        if not (p / "manifest.json").is_file():
            ap.error(f"{p}: not a bundle (no manifest.json)")
    manual = sorted(quant_quality.MANUALS.glob("*.txt"))[0]
    qs = [json.loads(x)["question"] for x in manual.with_suffix(".questions.jsonl").read_text().splitlines() if x.strip()]
    answers = quant_quality.reference_answers(Path(a.full), qs[: a.questions], 64)
    fidelity = [quant_quality.compare(Path(a.fp32), p, answers) for p in paths]
    runs = time_round_robin(paths, a.rounds)
    rows = [{"bundle": str(p), "bundle_bytes": sum(f.stat().st_size for f in p.iterdir()), **fid,
             "ms_per_step_median": statistics.median(ms), "runs_ms": ms,
             "paired_ms_vs_first": statistics.median(x - y for x, y in zip(ms, runs[0])),
             "faster_rounds_than_first": sum(x < y for x, y in zip(ms, runs[0]))}
            for p, fid, ms in zip(paths, fidelity, runs)]
    cmd = "python benchmarks/bundle_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd.strip(), "date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS), "manual": manual.name,
           "capacity": CAPACITY, "prompt": PROMPT, "steps": STEPS, "rounds": a.rounds, "rows": rows}
    (REPO / "benchmarks" / "results" / f"bundle_ab_{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    print("| bundle | MB | top-1 vs fp32 | KL(fp32 ‖ bundle) | ms/step (median) | paired vs first | rounds faster |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {Path(r['bundle']).name} | {r['bundle_bytes'] / 1e6:.1f} | {r['agreement']:.3f} | {r['kl']:.5f} | "
              f"{r['ms_per_step_median']:.2f} | {r['paired_ms_vs_first']:+.2f} ms | {r['faster_rounds_than_first']} of {a.rounds} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
