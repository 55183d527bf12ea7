"""Decode cost of bundles by the number of past slots reserved, on this CPU (ONNX Runtime, 2 threads).

A step of a bundle's graph reads every past slot bound to it, used or not. This times 40 decode
steps after a 30-token prompt at each reserved capacity, every bundle and capacity once per round
(round-robin, so drift of this noisy machine falls on all alike), and reports per-round values and
medians. `--page` sets the backend's page (ort_backend.PAGE): a page at least the capacity binds
the whole reservation at once, which isolates the graph's own cost per slot (used to compare graph
forms); the default keeps the backend's paging.

    python benchmarks/reserved_slots_cpu.py --bundles A,B --capacities 95,300 [--rounds 4] [--page 100000] --name NAME

Writes benchmarks/results/reserved_slots_cpu_NAME.json and prints the medians.
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
THREADS, PROMPT, STEPS = 2, 30, 40


def decode_step_ms(be, capacity: int) -> float:
    """ms per decode step of an OrtBackend: `STEPS` steps (a fixed token) after a `PROMPT`-token
    prompt, `capacity` slots reserved."""
    be.reset(1, capacity)
    n = be.context_len
    be.step(np.ones((1, PROMPT), np.int64), np.arange(n, n + PROMPT)[None])
    t0 = time.perf_counter()
    for s in range(STEPS):
        be.step(np.array([[42]]), np.array([[n + PROMPT + s]]))
    return 1e3 * (time.perf_counter() - t0) / STEPS


def round_robin_ms(backends: list, capacity: int, rounds: int) -> list[list[float]]:
    """decode_step_ms per backend and round, every backend once per round so the machine's drift
    falls on all alike (one extra round first warms up, untimed)."""
    runs = [[] for _ in backends]
    for r in range(rounds + 1):
        for i, be in enumerate(backends):
            ms = decode_step_ms(be, capacity)
            if r:
                runs[i].append(ms)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True)
    ap.add_argument("--capacities", default="95,300")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--page", type=int, default=None, help="ort_backend.PAGE for this run (default: the backend's)")
    ap.add_argument("--name", required=True)
    a = ap.parse_args(argv)
    from nectar_runtime.backends import ort_backend
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.bundle import read_bundle

    if a.page:
        ort_backend.PAGE = a.page
    paths = a.bundles.split(",")
    caps = [int(c) for c in a.capacities.split(",")]
    backends = {p: OrtBackend.from_bundle(read_bundle(p, verify=False), threads=THREADS, provider="cpu") for p in paths}
    runs: dict[str, dict[int, list[float]]] = {p: {c: [] for c in caps} for p in paths}
    for r in range(-1, a.rounds):  # round -1 warms up, untimed
        for p, be in backends.items():
            for cap in caps:
                ms = decode_step_ms(be, cap)
                if r >= 0:
                    runs[p][cap].append(ms)
    first = runs[paths[0]]
    rows = [{"bundle": p, "capacity": c, "ms_per_token_median": statistics.median(v), "runs_ms": v,
             # same round, same capacity: drift of the machine cancels
             "paired_ms_minus_first": statistics.median(x - y for x, y in zip(v, first[c]))}
            for p in paths for c, v in runs[p].items()]
    cmd = "python benchmarks/reserved_slots_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "threads": THREADS, "prompt_tokens": PROMPT, "steps": STEPS,
           "page": ort_backend.PAGE, "rows": rows}
    path = ROOT / "benchmarks" / "results" / f"reserved_slots_cpu_{a.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for row in rows:
        print(f"{Path(row['bundle']).name:45s} capacity {row['capacity']:5d}: {row['ms_per_token_median']:.2f} ms/token "
              f"(rounds: {' '.join(f'{x:.2f}' for x in row['runs_ms'])}; paired minus the first bundle {row['paired_ms_minus_first']:+.2f})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
