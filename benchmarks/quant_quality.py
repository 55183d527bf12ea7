"""int8 / int4 bundles against their fp32 bundle: next-token top-1 agreement and mean
KL(fp32 ‖ quantized), teacher-forced over the full-context fp32 bundle's greedy answers (≤ 64
tokens) to manual questions — the same token sequences for every row. All on ONNX Runtime
(CPU), so within a row only quantization differs.

    python benchmarks/quant_quality.py --bundles benchmarks/work/ort_decode --questions 12

Uses the bundles benchmarks/ort_decode.py wrote (`{method}_{fp32,int8,int4}_{n}[_fixed]`), and
the questions of the manual the document starts with. Writes benchmarks/results/quant_quality.json
and the section of docs/results.md between `<!-- quant_quality:begin -->` / `<!-- quant_quality:end -->`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cpu import write_docs  # noqa: E402

MANUALS = REPO.parent / "shared" / "data" / "manuals"
BEGIN, END = "<!-- quant_quality:begin -->", "<!-- quant_quality:end -->"


def session(bundle: Path):
    from nectar_runtime.bundle_session import open_bundle_session

    return open_bundle_session(bundle, threads=2)


def greedy_answer(sess, question: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy answer ids) from the reference bundle."""
    from nectar_runtime.generate import GenerationConfig, generate_ids

    prompt = sess.prompt_ids(question, chat=True)
    eos = set(sess.tokenizer.eos_token_ids)
    out = []
    for t in generate_ids(sess.backend, [prompt], GenerationConfig(max_new_tokens=max_tokens), eos):
        if t[0] < 0 or int(t[0]) in eos:
            break
        out.append(int(t[0]))
    return prompt, out


def teacher_forced_logprobs(backend, context_len: int, prompt: list[int], answer: list[int]) -> np.ndarray:
    """log-probabilities [len(answer), V] of each answer token's position, decode step by step."""
    backend.reset(1, len(prompt) + len(answer) + 1)
    logits = backend.step(np.array([prompt]), context_len + np.arange(len(prompt))[None])
    rows = []
    for i, tok in enumerate(answer):
        lg = np.asarray(logits[0], np.float64)
        rows.append(lg - np.logaddexp.reduce(lg))
        logits = backend.step(np.array([[tok]]), np.array([[context_len + len(prompt) + i]]))
    return np.array(rows)


def reference_answers(answers_from: Path, questions: list[str], max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) per question from `answers_from`; empty answers dropped."""
    src = session(answers_from)
    return [pa for pa in (greedy_answer(src, q, max_tokens) for q in questions) if pa[1]]


def fidelity_to_reference(report: dict, work: Path, reference: str, questions: int, max_tokens: int, log) -> None:
    """Per artifact of `report` (`artifacts`: name, manual), the reference bundle `work/{name}_{reference}`'s
    greedy answers to the first `questions` questions of its manual, then every other bundle record of that
    artifact (`bundles`: artifact_name, variant, bundle) gets its `fidelity` (`compare`) over those answers."""
    for art in report["artifacts"]:
        qf = (MANUALS / art["manual"]).with_suffix(".questions.jsonl")
        qs = [json.loads(x)["question"] for x in qf.read_text().splitlines() if x.strip()][:questions]
        ref = work / f"{art['name']}_{reference}"
        answers = reference_answers(ref, qs, max_tokens)  # once per document
        for r in report["bundles"]:
            if r["artifact_name"] == art["name"] and r["variant"] != reference:
                log(f"fidelity of {r['bundle']} …")
                r["fidelity"] = compare(ref, work / r["bundle"], answers)


def compare(ref_bundle: Path, other: Path, answers: list[tuple[list[int], list[int]]]) -> dict:
    """Teacher-forced over `answers` (`reference_answers`, e.g. of the full-context fp32 bundle of
    the same document): the same token sequences for every method, whatever its own answers."""
    ref, oth = session(ref_bundle), session(other)
    n = ref.backend.context_len
    agree, kls, tokens = [], [], 0
    for prompt, ans in answers:
        a = teacher_forced_logprobs(ref.backend, n, prompt, ans)
        b = teacher_forced_logprobs(oth.backend, n, prompt, ans)
        agree += list(a.argmax(-1) == b.argmax(-1))
        kls += list((np.exp(a) * (a - b)).sum(-1))
        tokens += len(ans)
    return {"agreement": float(np.mean(agree)), "kl": float(np.mean(kls)), "tokens": tokens, "questions": len(answers)}


def docs_section(report: dict) -> str:
    lines = [BEGIN, "## Quantized bundles against fp32 (ONNX Runtime)", "",
             f"Command: `python benchmarks/quant_quality.py {report['argv']}` ({report['date']}). Teacher-forced over the full-context "
             f"fp32 bundle's greedy answers (≤ {report['max_tokens']} tokens) to the first {report['questions']} questions of "
             f"{report['manual']} (the documents start with it); the Nectar rows use the short-fit artifacts of "
             "benchmarks/ort_decode.py (quantization error only: both sides have the same heads). *heads*: the artifact's "
             "budget, and whether the quantized bundle holds its heads at 8 bits (weights of ≥ 256 KiB) or fp32.", "",
             "| method | n | heads | quantize | top-1 agreement with fp32 | mean KL(fp32 ‖ q) | answer tokens | bundle MB (fp32 MB) |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for r in sorted(report["rows"], key=lambda r: (r["method"], r["n"], r.get("heads", ""), r["quantize"])):
        lines.append(f"| {r['method']} | {r['n']} | {r.get('heads', '')} | {r['quantize']} | {r['agreement']:.3f} | {r['kl']:.4f} | "
                     f"{r['tokens']} | {r['bundle_mb']:.0f} ({r['fp32_mb']:.0f}) |")
    lines += ["", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", default=str(REPO / "benchmarks" / "work" / "ort_decode"))
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quant_quality.json"))
    a = ap.parse_args(argv)
    root = Path(a.bundles)
    first_manual = sorted(MANUALS.glob("*.txt"))[0]
    qs = [json.loads(x)["question"] for x in first_manual.with_suffix(".questions.jsonl").read_text().splitlines() if x.strip()]
    qs = qs[: a.questions]
    rows, answers = [], {}  # answers: per full-context bundle, generated once
    for ref in sorted(root.glob("*_fp32_*")):
        if not (ref / "manifest.json").is_file():
            continue
        for kind in ("int8", "int4", "int4-rtn"):
            other = ref.with_name(ref.name.replace("_fp32_", f"_{kind}_"))
            if not (other / "manifest.json").is_file():
                continue
            t0 = time.perf_counter()
            m = json.loads((ref / "manifest.json").read_text())
            full = root / f"full_fp32_{ref.name.split('_')[2]}"
            if full not in answers:
                answers[full] = reference_answers(full, qs, a.max_tokens)
            r = compare(ref, other, answers[full])
            mq = json.loads((other / "manifest.json").read_text())
            heads = "" if m["method"] == "full" else (
                f"{'default budget' if ref.name.endswith('_default') else 'fixed 2.8 MB'}, {'8-bit' if mq.get('quantize_heads') else 'fp32'}")
            r.update(method=m["method"], quantize=kind, n=m["context_len"], reference=ref.name, heads=heads,
                     bundle_mb=sum(f.stat().st_size for f in other.iterdir()) / 1e6,
                     fp32_mb=sum(f.stat().st_size for f in ref.iterdir()) / 1e6, seconds=round(time.perf_counter() - t0, 1))
            print(json.dumps(r), file=sys.stderr)
            rows.append(r)
    report = {"date": time.strftime("%Y-%m-%d"), "manual": first_manual.name, "argv": " ".join(argv if argv is not None else sys.argv[1:]),
              "questions": len(qs), "max_tokens": a.max_tokens, "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    write_docs(REPO / "docs" / "results.md", docs_section(report), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
