"""Nectar fidelity per manual and the quality-vs-artifact-size curve.

    # fit + evaluate (GPU or CPU); probes and queries are built once per manual and reused for
    # every (budget, allocation, variant) setting
    python benchmarks/nectar_quality.py run --manuals ../shared/data/manuals --device cuda \
        --budgets 0.05,0.1,0.2 --out-dir benchmarks/results/quality [--no-semantic]
    # fill in semantic similarity from the stored answers (CPU, MiniLM), write docs + PNG
    python benchmarks/nectar_quality.py report --out-dir benchmarks/results/quality

Each setting's JSON record: manual, n_tokens, variant, allocation, budget_fraction,
artifact_bytes, kv_bytes, methods {full, nectar, none, streaming: metrics}, answers, heldout
per-layer errors, timings.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe_config(a):
    from nectar_export.probes import ProbeConfig

    if a.quick:  # smoke runs: a handful of probes
        return ProbeConfig(seed=a.seed, batch_size=a.batch, templated_questions=4, model_questions=2, excerpts=2,
                           chains=1, max_answer_tokens=24, min_position_span=128)
    scaled = ProbeConfig(seed=a.seed, batch_size=a.batch).scaled(a.probe_scale)
    return replace(scaled, **overrides(a.probes, scaled))


def run(a: argparse.Namespace) -> None:
    import torch

    from nectar_export.config import default_probe_scale

    if a.probe_scale is None:  # as `nectar fit` on that device
        a.probe_scale = default_probe_scale(a.device.split(":")[0])

    from nectar_export.collect import collect_queries
    from nectar_export.config import FitConfig
    from nectar_export.evaluate import evaluate_methods
    from nectar_export.distill import distill_heads
    from nectar_export.fit import fit_heads, layer_errors, train_dtype
    from nectar_export.heads import nectar_contexts
    from nectar_export.pipeline import (budget_params, document_context, resolve_retention, load_base, nectar_with_prefix,
                                        spec_factory, split_prefix)
    from nectar_export.probes import build_probes, probe_stats, split_probes
    from nectar_export.retained import (RetainedKV, module_error_mass, retain_after_fit, retained_bytes, subset_error,
                                        token_budget_choice, worst_modules)
    from nectar_export.cli import read_questions
    from nectar_export.streaming import streaming_contexts, streaming_tokens_for_bytes

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probe_over = overrides(a.probes, probe_config(a))  # recorded and in the file names
    base = load_base(a.model, a.device)
    model, cfg = base.model, base.config
    d = FitConfig()
    a.budgets, a.allocations = a.budgets or str(d.budget_fraction), a.allocations or d.allocation
    settings = [] if a.extra_only else [(float(b), alloc, "mlp", False, {}) for b in a.budgets.split(",")
                                        for alloc in a.allocations.split(",")]
    extra = [x.split(":") for x in a.extra.split(",") if x]  # e.g. "0.2:uniform:quadrature:0[:steps=1200;linear_init=0]"
    settings += [(float(x[0]), x[1], x[2], x[3] == "1", overrides(x[4] if len(x) > 4 else "")) for x in extra]
    # one collection per manual, in the widest storage any setting asks for (fp16 copies are made per setting)
    wide = any(over.get("query_dtype", d.query_dtype) == "float32" for *_, over in settings)
    store = torch.float32 if wide else torch.float16
    for doc in sorted(Path(a.manuals).glob("*.txt")):
        if a.only and doc.stem not in a.only.split(","):
            continue
        t0 = time.time()
        ctx = document_context(base, doc)
        full = model.prefill_document(torch.tensor([ctx.context_ids], device=base.device)).contexts()
        prefix, docpart = split_prefix(full, ctx.prefix_len)
        probe_cfg = probe_config(a)
        probes = build_probes(model, base.tokenizer, ctx, full, probe_cfg, progress=False)
        train_p, held_p = split_probes(probes, probe_cfg.holdout_frac, probe_cfg.seed)
        qs = collect_queries(model, docpart, ctx.n, [p.ids for p in train_p] + [p.ids for p in held_p],
                             prefix_contexts=prefix, progress=False, store_dtype=store)
        held_rows = qs.probe_index >= len(train_p)
        qtr, qhe = qs.select(~held_rows), qs.select(held_rows)
        del qs  # the whole set and its halves at once would double the largest tensors
        t_probe = time.time() - t0
        questions = read_questions(doc.with_suffix(".questions.jsonl"))
        fitted, choices = {}, {}  # choices: per fit key, the retained heads a token budget picked during it
        for budget, alloc, variant, on_policy, over in settings:
            fcfg = FitConfig(**{"variant": variant, "allocation": alloc, "budget_fraction": budget, "seed": a.seed,
                                **({"steps": a.steps} if a.steps else {}), **over}).for_device(a.device.split(":")[0])
            fcfg = resolve_retention(ctx, cfg, fcfg, on_policy)  # --retain-heads/--retain-tokens auto, as `nectar fit`
            n_params, kvb = budget_params(ctx, cfg, fcfg)
            t1 = time.time()
            # settings that differ only in distillation share one per-module fit (CPU runs are slow)
            key = (on_policy, json.dumps(dict(fcfg.to_dict(), distill_steps=0, distill_lr=0, distill_tokens=0)))
            if key in fitted:
                res = copy.deepcopy(fitted[key])
            else:
                qd = getattr(torch, fcfg.query_dtype)
                choices[key] = token_budget_choice(docpart, fcfg, cfg.layer_windows)  # as `nectar fit --retain-tokens`
                res = fit_heads(qtr.stored_as(qd), qhe.stored_as(qd), spec_factory(cfg, variant), n_params, fcfg,
                                [(c.k, c.v) for c in docpart], progress=False, retarget=choices[key])
            if on_policy and key not in fitted:
                qs2 = collect_queries(model, docpart, ctx.n, [p.ids for p in train_p] + [p.ids for p in held_p],
                                      prefix_contexts=prefix, serve_contexts=nectar_contexts(res.heads, cfg.layer_windows, ctx.n),
                                      progress=False, store_dtype=getattr(torch, fcfg.query_dtype))
                res = fit_heads(qs2.select(~held_rows), qs2.select(held_rows), spec_factory(cfg, variant),
                                n_params, fcfg, [(c.k, c.v) for c in docpart], progress=False)
            fitted.setdefault(key, copy.deepcopy(res))
            distill = None
            if fcfg.distill_steps:
                distill = distill_heads(model, res.heads, full, nectar_with_prefix(model, ctx, res.heads, base.device),
                                        ctx.n, [p.ids for p in train_p], [p.ids for p in held_p], fcfg.distill_steps,
                                        fcfg.distill_lr, fcfg.distill_tokens, seed=a.seed, progress=False)
                res.heldout = layer_errors(res.heads, qhe.stored_as(getattr(torch, fcfg.query_dtype)))
                print("distill held-out curve: " + ", ".join(f"{c['step']}: train kl {c.get('train_kl_topk', float('nan')):.4f} held-out kl {c['kl_topk']:.4f} agree {c['agreement']:.3f}"
                                                             for c in distill["curve"]), flush=True)
            t_fit = time.time() - t1
            peak = torch.cuda.max_memory_allocated() if base.device.startswith("cuda") else None
            art_bytes = 2 * res.heads.spec.total_params()  # fp16 on disk (+ a small safetensors header)
            held = qhe.stored_as(getattr(torch, fcfg.query_dtype))
            kept = subset_err = None
            if fcfg.retain_heads:  # part of the artifact, as `nectar fit --retain-heads [--retain-tokens]` makes it
                kept, _ = retain_after_fit(docpart, res.heads, held, fcfg, ctx.prefix_len, cfg.layer_windows, choices[key])
                subset_err = subset_error(res.heads, kept, qhe)
                art_bytes += kept.nbytes()
            keep = min(ctx.n, streaming_tokens_for_bytes(art_bytes, cfg) + ctx.prefix_len)
            methods = {"full": full, "nectar": nectar_with_prefix(model, ctx, res.heads, base.device, kept),
                       "none": None, "streaming": streaming_contexts(full, keep)}
            retained = {}
            mass = module_error_mass(res.heads, held) if a.retain_heads else None  # diagnostics rank the fitted heads
            for k in (int(x) for x in a.retain_heads.split(",") if x):  # diagnostics: the same heads + k retained
                mods = worst_modules(mass, k, cfg.layer_windows)
                methods[f"retain{k}"] = nectar_with_prefix(model, ctx, res.heads, base.device,
                                                           RetainedKV.from_document(docpart, mods, ctx.prefix_len))
                retained[k] = {"modules": mods, "bytes": retained_bytes(ctx.n - ctx.prefix_len, cfg.head_dim, k),
                               "error_mass_share": float(sum(mass[l, j] for l, j in mods) / mass.sum())}
            t2 = time.time()
            r = evaluate_methods(model, base.tokenizer, ctx, methods, questions, progress=False, batch_size=a.batch,
                                 embedder=None if a.semantic else False)
            rec = {"manual": doc.stem, "n_tokens": ctx.n, "variant": variant, "allocation": alloc,
                   "on_policy": on_policy, "budget_fraction": budget, "artifact_bytes": art_bytes, "kv_bytes": kvb,
                   "streaming_tokens": keep, "retained_modules": kept.modules if kept else None,
                   "retained_tokens": kept.length if kept else None, "retained_heldout_error": subset_err,
                   "retain_diagnostics": retained or None, "widths": list(res.widths), "heldout": res.heldout, "distill": distill,
                   "probes": probe_stats(train_p), "probe_config": probe_over or None,
                   "probe_scale": a.probe_scale,
                   "timings_s": {"probes_and_queries": round(t_probe, 1),
                   "fit": round(t_fit, 1), "eval": round(time.time() - t2, 1)},
                   "device": a.device, "steps": fcfg.steps, "fit_config": fcfg.to_dict(),
                   "peak_gpu_bytes_so_far": peak,  # torch's allocator peak since the run began (all manuals)
                   "train_dtype": str(train_dtype(fcfg.train_dtype, qtr.q[0].device)).removeprefix("torch."), **r}
            tag = "".join(f"_{k}{v}" for k, v in {**over, **probe_over}.items())
            tag += f"_probes{a.probe_scale:g}x" if a.probe_scale != 1 else ""
            tag += "_q16" if "query_dtype" not in over and fcfg.query_dtype == "float16" else ""  # older records: fp32
            name = f"{doc.stem}_{variant}_{alloc}_{budget:g}{'_onpolicy' if on_policy else ''}{tag}.json"
            (out_dir / name).write_text(json.dumps(rec, indent=1))
            m = r["methods"]["nectar"]
            print(f"{doc.stem:6s} {variant:10s} {alloc:8s} b={budget:<5g} on={int(on_policy)} "
                  f"bytes={100 * art_bytes / kvb:5.1f}%  agree={m['agreement']:.3f} kl={m['kl']:.3f} "
                  f"em={m['exact_match']:.2f} rouge={m['rouge_l']:.3f} | stream agree={r['methods']['streaming']['agreement']:.3f} "
                  f"| fit {t_fit:.0f}s" + (f" | retained {fcfg.retain_heads}x{kept.length} tokens, held-out err o "
                                           f"{subset_err['o']:.4f} lse {subset_err['lse']:.4f}" if kept else "") + (f" | distill held-out kl {distill['heldout_before']['kl_topk']:.4f} -> "
                  f"{distill['heldout_after']['kl_topk']:.4f} (step {distill['kept_step']}, {distill['seconds']:.0f}s)"
                  if distill else ""), flush=True)
            for k, info in retained.items():
                m = r["methods"][f"retain{k}"]
                print(f"    + exact {k:2d} heads ({100 * info['error_mass_share']:.0f}% of the error mass, "
                      f"bytes {100 * (art_bytes + info['bytes']) / kvb:5.1f}%): agree={m['agreement']:.3f} kl={m['kl']:.4f} "
                      f"em={m['exact_match']:.2f} rouge={m['rouge_l']:.3f}  heads {info['modules']}", flush=True)


def overrides(text: str, d=None) -> dict:
    """"steps=1200;linear_init=0" -> fields of `d` (default: FitConfig()) with their default's type."""
    from nectar_export.config import FitConfig

    d, out = d or FitConfig(), {}
    for item in filter(None, text.split(";")):
        k, v = item.split("=")
        dv = getattr(d, k)
        out[k] = v in ("1", "true", "True") if isinstance(dv, bool) else type(dv)(v) if dv is not None else _number(v)
    return out


def _number(v: str) -> int | float:
    """A field whose default is None (steps, budget_mb): int when the text is one."""
    try:
        return int(v)
    except ValueError:
        return float(v)


def _is_default(r: dict) -> bool:
    """A record of the current `nectar fit` defaults on its device (no overrides)."""
    from nectar_export.config import FitConfig

    want = FitConfig().for_device(str(r.get("device", "cpu")).split(":")[0]).to_dict()
    fc = effective_fit_config(r)
    if not fc.get("distill_steps"):  # without distillation its lr and batch never mattered
        want = {k: v for k, v in want.items() if k not in ("distill_lr", "distill_tokens")}
    from nectar_export.config import default_probe_scale

    default_probes = not r.get("probe_config") and r.get("probe_scale", 1) == default_probe_scale(str(r.get("device", "cpu")).split(":")[0])
    # the storage of the recorded queries is not a setting of the result: fp16 and fp32 gave the same
    # fits (docs/results.md, "fp16 storage of the recorded queries")
    return default_probes and (not r["on_policy"]) and all(fc.get(k) == v for k, v in want.items()
                                                           if k not in ("seed", "query_dtype"))


def effective_fit_config(r: dict) -> dict:
    """The record's fit config; records from before the distillation stage ran none (0 steps:
    the default)."""
    fc = dict(r.get("fit_config") or {})
    fc.setdefault("distill_steps", 0)
    fc.setdefault("query_dtype", "float32")  # records from before fp16 storage
    return fc


def setting_label(r: dict) -> str:
    fc = r.get("fit_config") or {}
    dtype = r.get("train_dtype", fc.get("train_dtype"))  # the resolved dtype; older records hold the setting
    train = f", {r['steps']} steps" + (f" {dtype}" if dtype else "") + (" lin-init" if fc.get("linear_init") else "")
    if fc.get("distill_steps"):
        train += f" + distill {fc['distill_steps']}×{fc['distill_tokens']} lr {fc['distill_lr']:g}"
    if "query_dtype" in fc:  # recorded since fp16 storage became the default (older records: fp32)
        train += f", {fc['query_dtype'].removeprefix('float')}-bit queries"
    if fc.get("retain_heads"):
        train += f", {fc['retain_heads']} retained heads" + (" int8" if fc.get("retain_dtype") == "int8" else "")
        train += f" × {fc['retain_tokens']} tokens" if fc.get("retain_tokens") else ""
    return f"{r['variant']} {r['allocation']} {r['budget_fraction']:g}{' on-policy' if r['on_policy'] else ''}{train}"


def report(a: argparse.Namespace) -> None:
    from nectar_export.metrics import SemanticEmbedder, mean

    out_dir = Path(a.out_dir)
    recs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    emb = SemanticEmbedder()
    for rec, p in zip(recs, sorted(out_dir.glob("*.json"))):
        ans = rec["answers"]
        for m, s in rec["methods"].items():
            if s.get("semantic_similarity") is None:
                s["semantic_similarity"] = mean(emb.similarity(ans[m], ans["full"]))
        p.write_text(json.dumps(rec, indent=1))
    if a.docs:
        write_docs(recs, a)
    else:
        print("\n".join(table_lines(recs)))


def table_lines(recs: list[dict]) -> list[str]:
    """The markdown table of records: per (manual, setting) the nectar, streaming and none rows."""
    cols = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")
    lines = ["| manual | n | setting | bytes % of KV | method | " + " | ".join(cols) + " |",
             "|---|---|---|---|---|" + "---|" * len(cols)]
    for r in sorted(recs, key=lambda r: (r["manual"], r["variant"], r["allocation"], r["budget_fraction"], r["on_policy"], setting_label(r))):
        for m in ("nectar", "streaming", "none"):
            s = r["methods"][m]
            lines.append(f"| {r['manual']} | {r['n_tokens']} | {setting_label(r)} | {100 * r['artifact_bytes'] / r['kv_bytes']:.1f} | {m} | "
                         + " | ".join(f"{s[c]:.3f}" if s[c] is not None else "-" for c in cols) + " |")
    return lines


def write_docs(recs: list[dict], a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = table_lines(recs)
    defaults = [r for r in recs if _is_default(r)]  # the current defaults: stars
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("agreement", "kl")):
        for manual in sorted({r["manual"] for r in recs}):
            pts = sorted((100 * r["artifact_bytes"] / r["kv_bytes"], r["methods"]["nectar"][metric], r["methods"]["streaming"][metric])
                         for r in recs if r["manual"] == manual and r["variant"] == "mlp" and r["allocation"] == "uniform" and not r["on_policy"])
            if len(pts) < 2:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{manual} nectar")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "x--", color=line.get_color(), alpha=0.6, label=f"{manual} streaming")
            for r in (r for r in defaults if r["manual"] == manual):  # a star of the manual's colour
                ax.plot(100 * r["artifact_bytes"] / r["kv_bytes"], r["methods"]["nectar"][metric], "*", ms=12,
                        color=line.get_color(), label="current defaults (stars)" if r is defaults[0] else None)
        ax.set_xlabel("artifact bytes, % of the document's fp16 KV")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Nectar vs equal-bytes StreamingLLM (SmolLM2-135M-Instruct): lines uniform widths, 1,200 fp32 steps")
    fig.tight_layout()
    img = ROOT / "docs" / "img" / "quality_vs_size.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    block = "\n".join(["<!-- quality:begin -->", f"Records: `{Path(a.out_dir).resolve().relative_to(ROOT) if Path(a.out_dir).resolve().is_relative_to(ROOT) else a.out_dir}` ({len(recs)} settings).", "",
                       *lines, "", "![quality vs size](img/quality_vs_size.png)", "<!-- quality:end -->"])
    doc = ROOT / "docs" / "results.md"
    text = doc.read_text() if doc.exists() else "# Results\n\n<!-- quality:begin -->\n<!-- quality:end -->\n"
    start, end = text.index("<!-- quality:begin -->"), text.index("<!-- quality:end -->") + len("<!-- quality:end -->")
    doc.write_text(text[:start] + block + text[end:])
    print(f"wrote {doc} and {img}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--manuals", default=str(ROOT.parent / "shared" / "data" / "manuals"))
    r.add_argument("--only", default="", help="comma-separated manual names")
    r.add_argument("--model", default=None)
    r.add_argument("--device", default="cpu")
    r.add_argument("--budgets", default=None, help="comma-separated budget fractions (default: FitConfig's)")
    r.add_argument("--allocations", default=None, help="comma-separated (default: FitConfig's)")
    r.add_argument("--extra", default="", help="more settings: budget:allocation:variant:onpolicy, comma-separated")
    r.add_argument("--extra-only", action="store_true", help="only the --extra settings (no --budgets × --allocations ones)")
    r.add_argument("--steps", type=int, default=None, help="training steps (default: FitConfig's)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch", type=int, default=16, help="generation batch for probes and evaluation")
    r.add_argument("--no-semantic", dest="semantic", action="store_false")
    r.add_argument("--quick", action="store_true", help="tiny probe set (smoke test)")
    r.add_argument("--probe-scale", type=float, default=None,
                   help="probe count multiplier (nectar fit --probe-scale; default: nectar fit's on --device)")
    r.add_argument("--probes", default="", help="ProbeConfig overrides, e.g. 'model_questions=64;chains=16'")
    r.add_argument("--retain-heads", default="", help="also evaluate Nectar with exact attention kept for the k "
                   "worst KV heads, for each k of this comma-separated list (nectar_export/retained.py)")
    r.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "quality"))
    r.set_defaults(func=run)
    q = sub.add_parser("report")
    q.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results" / "quality"))
    q.add_argument("--no-docs", dest="docs", action="store_false",
                   help="fill in semantic similarity and print the table only (other models' records)")
    q.set_defaults(func=report)
    a = p.parse_args(argv)
    a.func(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
