"""A/B of the block sizes of a quantized bundle's 8-bit Nectar parts on this CPU: the heads weights'
blocks (`ExportConfig.heads_block`, bundle.HEADS_BLOCK) and the retained values' blocks
(retained_graph.NBITS_VALUE_BLOCK, set here per variant), in decode time and fidelity.

One artifact (default: the n = 7,000 default-budget artifact benchmarks/ort_decode.py leaves in its
work folder) is exported as int4 once per variant `HEADS_BLOCK:VALUE_BLOCK`. Then:
  * fidelity: top-1 agreement and mean KL(fp32 ‖ variant) against the artifact's fp32 bundle,
    teacher-forced over the full-context fp32 bundle's greedy answers to the first manual's
    questions (benchmarks/quant_quality.py's comparison);
  * decode time: reserved_slots_cpu.decode_step_ms (40 steps after a 30-token prompt, 95 slots), every
    variant once per round, round-robin; medians and the paired difference to the first variant.

    python benchmarks/heads_block_ab.py [--variants 32:32,64:32,128:32,64:64] [--rounds 8] [--questions 12]

Writes benchmarks/results/heads_block_ab.json and the docs/benchmarks.md section between
`<!-- heads_block_ab:begin -->` and `<!-- heads_block_ab:end -->`.
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
from decode_cpu import machine_info, write_docs  # noqa: E402
from reserved_slots_cpu import STEPS, THREADS, round_robin_ms  # noqa: E402

WORK = REPO / "benchmarks" / "work" / "ort_decode"
BEGIN, END = "<!-- heads_block_ab:begin -->", "<!-- heads_block_ab:end -->"
CAPACITY = 95  # the prompt + STEPS + room: ort_decode.py's reservation


def export_variant(art: Path, out: Path, heads_block: int, value_block: int) -> Path:
    from nectar_export.export import retained_graph
    from nectar_export.export.bundle import ExportConfig, export_onnx_bundle

    default = retained_graph.NBITS_VALUE_BLOCK
    retained_graph.NBITS_VALUE_BLOCK = value_block  # read by retained_columns while the graph is written
    try:
        return export_onnx_bundle(art, out, ExportConfig(quantize="int4", heads_block=heads_block), log=lambda *_: None)
    finally:
        retained_graph.NBITS_VALUE_BLOCK = default


def time_round_robin(paths: list[Path], rounds: int) -> list[list[float]]:
    """ms per decode step, per bundle and round (reserved_slots_cpu.round_robin_ms, CAPACITY slots)."""
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.bundle import read_bundle

    backends = [OrtBackend.from_bundle(read_bundle(p, verify=False), threads=THREADS, provider="cpu") for p in paths]
    return round_robin_ms(backends, CAPACITY, rounds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=str(WORK / "art_7000_default"))
    ap.add_argument("--fp32", default=str(WORK / "nectar_fp32_7000_default"), help="the artifact's fp32 bundle")
    ap.add_argument("--full", default=str(WORK / "full_fp32_7000"), help="full-context fp32 bundle of the same document")
    ap.add_argument("--variants", default="32:32,64:32,128:32,64:64")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--questions", type=int, default=12)
    a = ap.parse_args(argv)
    work = REPO / "benchmarks" / "work" / "heads_block_ab"
    variants = [tuple(int(x) for x in v.split(":")) for v in a.variants.split(",")]
    paths = []
    for hb, vb in variants:
        print(f"exporting heads blocks {hb}, retained value blocks {vb} …", flush=True)
        paths.append(export_variant(Path(a.artifact), work / f"int4_hb{hb}_vb{vb}", hb, vb))
    manual = sorted(quant_quality.MANUALS.glob("*.txt"))[0]
    qs = [json.loads(x)["question"] for x in manual.with_suffix(".questions.jsonl").read_text().splitlines() if x.strip()]
    answers = quant_quality.reference_answers(Path(a.full), qs[: a.questions], 64)
    fidelity = []
    for p in paths:
        fidelity.append(quant_quality.compare(Path(a.fp32), p, answers))
        print(f"{p.name}: {fidelity[-1]}", flush=True)
    runs = time_round_robin(paths, a.rounds)
    rows = []
    for (hb, vb), p, fid, ms in zip(variants, paths, fidelity, runs):
        rows.append({"heads_block": hb, "value_block": vb, "bundle": str(p.relative_to(REPO)), **fid,
                     "ms_per_token_median": statistics.median(ms), "runs_ms": ms,
                     "paired_ms_minus_first": statistics.median(x - y for x, y in zip(ms, runs[0]))})
    cmd = "python benchmarks/heads_block_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": cmd, "date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS), "artifact": a.artifact,
           "manual": manual.name, "rows": rows}
    (REPO / "benchmarks" / "results" / "heads_block_ab.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [BEGIN, "### Larger blocks for the 8-bit heads (CPU decode)", "",
             f"Command: `{cmd.strip()}` — {out['machine']['cpu_model']}, {THREADS} threads, {out['date']}; record "
             "`benchmarks/results/heads_block_ab.json`. The n = 7,000 default-budget artifact of `ort_decode.py` "
             "(36.1 MB: heads + 18 retained heads' int8 KV) exported as int4 with the heads' 8-bit weights and the "
             "retained values in blocks of the sizes below. Fidelity against the artifact's fp32 bundle, teacher-forced "
             f"over the full-context answers to the first {a.questions} questions of {manual.name}; decode time over "
             f"{STEPS} steps with {CAPACITY} slots reserved, every variant once per round, {a.rounds} rounds.", "",
             "| heads blocks | retained value blocks | top-1 agreement | mean KL(fp32 ‖ int4) | answer tokens | ms/token (median) | paired vs first |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['heads_block']} | {r['value_block']} | {r['agreement']:.3f} | {r['kl']:.5f} | {r['tokens']} | "
              f"{r['ms_per_token_median']:.2f} | {r['paired_ms_minus_first']:+.2f} ms |" for r in rows]
    lines += ["", END]
    write_docs(REPO / "docs" / "benchmarks.md", "\n".join(lines), BEGIN, END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
