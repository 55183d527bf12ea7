"""Wall time of `nectar fit` with default settings, per stage, on this machine.

    python benchmarks/fit_time.py --doc ../shared/data/manuals/grep.txt [--device cpu] [--threads 2]

Writes benchmarks/results/fit_time_<device>[_<tag>].json and the section between
`<!-- fit_time_<device>[_<tag>]:begin -->` / `end` markers in docs/benchmarks.md.

    python benchmarks/fit_time.py --breakdown OUT.json --model smol.gguf --device cuda [--doc grep.txt]

In one process, the stages of `nectar fit` taken apart (nothing written to docs/): model load
(import, CUDA init, GGUF read, build, copy to the device, sha256, tokenizer), prefill, the probe
stage per generation call (backend steps: prefill chunks, decode replays, sampler, host rest),
query collection, and the fit-heads stage twice on the same queries: graphed (the default on
CUDA) and eager (`NECTAR_FIT_GRAPH=0`), with both held-out errors and loss curves. Extra timings
(`--extras`): greedy answers at other generation batch sizes, collection at batch 32.
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

from nectar_profiling.ort_runner import cpu_isa, cpu_name

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--doc", default=str(ROOT.parent / "shared" / "data" / "manuals" / "grep.txt"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-s", type=float, default=900.0, help="the goal to compare against (default 15 min)")
    p.add_argument("--tag", default="", help="suffix of the record and docs section (another machine type: keeps the others)")
    p.add_argument("--breakdown", help="write the in-process stage breakdown here (JSON) instead")
    p.add_argument("--model", default=None, help="for --breakdown: the model (default: nectar's default)")
    p.add_argument("--extras", action="store_true", help="for --breakdown: other batch sizes too")
    a = p.parse_args(argv)
    if a.breakdown:
        return breakdown(a.doc, a.model, a.device, a.breakdown, a.extras)
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
        "machine": cpu_name() if device == "cpu" else "GPU", "isa": cpu_isa() if device == "cpu" else None,
        "threads": a.threads,
        "wall_s": round(wall, 1), "stages_s": m["timings_s"], "target_s": a.target_s,
        "met": wall <= a.target_s, "allocation": m["allocation"], "steps": m["fit_config"]["steps"],
        "batch": m["fit_config"].get("batch"), "probes_train": m["probes"]["train"]["probes"],
        "probe_tokens_train": m["probes"]["train"]["tokens"],
        "budget_fraction": m["fit_config"]["budget_fraction"], "date": time.strftime("%Y-%m-%d"),
        "artifact_bytes": m["artifact_bytes"], "kv_bytes": m["kv_bytes"],
        "heldout_o_rel_error_mean": sum(m["metrics"]["heldout"]["o_rel_error"]) / len(m["metrics"]["heldout"]["o_rel_error"]),
    }
    key = device + (f"_{a.tag}" if a.tag else "")
    out = ROOT / "benchmarks" / "results" / f"fit_time_{key}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2))
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in rec["stages_s"].items())
    block = f"""<!-- fit_time_{key}:begin -->
## `nectar fit` wall time ({device}{f", {a.tag}" if a.tag else ""})

Command: `python benchmarks/fit_time.py --doc {rec['doc']} --device {a.device} --threads {a.threads}{f" --tag {a.tag}" if a.tag else ""}`
(default settings: {rec['allocation']} allocation, budget {rec['budget_fraction']:g} of the document's fp16 KV
({100 * rec['artifact_bytes'] / rec['kv_bytes']:.1f}% reached), {rec['steps']} steps of {rec['batch']} samples, {rec['probes_train']} training
probes ({rec['probe_tokens_train']:,} tokens)). Machine: {rec['machine']}{f" ({rec['isa']})" if rec['isa'] else ""}, {a.threads} threads, {rec['date']}.
Document: {rec['doc']}, n = {rec['n_tokens']} tokens.

| stage | seconds |
|---|---|
{rows}
| **total (wall, incl. model load)** | **{rec['wall_s']:.1f}** |

Goal ≤ {a.target_s:.0f} s: **{'met' if rec['met'] else 'missed'}**{'' if rec['met'] else f" by {rec['wall_s'] - a.target_s:.0f} s"}.
<!-- fit_time_{key}:end -->"""
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    b, e = f"<!-- fit_time_{key}:begin -->", f"<!-- fit_time_{key}:end -->"
    text = text[: text.index(b)] + block + text[text.index(e) + len(e):] if b in text else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
    print(json.dumps(rec, indent=2))
    return 0


def breakdown(doc: str, model: str | None, device: str, out: str, extras: bool = False) -> int:
    """See the module docstring. Prints as it goes; writes `out` (JSON)."""
    t_start = time.perf_counter()
    rec: dict = {"doc": Path(doc).name, "device": device, "load_s": {}, "probe_calls": [], "extras": {}}

    def lap(d, key, t0):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        d[key] = round(time.perf_counter() - t0, 3)
        print(f"[breakdown] {key}: {d[key]:.2f} s", flush=True)
        return time.perf_counter()

    t = time.perf_counter()
    import torch

    t = lap(rec["load_s"], "import torch", t)
    if device.startswith("cuda"):
        torch.empty(1, device=device)
        torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
        t = lap(rec["load_s"], "cuda init (context + cuBLAS)", t)
        rec["gpu"] = torch.cuda.get_device_name()
    from nectar_export.pipeline import Loaded, document_context, split_prefix
    from nectar_models.loading import LoadedModel, build_model, file_sha256, read_gguf
    from nectar_runtime.hub import DEFAULT_MODEL, resolve_model
    from nectar_runtime.tokenizer import load_tokenizer

    t = lap(rec["load_s"], "imports", t)
    path = resolve_model(model, pull_missing=False)
    cfg, state = read_gguf(path)
    t = lap(rec["load_s"], "read gguf (dequantize)", t)
    m = build_model(cfg, state, str(path))
    t = lap(rec["load_s"], "build model", t)
    m = m.to(device=device).eval()
    t = lap(rec["load_s"], "to device", t)
    sha = file_sha256([path])
    t = lap(rec["load_s"], "sha256", t)
    tok = load_tokenizer(path)
    t = lap(rec["load_s"], "tokenizer", t)
    base = Loaded(LoadedModel(m, cfg, path, sha, "gguf"), tok, model or DEFAULT_MODEL, device)
    ctx = document_context(base, doc)
    rec["n_tokens"] = ctx.n
    t = time.perf_counter()
    with torch.no_grad():
        full = m.prefill_document(torch.tensor([ctx.context_ids], device=device)).contexts()
    prefix, docp = split_prefix(full, ctx.prefix_len)
    stages: dict = {}
    t = lap(stages, "prefill document", t)

    # ---- probes: every generation call, its backend steps and sampler
    from nectar_export import probes as P
    from nectar_export.probes.build import _Builder
    from nectar_runtime import sampling
    from nectar_runtime.backends import cuda_graph

    acc = {"prefill": [0, 0.0], "decode": [0, 0.0], "sampler": [0, 0.0]}
    step0, samp0 = cuda_graph.CudaGraphBackend.step, sampling.Sampler.__call__

    def timed_step(self, ids, pos):
        t0 = time.perf_counter()
        r = step0(self, ids, pos)
        a = acc["prefill" if ids.shape[1] > 1 else "decode"]
        a[0], a[1] = a[0] + 1, a[1] + time.perf_counter() - t0
        return r

    def timed_sampler(self, logits):
        t0 = time.perf_counter()
        r = samp0(self, logits)
        acc["sampler"][0] += 1
        acc["sampler"][1] += time.perf_counter() - t0
        return r

    gen0 = _Builder.generate

    def timed_generate(self, convs, max_tokens, sampling_cfg, desc):
        for v in acc.values():
            v[0], v[1] = 0, 0.0
        t0 = time.perf_counter()
        r = gen0(self, convs, max_tokens, sampling_cfg, desc)
        total = time.perf_counter() - t0
        call = {"desc": desc, "convs": len(convs), "s": round(total, 3),
                **{f"{k}_n": v[0] for k, v in acc.items()}, **{f"{k}_s": round(v[1], 3) for k, v in acc.items()}}
        call["host_rest_s"] = round(total - sum(v[1] for v in acc.values()), 3)
        rec["probe_calls"].append(call)
        print("[breakdown]", call, flush=True)
        return r

    cuda_graph.CudaGraphBackend.step, sampling.Sampler.__call__, _Builder.generate = timed_step, timed_sampler, timed_generate
    t = time.perf_counter()
    from nectar_export.config import default_probe_scale

    probe_cfg = P.ProbeConfig().scaled(default_probe_scale(torch.device(device).type))  # as `nectar fit` on this device
    probes = P.build_probes(m, tok, ctx, full, probe_cfg, progress=False)
    train_p, held_p = P.split_probes(probes, probe_cfg.holdout_frac, probe_cfg.seed)
    t = lap(stages, "build probes", t)
    cuda_graph.CudaGraphBackend.step, sampling.Sampler.__call__, _Builder.generate = step0, samp0, gen0
    rec["probe_tokens_train"] = sum(len(p.ids) for p in train_p)

    from nectar_export.collect import collect_queries
    from nectar_export.config import FitConfig
    from nectar_export.fit import fit_heads
    from nectar_export.pipeline import budget_params, spec_factory

    ids = [p.ids for p in train_p] + [p.ids for p in held_p]
    store = getattr(torch, FitConfig().query_dtype)  # as `nectar fit` stores them
    qs = collect_queries(m, docp, ctx.n, ids, prefix_contexts=prefix, progress=False, store_dtype=store)
    t = lap(stages, "collect queries", t)
    held_rows = qs.probe_index >= len(train_p)
    qtr, qhe = qs.select(~held_rows), qs.select(held_rows)
    fit_cfg = FitConfig().for_device(torch.device(device).type)
    n_params, _ = budget_params(ctx, cfg, fit_cfg)
    doc_kv = [(c.k, c.v) for c in docp]
    fits = {}
    for name, env in (("graphed", "1"), ("eager", "0")):
        os.environ["NECTAR_FIT_GRAPH"] = env
        t = time.perf_counter()
        res = fit_heads(qtr, qhe, spec_factory(cfg, fit_cfg.variant), n_params, fit_cfg, doc_kv, progress=False)
        t = lap(stages, f"fit heads ({name})", t)
        err = res.heldout["o_rel_error"]
        fits[name] = {"s": stages[f"fit heads ({name})"], "widths": list(res.widths),
                      "heldout_o_rel_error_mean": sum(err) / len(err),
                      "heldout_o_rel_error_weighted_mean": sum(res.heldout["o_rel_error_weighted"]) / len(err),
                      "heldout_lse_abs_error_mean": sum(res.heldout["lse_abs_error"]) / len(err),
                      "probe_errors": res.allocation_probe["errors"] if res.allocation_probe else None,
                      "curve_every_100": res.train_curve[::100], "train_loss_final": sum(res.train_curve[-20:]) / 20}
        print("[breakdown]", name, {k: v for k, v in fits[name].items() if k != "curve_every_100"}, flush=True)
        fits[name]["_curve"] = res.train_curve
    os.environ.pop("NECTAR_FIT_GRAPH")
    a_, b_ = fits["eager"].pop("_curve"), fits["graphed"].pop("_curve")
    fits["curve_max_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a_, b_))
    rec["fits"] = fits
    rec["stages_s"] = stages

    if extras and device.startswith("cuda"):
        from nectar_export.answering import answer_backend, generate_answers
        from nectar_runtime.generate import GenerationConfig
        from nectar_runtime.sampling import SamplingConfig

        qs_text = [p.turns[0]["content"] for p in probes if p.kind == "answer_greedy"]
        convs = [[{"role": "user", "content": q}] for q in qs_text]
        backend = answer_backend(m, full, ctx.n)
        ref = None
        for bs in (16, 16, 40, 80, 80):
            t = time.perf_counter()
            got = generate_answers(m, tok, ctx, full, convs, GenerationConfig(96, SamplingConfig()), bs, None, backend)
            dt = round(time.perf_counter() - t, 3)
            ref = ref or got
            same = sum(x == y for x, y in zip(got, ref))
            rec["extras"].setdefault("greedy_answers_by_batch", []).append({"batch": bs, "s": dt, "same_as_16": same,
                                                                            "convs": len(convs)})
            print(f"[breakdown] greedy answers batch {bs}: {dt:.2f} s ({same}/{len(convs)} as at 16)", flush=True)
        t = time.perf_counter()
        generate_answers(m, tok, ctx, full, convs, GenerationConfig(96, SamplingConfig(0.7, seed=11)), 80, None, backend)
        rec["extras"]["sampled_answers_batch_80_s"] = round(time.perf_counter() - t, 3)
        print(f"[breakdown] sampled answers batch 80: {rec['extras']['sampled_answers_batch_80_s']:.2f} s", flush=True)
        t = time.perf_counter()
        qs32 = collect_queries(m, docp, ctx.n, ids, prefix_contexts=prefix, progress=False, batch_size=32,
                               store_dtype=store)
        torch.cuda.synchronize()
        rec["extras"]["collect_batch_32_s"] = round(time.perf_counter() - t, 3)
        rec["extras"]["collect_batch_32_max_abs_diff_o"] = max(float((x - y).abs().max()) for x, y in zip(qs.o, qs32.o))
        print(f"[breakdown] collect at batch 32: {rec['extras']['collect_batch_32_s']:.2f} s", flush=True)
    rec["total_s"] = round(time.perf_counter() - t_start, 2)
    Path(out).write_text(json.dumps(rec, indent=1))
    print(json.dumps({k: v for k, v in rec.items() if k != "fits"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
