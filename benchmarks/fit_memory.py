"""Peak resident memory of `nectar fit` on a CPU, per stage.

A thread samples the process's resident set size (VmRSS) every 50 ms while `fit_document` runs
with the default probes; each sample is charged to the stage the fit has announced last
(`fit heads` is split further into building the training data and training, for the allocation
probe and for the final fit).

    python benchmarks/fit_memory.py DOC [--steps 60] [--query-dtype float16|float32] [--probe-scale K]

The training step count does not change the memory (the data are built before training); a small
--steps keeps the run short. Writes benchmarks/results/fit_memory_cpu.json and the docs/benchmarks.md
section between `<!-- fit_memory:begin -->` and `<!-- fit_memory:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- fit_memory:begin -->", "<!-- fit_memory:end -->"


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def measure(doc: str, steps: int, query_dtype: str = "float16", probe_scale: float = 1.0) -> dict:
    import torch

    import nectar_export.fit as fit
    from nectar_export.config import FitConfig
    from nectar_export.pipeline import fit_document, load_base
    from nectar_export.probes import ProbeConfig

    stage, peaks, stop = ["load model"], {}, threading.Event()

    def sample():
        while not stop.is_set():
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), rss_gb())
            time.sleep(0.05)

    builds = [0]
    original = fit.build_heads

    def build_heads(*a, **k):  # label the fit's sub-stages
        builds[0] += 1
        which = "allocation probe" if builds[0] == 1 else "final fit"
        stage[0] = f"fit heads: {which}, training data"
        out = original(*a, **k)
        stage[0] = f"fit heads: {which}, training"
        return out

    def log(s: str) -> None:
        if s.endswith("…"):
            stage[0] = s.split("] ", 1)[1].rstrip(" …")

    threading.Thread(target=sample, daemon=True).start()
    fit.build_heads = build_heads
    try:
        torch.manual_seed(0)
        base = load_base(None)
        with tempfile.TemporaryDirectory() as d:
            m = fit_document(base, doc, Path(d) / "art", FitConfig(steps=steps, query_dtype=query_dtype),
                             ProbeConfig().scaled(probe_scale), progress=False, log=log)
    finally:
        fit.build_heads = original
        stop.set()
    time.sleep(0.1)
    return {"document": Path(doc).name, "n_tokens": m["document"]["n_tokens"], "steps": steps,
            "query_dtype": query_dtype, "probe_scale": probe_scale,
            "probe_tokens": {k: v.get("tokens") for k, v in m["probes"].items()},
            "peak_gb_by_stage": {k: round(v, 2) for k, v in peaks.items()}, "peak_gb": round(max(peaks.values()), 2),
            "heldout_o_rel_error_mean": sum(m["metrics"]["heldout"]["o_rel_error"]) / len(m["metrics"]["heldout"]["o_rel_error"])}


def docs_section(rep: dict, before: dict | None = None) -> str:
    """The docs table; `before`: a record with fp32-stored queries, shown side by side."""
    probes = "default probes" if rep["probe_scale"] == 1 else f"{rep['probe_scale']:g}× probes"
    bits = rep["query_dtype"].removeprefix("float")
    lines = [BEGIN, "### Memory of a CPU fit", "",
             f"Command: `python benchmarks/fit_memory.py {rep['argv']}` — {rep['date']}, {rep['document']} "
             f"(n = {rep['n_tokens']} tokens), {probes} ({rep['probe_tokens']['train']:,} training + "
             f"{rep['probe_tokens']['heldout']:,} held-out probe tokens), {rep['steps']} training steps (memory does not "
             f"depend on them), queries and attention outputs stored in {bits} bits. Peak resident set size per stage"
             + (f", next to the same fit with {before['query_dtype'].removeprefix('float')}-bit storage "
                f"(`{before['argv']}`, {before['date']}{', the code before this option' if 'query-dtype' not in before['argv'] else ''}):"
                if before else ":"), ""]
    if before:
        lines += [f"| stage | peak RSS GB, {bits}-bit | peak RSS GB, {before['query_dtype'].removeprefix('float')}-bit |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {before['peak_gb_by_stage'].get(k, float('nan')):.2f} |"
                  for k, v in rep["peak_gb_by_stage"].items()]
        lines += ["", f"Peak: **{rep['peak_gb']:.2f} GB** ({before['peak_gb']:.2f} GB with "
                  f"{before['query_dtype'].removeprefix('float')}-bit storage)."]
    else:
        lines += ["| stage | peak RSS GB |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in rep["peak_gb_by_stage"].items()]
        lines += ["", f"Peak: **{rep['peak_gb']:.2f} GB**."]
    lines += ["The recorded queries and targets (every probe token, every layer, q and o) are the largest part; they scale with "
              "the probe set, not with the document.", "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("document", metavar="DOC")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--query-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--probe-scale", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fit_memory_cpu.json"))
    p.add_argument("--before", default=str(ROOT / "benchmarks" / "results" / "fit_memory_cpu_fp32_queries.json"),
                   help="an earlier record to show side by side (skipped when missing or of another probe set)")
    a = p.parse_args(argv)
    rep = measure(a.document, a.steps, a.query_dtype, a.probe_scale)
    extra = (f" --query-dtype {a.query_dtype}" if a.query_dtype != "float16" else "") + \
        (f" --probe-scale {a.probe_scale:g}" if a.probe_scale != 1 else "")
    rep.update(date=time.strftime("%Y-%m-%d"), argv=f"{Path(a.document).name} --steps {a.steps}{extra}")
    Path(a.out).write_text(json.dumps(rep, indent=1))
    before = json.loads(Path(a.before).read_text()) if a.before and Path(a.before).is_file() else None
    if before is not None:
        before.setdefault("query_dtype", "float32")  # records from before the option
        before.setdefault("probe_scale", 1.0)
        if (before["document"], before["probe_scale"]) != (rep["document"], rep["probe_scale"]):
            before = None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode_cpu import write_docs

    write_docs(ROOT / "docs" / "benchmarks.md", docs_section(rep, before), BEGIN, END)
    print(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
