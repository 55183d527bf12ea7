"""CPU decode cost of int4 bundles by artifact size at one document length, against llama.cpp.

Until 2026-11-25 the default budget was 24% of the document's fp16 KV, so at n = 7,000 the artifact (networks +
retained KV) was ~36 MB, read at every token; since then it is capped at a 4,096-token document's (~20.5 MB). This times bundles of the same document exported from artifacts of
other sizes (`nectar fit --budget-mb B`, `--retain-tokens M`) and llama.cpp (same GGUF, same prompt,
2 threads, flash attention off and on: which is faster depends on the CPU) round-robin: every round
times each bundle and each llama.cpp setting once, the order rotating round by round, so a slow spell of
the machine falls on all of them alike. The paired ratios are to llama.cpp's faster setting by median,
its run of the same round; the record also has the ratio to each round's faster setting (a bound biased
towards llama.cpp). Every timed run starts after `--settle` seconds of idle (default 1): both engines'
threads keep spinning for a while after a run, and without the pause the engine timed next ran slower
(measured: llama.cpp with flash attention off 31 against 37–39 tok/s at n = 7,000; the first bundle of a
round 0.3–0.9 ms per token slower; docs/benchmarks.md). llama.cpp prefills the document once (untimed);
each of its rounds reuses that prefix (llama-cpp-python's prefix match) and times the decode alone, as
the bundles' rounds do.

    python benchmarks/budget_decode_cpu.py --bundles DIR1,DIR2,... --name 7000
    python benchmarks/budget_decode_cpu.py --bundles FP32,INT8,INT4 --name 512_quant   # also: paired ratio to the first
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from ort_decode import QUESTION, THREADS, BundleTimer  # noqa: E402


class LlamaTimer:
    """llama.cpp greedy decode after the document + question, the prompt prefilled once."""

    def __init__(self, gguf: Path, ids: list[int], flash_attn: bool = False):
        import llama_cpp
        from llama_cpp import Llama

        self.version, self.ids, self.flash_attn = llama_cpp.__version__, ids, flash_attn
        self.llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 128, n_threads=THREADS, n_threads_batch=THREADS,
                         n_batch=512, flash_attn=flash_attn, verbose=False)
        self.runs, self.tokens = [], None

    def run_once(self, steps: int, keep: bool = True) -> None:
        stamps, toks = [], []
        for t in self.llm.generate(self.ids, top_k=1, temp=0.0, reset=True):  # the prompt's KV is reused after run 1
            stamps.append(time.perf_counter())
            toks.append(t)
            if len(toks) == steps + 1:
                break
        if keep:
            self.runs.append({"tokens_per_s": steps / (stamps[-1] - stamps[0]),
                              "ms_per_token_median": 1000 * statistics.median(np.diff(stamps))})
        if self.tokens is not None and toks != self.tokens:
            raise SystemExit("llama.cpp: a run with the reused prefix gave other greedy tokens than the first")
        self.tokens = toks

    def result(self) -> dict:
        fa = "on" if self.flash_attn else "off"
        return {"engine": f"llama.cpp (llama-cpp-python {self.version}, flash_attn={fa})", "runs": self.runs,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in self.runs),
                "ms_per_token_median": statistics.median(r["ms_per_token_median"] for r in self.runs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True, help="comma-separated bundle directories (one document)")
    ap.add_argument("--gguf", default=None, help="the GGUF for llama.cpp (default: the pulled SmolLM2)")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds of idle before every timed run (another engine's threads may still be spinning)")
    ap.add_argument("--flash-attn", choices=["off", "on", "both"], default="both",
                    help="llama.cpp's flash attention (both: time each, pair with the faster one by median)")
    a = ap.parse_args(argv)
    from nectar_runtime.bundle import read_bundle
    from nectar_runtime.document import local_ids, make_context
    from nectar_runtime.hub import resolve_model
    from nectar_runtime.tokenizer import load_tokenizer

    paths = [Path(p) for p in a.bundles.split(",")]
    docs = {(p / "document.txt").read_bytes() for p in paths}
    if len(docs) != 1:
        raise SystemExit("the bundles must hold the same document")
    gguf = Path(a.gguf) if a.gguf else resolve_model(None, pull_missing=False)
    timers = [BundleTimer(p) for p in paths]
    tok = load_tokenizer(paths[0])
    ctx = make_context(tok, (paths[0] / "document.txt").read_text("utf-8"), 8192, reserve=0)
    ids = list(ctx.context_ids) + local_ids(ctx, tok, [{"role": "user", "content": QUESTION}])
    llamas = [LlamaTimer(gguf, ids, flash_attn=fa) for fa in {"off": [False], "on": [True], "both": [False, True]}[a.flash_attn]]
    for t in timers + llamas:
        t.run_once(a.steps, keep=False)  # warm-up; llama.cpp's prefill
    engines = timers + llamas
    for r in range(a.repeats):
        for t in engines[r % len(engines):] + engines[:r % len(engines)]:  # the order rotates round by round
            time.sleep(a.settle)
            t.run_once(a.steps)
        print(f"round {r + 1}/{a.repeats}: " + ", ".join(f"{t.runs[-1]['tokens_per_s']:.0f}" for t in engines), flush=True)
    rows, llama_rows = [t.result() for t in timers], [t.result() for t in llamas]
    llama = max(llama_rows, key=lambda lr: lr["tokens_per_s"])  # the faster setting by median over the rounds
    best_of_round = [max(runs, key=lambda x: x["tokens_per_s"]) for runs in zip(*(lr["runs"] for lr in llama_rows))]
    for p, r in zip(paths, rows):
        m = read_bundle(p, verify=False).manifest
        r["artifact_mb"] = m["artifact"]["artifact_bytes"] / 1e6
        r["kv_share"] = m["artifact"]["artifact_bytes"] / m["artifact"]["kv_bytes"]
        r["paired_ratio_to_llama_cpp"] = statistics.median(b["tokens_per_s"] / l["tokens_per_s"]
                                                           for b, l in zip(r["runs"], llama["runs"]))
        # a conservative bound: the faster of the two settings in each round (biased towards llama.cpp)
        r["paired_ratio_to_best_of_round"] = statistics.median(b["tokens_per_s"] / l["tokens_per_s"]
                                                               for b, l in zip(r["runs"], best_of_round))
        r["paired_ratio_to_first"] = statistics.median(b["tokens_per_s"] / f["tokens_per_s"]
                                                       for b, f in zip(r["runs"], rows[0]["runs"]))
    out = {"command": "python benchmarks/budget_decode_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(), "threads": THREADS,
           "n": ctx.n, "bundles": rows, "llama_cpp": llama, "llama_cpp_settings": llama_rows,
           "paired_ratio_to": "llama.cpp's faster setting by median over the rounds, its run of the same round"}
    path = ROOT / "benchmarks" / "results" / f"budget_decode_cpu_{a.name}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"| bundle | artifact MB (% of KV) | ms/token (median) | tok/s | vs llama.cpp ({llama['tokens_per_s']:.1f} tok/s) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bundle']} | {r['artifact_mb']:.1f} ({100 * r['kv_share']:.1f}%) | {r['ms_per_token_median']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['tokens_per_s'] / llama['tokens_per_s']:.2f}× |")
    for lr in llama_rows:
        print(f"{lr['engine']}: {lr['tokens_per_s']:.1f} tok/s, {lr['ms_per_token_median']:.2f} ms/token (median)")
    print(f"paired (same round) ratio to {llama['engine']}, median over rounds: "
          + ", ".join(f"{r['bundle']} {r['paired_ratio_to_llama_cpp']:.2f}×" for r in rows))
    print("... to the faster llama.cpp setting of each round (a conservative bound): "
          + ", ".join(f"{r['bundle']} {r['paired_ratio_to_best_of_round']:.2f}×" for r in rows))
    print(f"paired ratio to {rows[0]['bundle']} (e.g. the fp32 bundle listed first), median over rounds: "
          + ", ".join(f"{r['bundle']} {r['paired_ratio_to_first']:.2f}×" for r in rows[1:]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
