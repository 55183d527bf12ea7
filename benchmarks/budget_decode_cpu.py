"""CPU decode cost of int4 bundles by artifact size at one document length, against llama.cpp.

The default budget is 24% of the document's fp16 KV, so at n = 7,000 the artifact (networks + retained
KV) is ~36 MB, read at every token. This times bundles of the same document exported from artifacts of
other sizes (`nectar fit --budget-mb B`, `--retain-tokens M`), round-robin (`ort_decode.time_bundles`),
and llama.cpp (same GGUF, same prompt, 2 threads, flash attention off: its faster setting here) in
the same run, so the ratios hold within one machine state.

    python benchmarks/budget_decode_cpu.py --bundles DIR1,DIR2,... --name 7000
    (writes benchmarks/results/budget_decode_cpu_NAME.json and prints a markdown table)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ort_decode import QUESTION, THREADS, time_bundles, time_llama_cpp  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True, help="comma-separated bundle directories (one document)")
    ap.add_argument("--gguf", default=None, help="the GGUF for llama.cpp (default: the pulled SmolLM2)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--llama-repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from nectar_runtime.bundle import read_bundle
    from nectar_runtime.document import local_ids, make_context
    from nectar_runtime.hub import resolve_model
    from nectar_runtime.tokenizer import load_tokenizer

    paths = [Path(p) for p in a.bundles.split(",")]
    docs = {(p / "document.txt").read_bytes() for p in paths}
    if len(docs) != 1:
        raise SystemExit("the bundles must hold the same document")
    rows = time_bundles(paths, a.steps, a.repeats)
    for p, r in zip(paths, rows):
        m = read_bundle(p, verify=False).manifest
        r["artifact_mb"] = m["artifact"]["artifact_bytes"] / 1e6
        r["kv_share"] = m["artifact"]["artifact_bytes"] / m["artifact"]["kv_bytes"]
    gguf = Path(a.gguf) if a.gguf else resolve_model(None, pull_missing=False)
    tok = load_tokenizer(paths[0])
    ctx = make_context(tok, (paths[0] / "document.txt").read_text("utf-8"), 8192, reserve=0)
    ids = list(ctx.context_ids) + local_ids(ctx, tok, [{"role": "user", "content": QUESTION}])
    llama = time_llama_cpp(gguf, ids, a.steps, a.llama_repeats, flash=False)
    out = {"command": "python benchmarks/budget_decode_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "threads": THREADS,
           "n": ctx.n, "bundles": rows, "llama_cpp": {k: v for k, v in llama.items() if k != "greedy_tokens"}}
    path = ROOT / "benchmarks" / "results" / f"budget_decode_cpu_{a.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"| bundle | artifact MB (% of KV) | ms/token (median) | tok/s | vs llama.cpp ({llama['tokens_per_s']:.1f} tok/s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bundle']} | {r['artifact_mb']:.1f} ({100 * r['kv_share']:.1f}%) | {r['ms_per_token_median']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / llama['tokens_per_s']:.2f}× |")
    print(f"llama.cpp runs: {[round(x['tokens_per_s'], 1) for x in llama['runs']]}; "
          f"bundle runs spread: {[round(statistics.pstdev([x['tokens_per_s'] for x in r['runs']]), 1) for r in rows]}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
