"""ONNX Runtime session config entries against a bundle's decode step on this CPU (2 threads).

Each bundle gets one ORT session per variant of `session.dynamic_block_base` (0 = ORT's default,
one static split of every parallel loop per thread; k > 0 = work handed out in shrinking blocks,
see onnxruntime's session config keys). Every round times each variant once
(reserved_slots_cpu.decode_step_ms: 40 steps after a 30-token prompt, 95 slots), so the machine's
drift falls on all alike; reported: medians and the median paired change against the default.

    python benchmarks/ort_session_knobs.py [--bundles A,B,...] [--bases 0,1,2,4,8,16] [--rounds 8]

Default bundles: the n = 512 fp32 and int4 bundles and the n = 7,000 default-budget int4 bundle that
benchmarks/ort_decode.py leaves in its work folder. Writes benchmarks/results/ort_session_knobs.json,
docs/img/ort_session_knobs.png and the docs/benchmarks.md section between the markers below.
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

from decode_cpu import machine_info, write_docs  # noqa: E402
from reserved_slots_cpu import PROMPT, STEPS, THREADS, round_robin_ms  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "ort_decode"
DEFAULT_BUNDLES = ("nectar_fp32_512_fixed", "nectar_int4_512_fixed", "nectar_int4_7000_default")
BEGIN, END = "<!-- ort_session_knobs:begin -->", "<!-- ort_session_knobs:end -->"
CAPACITY = 95


def backend(path: Path, base: int):
    import onnxruntime as ort

    from nectar_runtime.backends.ort_backend import OrtBackend, session_options
    from nectar_runtime.bundle import read_bundle

    b = read_bundle(path, verify=False)
    so = session_options(THREADS, {"session.dynamic_block_base": str(base)} if base else {})
    return OrtBackend(ort.InferenceSession(str(b.graph_path), so, providers=["CPUExecutionProvider"]), b.context_len, b.max_local_len)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundles = list(dict.fromkeys(r["bundle"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(bundles)
    bases = sorted({r["dynamic_block_base"] for r in rows})
    for i, name in enumerate(bundles):
        rs = {r["dynamic_block_base"]: r for r in rows if r["bundle"] == name}
        ax.bar([j + i * width for j in range(len(bases))], [100 * rs[b]["paired_change"] for b in bases], width, label=name)
    ax.set_xticks([j + width * (len(bundles) - 1) / 2 for j in range(len(bases))], [str(b) for b in bases])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("session.dynamic_block_base (0 = ORT default)")
    ax.set_ylabel("decode step vs default, % (paired median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", default=",".join(str(WORK / b) for b in DEFAULT_BUNDLES))
    ap.add_argument("--bases", default="0,1,2,4,8,16")
    ap.add_argument("--rounds", type=int, default=8)
    a = ap.parse_args(argv)
    bases = [int(x) for x in a.bases.split(",")]
    if bases[0] != 0:
        ap.error("--bases must start with 0 (ORT's default, the reference of the paired changes)")
    paths = [Path(p) for p in a.bundles.split(",")]
    for p in paths:
        if not (p / "manifest.json").is_file():
            ap.error(f"{p}: not a bundle (no manifest.json); run benchmarks/ort_decode.py first or pass --bundles")
    rows = []
    for p in paths:
        runs = dict(zip(bases, round_robin_ms([backend(p, b) for b in bases], CAPACITY, a.rounds)))
        for b in bases:
            rows.append({"bundle": p.name, "dynamic_block_base": b, "ms_per_step_median": statistics.median(runs[b]),
                         "paired_change": statistics.median((x - y) / y for x, y in zip(runs[b], runs[0])),
                         "faster_rounds": sum(x < y for x, y in zip(runs[b], runs[0])), "runs_ms": runs[b]})
        print(p.name, ", ".join(f"{r['dynamic_block_base']}: {r['ms_per_step_median']:.2f} ms ({100 * r['paired_change']:+.1f}%)"
                                for r in rows if r["bundle"] == p.name), flush=True)
    cmd = "python benchmarks/ort_session_knobs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import onnxruntime

    out = {"command": cmd.strip(), "date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS),
           "onnxruntime": onnxruntime.__version__, "capacity": CAPACITY, "prompt": PROMPT, "steps": STEPS, "rows": rows}
    (REPO / "benchmarks" / "results" / "ort_session_knobs.json").write_text(json.dumps(out, indent=1) + "\n")
    png = REPO / "docs" / "img" / "ort_session_knobs.png"
    plot(rows, png)
    lines = [BEGIN, "### ORT session config: `dynamic_block_base` (CPU decode)", "",
             f"Command: `{out['command']}` — {out['machine']['cpu_model']}, {THREADS} threads, onnxruntime "
             f"{out['onnxruntime']}, {out['date']}; record `benchmarks/results/ort_session_knobs.json`. One ORT session per "
             f"value, each timed once per round over {STEPS} decode steps after a {PROMPT}-token prompt ({CAPACITY} slots "
             f"reserved), {a.rounds} rounds. The runtime keeps ORT's default (0; `ort_backend.SESSION_CONFIG`).", "",
             "| bundle | dynamic_block_base | ms/step (median) | paired change vs 0 | rounds faster |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['bundle']} | {r['dynamic_block_base']} | {r['ms_per_step_median']:.2f} | {100 * r['paired_change']:+.1f}% | "
              f"{r['faster_rounds'] if r['dynamic_block_base'] else '—'} of {a.rounds} |" for r in rows]
    lines += ["", "![paired change per value](img/ort_session_knobs.png)", "", END]
    write_docs(REPO / "docs" / "benchmarks.md", "\n".join(lines), BEGIN, END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
