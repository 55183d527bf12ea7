"""Compare ways of standing for a document ("methods") against the full document KV cache.

A method is a per-layer list of context parts (see answering.py): the exact document KV
("full", the reference), None (no document), a StreamingLLM subset, Nectar's fitted heads.
Two views, over the same questions:

- teacher-forced: every method reads the full-context greedy answer to each question; at each
  answer position (the one predicting the first answer token through the one predicting the
  EOS after the last) its next-token distribution q is compared with full's p: top-1 agreement
  (argmax p == argmax q) and KL(p ‖ q), averaged over all those positions of all questions.
- free generation: every method answers greedily by itself; its answers are scored against
  full's (exact match, ROUGE-L, semantic similarity) and against the reference answer strings
  (QA accuracy: the string occurs in the answer).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from nectar_runtime.document import DocumentContext, local_ids
from nectar_runtime.generate import GenerationConfig

from .answering import decode_answers, generate_answers
from .collect import left_padded
from .metrics import SemanticEmbedder, exact_match, mean, qa_accuracy, rouge_l

REFERENCE = "full"
COLUMNS = ("agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy")


@torch.no_grad()
def teacher_forced_logprobs(
    model, contexts: list | None, context_len: int, prompts: list[list[int]], answers: list[list[int]],
    with_eos: list[bool],
) -> list[torch.Tensor]:
    """Next-token log-probabilities at the answer positions of prompt + answer, one forward pass.

    Sequences are left-padded into one batch, local positions start at `context_len`. For answer
    i of length L the rows are the predictions of answer[0..L-1] and, if with_eos[i], of the token
    after the answer (its EOS): a [L (+1), V] fp32 tensor per sequence.
    """
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
    b, t = len(seqs), max(len(s) for s in seqs)
    ids, pos, _ = left_padded(seqs, list(range(b)), context_len, model.embed_tokens.weight.device)
    cache = model.new_cache(b, t, contexts, context_len)
    logits = model(ids, pos, cache)  # [B, T, V] fp32
    out = []
    for i, (p, a, eos) in enumerate(zip(prompts, answers, with_eos)):
        first = t - len(seqs[i]) + len(p) - 1  # the last prompt token predicts answer[0]
        rows = logits[i, first : first + len(a) + int(eos)]  # [L (+1), V]
        out.append(torch.log_softmax(rows.float(), dim=-1))
    return out


def compare_distributions(ref: torch.Tensor, other: torch.Tensor) -> tuple[int, float]:
    """ref, other: [N, V] log-probs -> (positions where the argmaxes agree, summed KL(ref ‖ other)) in fp64."""
    agree = int((ref.argmax(-1) == other.argmax(-1)).sum())
    r, o = ref.double(), other.double()
    kl = (r.exp() * (r - o)).sum(-1).clamp(min=0.0)  # [N]; the clamp drops rounding below zero
    return agree, float(kl.sum())


def evaluate_methods(
    model, tokenizer, ctx: DocumentContext, methods: dict[str, list | None], questions: list[dict],
    max_answer_tokens: int = 64, batch_size: int = 8, progress: bool = True,
    embedder: SemanticEmbedder | None = None,
) -> dict:
    """Score every method against "full" (which must be among `methods`) on `questions`.

    questions: [{"id", "question", "answer"}]; `answer` is the reference string for QA accuracy
    (None or "": the question does not count towards QA accuracy).
    Returns {"methods": {name: {agreement, kl, exact_match, rouge_l, semantic_similarity,
    qa_accuracy}}, "answers": {name: [answer text per question]}, "first_divergence": {name:
    [answer token index where the method's free answer first leaves full's, None if identical]},
    "n_questions", "n_answer_tokens"} (the number of teacher-forced positions). Pass `embedder` to reuse a
    loaded `SemanticEmbedder`.
    """
    if REFERENCE not in methods:
        raise ValueError(f"methods must include {REFERENCE!r}, the reference; got {sorted(methods)}")
    if not questions:
        raise ValueError("no questions to evaluate")
    names = [REFERENCE] + [m for m in methods if m != REFERENCE]
    convs = [[{"role": "user", "content": q["question"]}] for q in questions]
    gen = GenerationConfig(max_new_tokens=max_answer_tokens)
    nq = len(questions)
    bar = tqdm(total=nq * (2 * len(names) - 1), desc="evaluate", unit="answer", disable=not progress)

    # Free generation; full's greedy answers are also the teacher-forced reference.
    ids = {}
    for name in names:
        bar.set_postfix_str(f"generate {name}")
        ids[name] = generate_answers(model, tokenizer, ctx, methods[name], convs, gen, batch_size, bar)
    ref = ids[REFERENCE]
    # An answer shorter than the limit ended in EOS: its prediction is scored too.
    with_eos = [len(a) < max_answer_tokens for a in ref]
    prompts = [local_ids(ctx, tokenizer, c) for c in convs]

    agree = {m: 0 for m in names[1:]}
    kl = {m: 0.0 for m in names[1:]}
    n_tok = 0
    order = sorted(range(nq), key=lambda i: len(prompts[i]) + len(ref[i]))  # similar lengths pad less
    for s in range(0, nq, batch_size):
        idx = order[s : s + batch_size]
        args = ([prompts[i] for i in idx], [ref[i] for i in idx], [with_eos[i] for i in idx])
        bar.set_postfix_str("teacher-forced")
        lp_ref = torch.cat(teacher_forced_logprobs(model, methods[REFERENCE], ctx.n, *args))  # [N, V]
        n_tok += lp_ref.shape[0]
        for m in names[1:]:
            lp = torch.cat(teacher_forced_logprobs(model, methods[m], ctx.n, *args))
            a, k = compare_distributions(lp_ref, lp)
            agree[m] += a
            kl[m] += k
            bar.update(len(idx))
    bar.close()

    texts = {m: decode_answers(tokenizer, ids[m]) for m in names}
    if embedder is not False:  # False: skip the metric (no MiniLM weights on this machine)
        embedder = embedder or SemanticEmbedder()
    refs = [q["answer"] for q in questions]
    scores = {}
    for m in names:
        scores[m] = {
            "agreement": agree[m] / n_tok if m != REFERENCE else 1.0,
            "kl": kl[m] / n_tok if m != REFERENCE else 0.0,
            "exact_match": mean(exact_match(a, r) for a, r in zip(texts[m], texts[REFERENCE])),
            "rouge_l": mean(rouge_l(a, r) for a, r in zip(texts[m], texts[REFERENCE])),
            "semantic_similarity": mean(embedder.similarity(texts[m], texts[REFERENCE])) if embedder is not False else None,
            # over the questions that carry a reference answer; None when none does
            "qa_accuracy": mean(qa_accuracy(a, r) for a, r in zip(texts[m], refs) if r) if any(refs) else None,
        }
    divergence = {m: [first_divergence(r, o) for r, o in zip(ref, ids[m])] for m in names[1:]}
    return {"methods": scores, "answers": texts, "first_divergence": divergence, "n_questions": nq,
            "n_answer_tokens": n_tok, "questions": [{k: q.get(k) for k in ("id", "question", "answer")} for q in questions]}


def first_divergence(ref: list[int], other: list[int]) -> int | None:
    """Index of the first answer token where `other` leaves `ref`; None when the two are identical."""
    for i, (a, b) in enumerate(zip(ref, other)):
        if a != b:
            return i
    return None if len(ref) == len(other) else min(len(ref), len(other))


def format_table(result: dict) -> str:
    """The per-method scores of `evaluate_methods` as an aligned text table."""
    heads = ("method", "agree", "KL", "exact", "rouge-L", "semantic", "QA acc")
    rows = [heads] + [
        (name, *("-" if s[c] is None else f"{s[c]:.4f}" for c in COLUMNS)) for name, s in result["methods"].items()
    ]
    widths = [max(len(r[j]) for r in rows) for j in range(len(heads))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    nq = result["n_questions"]
    foot = [f"{nq} question{'s' * (nq != 1)}, {result['n_answer_tokens']} teacher-forced answer positions"]
    if result.get("first_divergence"):
        parts = []
        for m, d in result["first_divergence"].items():
            left = sorted(i for i in d if i is not None)
            parts.append(f"{m} {left[len(left) // 2] if left else '-'} ({len(d) - len(left)} identical)")
        foot.append("free answers leave full's at answer token (median): " + ", ".join(parts))
    return "\n".join(lines + foot)
