"""Wall time of `nectar fit` with default settings, per stage, on this machine.

    python benchmarks/fit_time.py --doc ../shared/data/manuals/grep.txt [--device cpu] [--threads 2]

Writes benchmarks/results/fit_time_<device>.json and the section between
`<!-- fit_time_<device>:begin -->` / `end` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nectar_profiling.ort_runner import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", default=str(ROOT.parent / "shared" / "data" / "manuals" / "grep.txt"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-s", type=float, default=900.0, help="the goal to compare against (default 15 min)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "art"
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        cmd = [sys.executable, "-m", "nectar_runtime.cli", "fit", a.doc, "--out", str(art), "--device", a.device]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - t
        m = json.loads((art / "manifest.json").read_text())
    device = "cuda" if a.device.startswith("cuda") else "cpu"
    rec = {
        "command": "nectar fit " + Path(a.doc).name + f" --device {a.device}",
        "doc": Path(a.doc).name, "n_tokens": m["document"]["n_tokens"], "device": device,
        "machine": cpu_name() if device == "cpu" else "GPU", "threads": a.threads,
        "wall_s": round(wall, 1), "stages_s": m["timings_s"], "target_s": a.target_s,
        "met": wall <= a.target_s, "allocation": m["allocation"], "steps": m["fit_config"]["steps"],
        "artifact_bytes": m["artifact_bytes"], "kv_bytes": m["kv_bytes"],
        "heldout_o_rel_error_mean": sum(m["metrics"]["heldout"]["o_rel_error"]) / len(m["metrics"]["heldout"]["o_rel_error"]),
    }
    out = ROOT / "benchmarks" / "results" / f"fit_time_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in rec["stages_s"].items())
    block = f"""<!-- fit_time_{device}:begin -->
## `nectar fit` wall time ({device})

Command: `python benchmarks/fit_time.py --doc {rec['doc']} --device {a.device} --threads {a.threads}`
(default settings: {rec['allocation']} allocation, {rec['steps']} steps). Machine: {rec['machine']}, {a.threads} threads.
Document: {rec['doc']}, n = {rec['n_tokens']} tokens.

| stage | seconds |
|---|---|
{rows}
| **total (wall, incl. model load)** | **{rec['wall_s']:.1f}** |

Goal ≤ {a.target_s:.0f} s: **{'met' if rec['met'] else 'missed'}**{'' if rec['met'] else f" by {rec['wall_s'] - a.target_s:.0f} s"}.
<!-- fit_time_{device}:end -->"""
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    b, e = f"<!-- fit_time_{device}:begin -->", f"<!-- fit_time_{device}:end -->"
    text = text[: text.index(b)] + block + text[text.index(e) + len(e):] if b in text else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
