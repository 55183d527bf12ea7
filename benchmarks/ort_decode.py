"""Decode speed of exported bundles on ONNX Runtime (CPU), against llama.cpp on the same GGUF.

SmolLM2-135M-Instruct, greedy, 2 threads everywhere. Two documents: the first ~512 and ~7,000
tokens of ../shared/data/manuals/*.txt (concatenated, sorted by name), placed as the opening of
a user turn; the question after it is the same for every run.

Per document:
  * a Nectar artifact fitted with a FIXED budget (--budget-mb, the same for both documents, so
    the heads are the same size: flatness is a property at fixed artifact size), and for the
    long document also one at the default budget (the artifact a user gets: since 2026-11-25 0.24 of a 4,096-token
    document's fp16 KV, with the 18 retained heads' int8 KV of 4,096 tokens; before, 0.24 of all n and 2,048 /
    45% of n retained). A present artifact directory is reused as it is: move it aside after a change of defaults. The fits are deliberately short (tiny probe set, 30 steps): this benchmark
    times decoding, whose cost depends on the heads' sizes, not on how well they were trained;
  * bundles: nectar fp32 / int8 / int4 / int4-rtn (fixed budget), nectar fp32 / int8 / int4 (default
    budget; the quantized bundles hold the heads at 8 bits), full (document KV baked in) fp32 / int4;
  * llama.cpp (llama-cpp-python) on the same GGUF (Q4_1, embeddings Q8_0) and the same token ids
    (document + question), flash attention off and on.
Decode tokens/s = G / (t[last token] − t[first token]) over G greedy tokens after the prompt's
prefill, median of --repeats runs; bundles are timed round-robin. One ORT profile per long-document fixed-budget int4 bundle says which ops
the time goes to.

    python benchmarks/ort_decode.py                 # G = 64, 5 round-robin repeats (~25 min on 2 cores)
    python benchmarks/ort_decode.py --quick         # smaller, for a smoke run

Writes benchmarks/results/ort_decode.json, docs/img/ort_decode.png and the section of
docs/benchmarks.md between `<!-- ort_decode:begin -->` and `<!-- ort_decode:end -->`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import CpuContention, machine_info, write_outputs  # noqa: E402

MANUALS = REPO.parent / "shared" / "data" / "manuals"
MODEL = "smollm2-135m-instruct"
QUESTION = "Which option prints only the lines that match, and how do I make the search case-insensitive?"
BEGIN, END = "<!-- ort_decode:begin -->", "<!-- ort_decode:end -->"
THREADS = 2


def log(msg: str) -> None:
    print(f"[ort_decode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_documents(tok, work: Path, sizes: list[int]) -> dict[int, Path]:
    """Documents whose context (template prefix + text) is about `n` tokens."""
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(MANUALS.glob("*.txt")))
    ids = tok.encode(text, add_special_tokens=False)
    out = {}
    for n in sizes:
        p = work / f"doc_{n}.txt"
        p.write_text(tok.decode(ids[: n - 24]), encoding="utf-8")
        out[n] = p
    return out


def fit_quick(base, doc: Path, out: Path, budget_mb: float | None) -> Path:
    from nectar_export.config import FitConfig
    from nectar_export.pipeline import fit_document
    from nectar_export.probes import ProbeConfig

    if (out / "manifest.json").is_file():
        return out
    probe = ProbeConfig(templated_questions=4, model_questions=2, excerpts=2, chains=1, max_answer_tokens=16,
                        min_position_span=64, batch_size=8)
    # a fixed budget retains no heads (the same networks at every n: flatness at one artifact size);
    # the default budget takes every default, retained heads included (--retain-heads auto)
    cfg = FitConfig(steps=30, probe_steps=5, budget_mb=budget_mb, **({"retain_heads": 0} if budget_mb else {}))
    fit_document(base, doc, out, cfg, probe, progress=False, log=lambda s: None)
    return out


def export(art: Path, out: Path, model: str | None = None, log=None, **kw) -> Path:
    """The bundle of `art` in `out` (ExportConfig(**kw); `model`: the base model, default the
    manifest's), exported again when missing or written with another quantization or graph form
    (manifest keys `ort_fused`, `heads_min_bytes`; absent in older bundles)."""
    from nectar_export.export.bundle import ExportConfig, export_onnx_bundle, graph_form

    cfg = ExportConfig(**kw)
    try:
        m = json.loads((out / "manifest.json").read_text())
        current = m.get("quantize") == cfg.quantize and all(m.get(k) == v for k, v in graph_form(cfg).items())
    except (OSError, ValueError):
        current = False
    if not current:
        if log:
            log(f"exporting {out.name} …")
        export_onnx_bundle(art, out, cfg, model=model, log=lambda s: None)
    return out


class BundleTimer:
    """One bundle on ORT (2 threads), ready to time greedy decoding after the question."""

    def __init__(self, bundle: Path, profile_to: Path | None = None):
        from nectar_runtime.backends.ort_backend import OrtBackend, session_options
        from nectar_runtime.bundle import read_bundle
        from nectar_runtime.document import local_ids, make_context
        from nectar_runtime.tokenizer import load_tokenizer

        self.path, self.b = bundle, read_bundle(bundle)
        tok = load_tokenizer(bundle)
        ctx = make_context(tok, (bundle / "document.txt").read_text("utf-8"), self.b.manifest["model"]["max_position"], reserve=0)
        self.prompt = local_ids(ctx, tok, [{"role": "user", "content": QUESTION}])
        if profile_to is not None:
            import onnxruntime as ort

            so = session_options(THREADS)
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_to / bundle.name)
            self.be = OrtBackend(ort.InferenceSession(str(self.b.graph_path), so, providers=["CPUExecutionProvider"]),
                                 self.b.context_len, self.b.max_local_len)
        else:
            self.be = OrtBackend.from_bundle(self.b, threads=THREADS, provider="cpu")
        self.runs, self.tokens = [], None

    def run_once(self, steps: int, keep: bool = True) -> None:
        be, n, prompt = self.be, self.b.context_len, self.prompt
        be.reset(1, len(prompt) + steps + 1)
        t0 = time.perf_counter()
        logits = be.step(np.array([prompt]), n + np.arange(len(prompt))[None])
        stamps, toks = [time.perf_counter()], []
        for i in range(steps):
            nxt = int(logits[0].argmax())
            toks.append(nxt)
            logits = be.step(np.array([[nxt]]), np.array([[n + len(prompt) + i]]))
            stamps.append(time.perf_counter())
        if keep:
            self.runs.append({"prefill_s": stamps[0] - t0, "tokens_per_s": steps / (stamps[-1] - stamps[0]),
                              "ms_per_token_median": 1000 * statistics.median(np.diff(stamps))})
        self.tokens = toks

    def result(self) -> dict:
        m, runs = self.b.manifest, self.runs
        return {"bundle": self.path.name, "n": self.b.context_len, "method": m["method"], "quantize": m["quantize"] or "fp32",
                "bundle_bytes": sum(f.stat().st_size for f in self.path.iterdir()), "prompt_tokens": len(self.prompt),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "ms_per_token_median": statistics.median(r["ms_per_token_median"] for r in runs),
                "prefill_s": statistics.median(r["prefill_s"] for r in runs), "runs": runs, "greedy_tokens": self.tokens,
                "export_check": m.get("export_check"), "artifact": m.get("artifact")}


def time_bundles(paths: list[Path], steps: int, repeats: int, log=print) -> list[dict]:
    """All bundles timed round-robin: run r of every bundle before run r + 1 of any, so a slow
    spell of the machine falls on all of them alike (each first run warms up, untimed)."""
    timers = [BundleTimer(p) for p in paths]
    for t in timers:
        t.run_once(steps, keep=False)
    for r in range(repeats):
        for t in timers:
            t.run_once(steps)
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{t.path.name} {t.runs[-1]['tokens_per_s']:.0f}" for t in timers))
    return [t.result() for t in timers]


def profile_bundle(path: Path, steps: int, out_dir: Path) -> dict:
    t = BundleTimer(path, out_dir)
    t.run_once(steps)
    return op_profile(t.be.session.end_profiling(), steps)


def op_profile(trace_file: str, steps: int) -> dict:
    """ms per decode token by op type. Runs come in groups of 1 prefill + `steps` decode steps;
    node events inside a prefill run's time window are left out."""
    events = json.loads(Path(trace_file).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    prefill = [w for i, w in enumerate(runs) if i % (steps + 1) == 0]
    decode_runs = len(runs) - len(prefill)
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            if not any(lo <= e["ts"] <= hi for lo, hi in prefill):
                by_op[e["args"].get("op_name", "?")] += e["dur"] / 1000.0
    total = sum(by_op.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    return {"decode_runs": decode_runs, "ms_per_token_by_op": {k: round(v / max(1, decode_runs), 3) for k, v in top},
            "share_by_op": {k: round(v / total, 3) for k, v in top},
            "node_ms_per_token": round(total / max(1, decode_runs), 3)}


def time_llama_cpp(gguf: Path, ids: list[int], steps: int, repeats: int, flash: bool) -> dict:
    from llama_cpp import Llama
    import llama_cpp

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + steps + 16, n_threads=THREADS, n_threads_batch=THREADS,
                n_batch=512, flash_attn=flash, verbose=False)
    runs, toks = [], []
    for r in range(repeats + 1):
        llm.reset()
        stamps, toks = [], []
        t0 = time.perf_counter()
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            toks.append(t)
            if len(toks) == steps + 1:
                break
        if r:
            runs.append({"prefill_s": stamps[0] - t0, "tokens_per_s": steps / (stamps[-1] - stamps[0]),
                         "ms_per_token_median": 1000 * statistics.median(np.diff(stamps))})
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}, flash_attn={'on' if flash else 'off'})",
            "n": None, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "ms_per_token_median": statistics.median(r["ms_per_token_median"] for r in runs),
            "prefill_s": statistics.median(r["prefill_s"] for r in runs), "runs": runs, "greedy_tokens": toks[:steps + 1]}


def time_optimum(python: str, model: str, ids: list[int], steps: int, repeats: int, work: Path) -> dict:
    import subprocess

    f = work / "optimum_ids.json"
    f.write_text(json.dumps(ids))
    r = subprocess.run([python, str(Path(__file__).with_name("optimum_decode.py")), "--model", model, "--ids", str(f),
                        "--steps", str(steps), "--repeats", str(repeats), "--threads", str(THREADS)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    series = defaultdict(list)
    for r in report["bundles"]:
        if r.get("budget") == "fixed" or r["method"] == "full":
            series[f"{r['method']} {r['quantize']} (ORT)"].append((r["n"], r["tokens_per_s"]))
    for r in report["llama_cpp"]:
        name = "optimum full fp32 (ORT)" if r["engine"].startswith("optimum") else r["engine"].split(" (")[0]
        series[name + (" +FA" if "flash_attn=on" in r["engine"] else "")].append((r["n"], r["tokens_per_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="--" if "llama" in name else "-", label=name)
    for r in report["bundles"]:  # the default artifact (one document size): stars
        if r.get("budget") == "default":
            ax.plot([r["n"]], [r["tokens_per_s"]], marker="*", ms=11, ls="none",
                    label=f"nectar {r['quantize']}, default artifact ({r['artifact_mb']:.0f} MB)")
    ax.set_xlabel("document tokens n")
    ax.set_ylabel("decode tokens/s (2 threads)")
    ax.set_xscale("log")
    ax.set_title("SmolLM2-135M decode after a document, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def docs_section(report: dict, png_rel: str) -> str:
    lines = [BEGIN, "## Bundles on ONNX Runtime vs llama.cpp (CPU decode)", "",
             f"Command: `python benchmarks/ort_decode.py{report['argv']}` — {report['machine']['cpu_model']}, "
             f"{THREADS} threads, onnxruntime {report['onnxruntime']}, {report['date']}. "
             f"Other processes used {100 * (report['contention'] or {}).get('other_processes_share_of_cores', 0):.1f}% of the cores during the run.",
             "", "| engine / bundle | n | bundle MB | decode tok/s | ms/token (median) | prefill s | check vs torch fp32 |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(report["bundles"], key=lambda r: (r["n"], r["method"], r["quantize"])):
        chk = r.get("export_check") or {}
        c = f"top-1 {chk.get('top1_agreement', float('nan')):.3f}, KL {chk.get('mean_kl', float('nan')):.4f}" if chk else ""
        label = f"{r['method']} {r['quantize']}" + (f" (artifact {r['artifact_mb']:.1f} MB, {r['budget']}"
                                                    + (f", {r['retained']} retained" if r.get("retained") else "") + ")"
                                                    if r["method"] == "nectar" else "")
        lines.append(f"| {label} | {r['n']} | {r['bundle_bytes'] / 1e6:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_token_median']:.2f} | {r['prefill_s']:.2f} | {c} |")
    for r in report["llama_cpp"]:
        mb = report["gguf_mb"] if r["engine"].startswith("llama.cpp") else report.get("optimum_mb", float("nan"))
        lines.append(f"| {r['engine']} | {r['n']} | {mb:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_token_median']:.2f} | {r['prefill_s']:.2f} | |")
    lines += ["", f"![decode tok/s vs n]({png_rel})", ""]
    t = report["targets"]
    lines += ["Targets (issue 4):", ""]
    for k, v in t.items():
        lines.append(f"- {k}: {v}")
    lines += ["", "Where decode time goes (ORT profile, ms per decode token by op type, long document):", ""]
    for r in report["bundles"]:
        if "profile" in r:
            ops = ", ".join(f"{k} {v:.2f}" for k, v in r["profile"]["ms_per_token_by_op"].items())
            lines.append(f"- {r['method']} {r['quantize']} n={r['n']}" + (f" ({r['budget']} budget)" if r["method"] == "nectar" else "")
                         + f": {ops}")
    lines += ["", END]
    return "\n".join(lines)


def targets(report: dict) -> dict:
    def find(n, method, q, budget="fixed"):
        for r in report["bundles"]:
            if r["n"] == n and r["method"] == method and r["quantize"] == q and (method == "full" or r.get("budget") == budget):
                return r["tokens_per_s"]
        return float("nan")

    lo, hi = report["sizes"]
    lcpp = {(r["n"], "flash_attn=on" in r["engine"]): r["tokens_per_s"] for r in report["llama_cpp"] if r["engine"].startswith("llama.cpp")}
    out = {}
    a, b = find(lo, "nectar", "int4"), find(hi, "nectar", "int4")
    out["Nectar int4 flat: |tok/s(n=%d) / tok/s(n=%d) − 1| ≤ 10%%" % (hi, lo)] = f"{100 * abs(b / a - 1):.1f}% ({a:.1f} → {b:.1f}) — {'met' if abs(b / a - 1) <= 0.10 else 'missed'}"
    a32, b32 = find(lo, "nectar", "fp32"), find(hi, "nectar", "fp32")
    out["Nectar fp32 flat"] = f"{100 * abs(b32 / a32 - 1):.1f}% ({a32:.1f} → {b32:.1f}) — {'met' if abs(b32 / a32 - 1) <= 0.10 else 'missed'}"
    f_lo, f_hi = find(lo, "full", "fp32"), find(hi, "full", "fp32")
    out["full fp32 slows down"] = f"{f_lo:.1f} → {f_hi:.1f} tok/s ({100 * (f_hi / f_lo - 1):+.0f}%)"
    for q in ("int8", "int4", "int4-rtn"):
        r_lo = find(lo, "nectar", q) / a32
        out[f"Nectar {q} ≥ 2× fp32 (n={lo})"] = f"{r_lo:.2f}× — {'met' if r_lo >= 2 else 'missed'}"
    best_hi = max(lcpp.get((hi, False), 0), lcpp.get((hi, True), 0))
    out[f"Nectar int4 ≥ 2× llama.cpp at n={hi}"] = f"{b:.1f} vs {best_hi:.1f} (best of FA off/on) = {b / best_hi:.2f}× — {'met' if b >= 2 * best_hi else 'missed'}"
    d32, d4 = find(hi, "nectar", "fp32", "default"), find(hi, "nectar", "int4", "default")
    if not (math.isnan(d4) or math.isnan(d32)):  # default artifact: heads that grow with n (8-bit in the quantized bundles) + retained heads
        out[f"Nectar int4, default artifact, ≥ 2× llama.cpp at n={hi}"] = \
            f"{d4:.1f} vs {best_hi:.1f} = {d4 / best_hi:.2f}× — {'met' if d4 >= 2 * best_hi else 'missed'}"
        for q in ("int8", "int4"):
            r_d = find(hi, "nectar", q, "default") / d32
            out[f"Nectar {q} ≥ 2× fp32, default artifact (n={hi})"] = f"{r_d:.2f}× — {'met' if r_d >= 2 else 'missed'}"
    l_lo = max(lcpp.get((lo, False), 0), lcpp.get((lo, True), 0)) or float("nan")  # the faster llama.cpp, as above
    out[f"Nectar int4 within 1.2× of llama.cpp at n={lo}"] = (f"{a:.1f} vs {l_lo:.1f} (best of FA off/on) = {a / l_lo:.2f}× — "
                                                            f"{'met' if a * 1.2 >= l_lo else 'missed'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,7000")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-mb", type=float, default=4.0, help="fixed Nectar artifact size for the flatness rows")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "ort_decode"))
    ap.add_argument("--quick", action="store_true", help="steps 16, repeats 1, no default-budget artifact")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ort_decode.json"))
    ap.add_argument("--optimum-python", default=None, help="python of an environment with optimum-onnx (see optimum_decode.py)")
    ap.add_argument("--optimum-model", default=None, help="optimum's ONNX export of the full model")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.repeats = 16, 1
    sizes = [int(s) for s in a.sizes.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    from nectar_export.pipeline import load_base
    from nectar_runtime.hub import resolve_model

    gguf = resolve_model(MODEL, pull_missing=True)
    base = load_base(MODEL)
    docs = make_documents(base.tokenizer, work, sizes)
    contention = CpuContention()
    report = {"argv": (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(), "sizes": sizes,
              "date": time.strftime("%Y-%m-%d"), "machine": machine_info(THREADS), "onnxruntime": onnxruntime.__version__,
              "gguf_mb": gguf.stat().st_size / 1e6, "bundles": [], "llama_cpp": [], "budget_mb": a.budget_mb}
    if a.optimum_model:
        report["optimum_mb"] = sum(f.stat().st_size for f in Path(a.optimum_model).iterdir() if f.is_file()) / 1e6
    prof_dir = work / "profiles"
    prof_dir.mkdir(exist_ok=True)
    from nectar_runtime.document import local_ids, make_context

    planned = []  # (path, budget, heads MB)
    for n in sizes:
        arts = {"fixed": fit_quick(base, docs[n], work / f"art_{n}_fixed", a.budget_mb)}
        if n == max(sizes) and not a.quick:
            arts["default"] = fit_quick(base, docs[n], work / f"art_{n}_default", None)
        plan = [("fixed", "nectar", None), ("fixed", "nectar", "int8"), ("fixed", "nectar", "int4"), ("fixed", "nectar", "int4-rtn"),
                ("fixed", "full", None), ("fixed", "full", "int4")] + \
            ([("default", "nectar", None), ("default", "nectar", "int8"), ("default", "nectar", "int4")] if "default" in arts else [])
        for budget, method, q in plan:
            name = f"{method}_{q or 'fp32'}_{n}" + (f"_{budget}" if method == "nectar" else "")
            log(f"bundle {name}")
            planned.append((export(arts[budget], work / name, method=method, quantize=q), budget,
                            json.loads((arts[budget] / "manifest.json").read_text())))
    log(f"timing {len(planned)} bundles round-robin, {a.repeats} runs of {a.steps} tokens each")
    for (path, budget, man), r in zip(planned, time_bundles([p for p, _, _ in planned], a.steps, a.repeats, log)):
        kept = man.get("retained") or {}
        r["budget"], r["artifact_mb"] = budget, man["artifact_bytes"] / 1e6  # the artifact: heads + any retained KV
        r["retained"] = f"{len(kept['modules'])}x{kept.get('tokens') or 'all'}" if kept else None
        big = max(sizes)
        if path.name in (f"nectar_int4_{big}_fixed", f"nectar_int4-rtn_{big}_fixed", f"full_int4_{big}"):
            r["profile"] = profile_bundle(path, a.steps, prof_dir)  # where the time goes (untimed pass)
        report["bundles"].append(r)
    for n in sizes:
        ctx = make_context(base.tokenizer, docs[n].read_text("utf-8"), base.config.max_position, reserve=0)
        ids = list(ctx.context_ids) + local_ids(ctx, base.tokenizer, [{"role": "user", "content": QUESTION}])
        if a.optimum_python and a.optimum_model:
            log(f"optimum n={n}")
            r = time_optimum(a.optimum_python, a.optimum_model, ids, a.steps, a.repeats, work)
            r["n"] = ctx.n
            report["llama_cpp"].append(r)
            log(f"  {r['tokens_per_s']:.1f} tok/s")
        for flash in (False, True):
            log(f"llama.cpp n={n} flash={flash}")
            r = time_llama_cpp(gguf, ids, a.steps, a.repeats, flash)
            r["n"] = ctx.n
            report["llama_cpp"].append(r)
            log(f"  {r['tokens_per_s']:.1f} tok/s")
    report["contention"] = contention.result()
    report["sizes"] = sorted({r["n"] for r in report["bundles"]})
    report["targets"] = targets(report)
    write_outputs(report, Path(a.out), REPO / "docs" / "img" / "ort_decode.png", plot, docs_section, BEGIN, END,
                  REPO / "docs" / "benchmarks.md")
    for k, v in report["targets"].items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
