"""The whole build: every probe source for one document in a fixed order, chains within each
side of the held-out split (`heldout_keys`), `split_probes` and `probe_stats`."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from nectar_runtime.document import DocumentContext, local_ids
from nectar_runtime.generate import GenerationConfig
from nectar_runtime.sampling import SamplingConfig

from ..answering import answer_backend, decode_answers, generate_answers
from ..doc_structure import DocStructure, extract_structure
from .config import KINDS, Probe, ProbeConfig, question_key
from .excerpts import cut_to_tokens, excerpt_requests
from .model_questions import WRITE_QUESTION, WRITE_QUESTION_ABOUT, _focus_points, parse_model_question, trim_repetition
from .templated import templated_questions

def heldout_keys(keys: list[str], frac: float, seed: int) -> set[str]:
    """round(frac * distinct keys) keys (at least one when frac > 0 and there are two or more), chosen by
    a seeded hash: the same keys, frac and seed always give the same side for every key."""
    uniq = set(keys)
    if frac <= 0 or len(uniq) < 2:
        return set()
    k = min(len(uniq) - 1, max(1, round(frac * len(uniq))))
    ranked = sorted(uniq, key=lambda x: hashlib.blake2b(f"{seed}\0{x}".encode(), digest_size=8).digest())
    return set(ranked[:k])


def _chains(pairs: list[tuple[str, str, str, int]], count: int, span: int, max_local: int,
            ctx: DocumentContext, tokenizer, rng: random.Random) -> list[Probe]:
    """`count` conversations of Q/A pairs (key, question, answer, its probe's local length: a
    token estimate) whose local length reaches `span` (within `max_local`); each question at
    most once per chain while the pool lasts."""
    by_key: dict[str, list[tuple[str, str, str, int]]] = {}
    for p in pairs:
        by_key.setdefault(p[0], []).append(p)
    keys = sorted(by_key)
    out = []
    for _ in range(count if keys else 0):
        order = rng.sample(keys, len(keys))
        turns: list[dict] = []
        used: list[str] = []
        est, i, ids = 0, 0, []
        while i < 4 * len(order):
            key, q, a, n_tok = rng.choice(by_key[order[i % len(order)]])
            i += 1
            if est + n_tok > max_local:
                break
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            used.append(key)
            est += n_tok
            if est >= span:
                ids = local_ids(ctx, tokenizer, turns)
                if len(ids) > max_local:  # the estimate was short: drop the last pair
                    turns, used = turns[:-2], used[:-1]
                    break
                if len(ids) >= span:
                    break
        if len(turns) >= 4:
            ids = local_ids(ctx, tokenizer, turns)
            out.append(Probe("chain", f"chain:{used[0]}", turns, ids, tuple(dict.fromkeys(used))))
    return out


# ---------------------------------------------------------------- the whole build


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ask(q: str, answer: str | None = None) -> list[dict]:
    turns = [{"role": "user", "content": q}]
    return turns if answer is None else turns + [{"role": "assistant", "content": answer}]


@dataclass
class _Builder:
    """What every stage needs: the model with the document, the tokenizer, the config, one RNG."""

    model: object
    tokenizer: object
    ctx: DocumentContext
    doc_contexts: list
    cfg: ProbeConfig
    progress: bool
    rng: random.Random
    backend: object = None  # one answering backend for every generation (answering.answer_backend)

    def probe(self, kind: str, question: str, turns: list[dict]) -> Probe:
        return Probe(kind, question_key(question), turns, local_ids(self.ctx, self.tokenizer, turns))

    def generate(self, convs: list[list[dict]], max_tokens: int, sampling: SamplingConfig, desc: str) -> list[str]:
        """The next assistant turn of each conversation, batched, with the exact document."""
        with tqdm(total=len(convs), desc=desc, unit="conv", disable=not self.progress) as bar:
            if self.backend is None:
                self.backend = answer_backend(self.model, self.doc_contexts, self.ctx.n)
            ids = generate_answers(self.model, self.tokenizer, self.ctx, self.doc_contexts, convs,
                                   GenerationConfig(max_tokens, sampling), self.cfg.batch_size, bar, self.backend)
        return decode_answers(self.tokenizer, ids)

    def model_questions(self, st: DocStructure, seen: set[str]) -> tuple[list[Probe], list[str]]:
        """Questions the model writes with the document in context, sampled, parsed, deduplicated;
        a second round only if too many replies were junk or repeats."""
        cfg, rng = self.cfg, self.rng
        focus = _focus_points(self.ctx.text, st)
        probes, questions = [], []
        for round_ in range(2):
            need = cfg.model_questions - len(questions)
            if need <= 0:
                break
            n = -(-(need + need // 2) // cfg.batch_size) * cfg.batch_size  # ~1.5x, in whole batches
            prompts = [WRITE_QUESTION if not focus or rng.random() < 0.25 else
                       WRITE_QUESTION_ABOUT.format(x=rng.choice(focus)) for _ in range(n)]
            sampling = SamplingConfig(cfg.question_temperature, top_p=cfg.question_top_p, seed=cfg.seed * 1000 + 1 + round_)
            raws = self.generate([_ask(p) for p in prompts], cfg.max_question_tokens, sampling,
                                 f"probes: model questions ({round_ + 1})")
            for prompt, raw in zip(prompts, raws, strict=True):
                q = parse_model_question(raw, self.ctx.text)
                if q is None or question_key(q) in seen or len(questions) == cfg.model_questions:
                    continue
                seen.add(question_key(q))
                questions.append(q)
                probes.append(self.probe("model_question", q, _ask(prompt, raw)))
        return probes, questions

    def answers(self, questions: list[str]) -> list[Probe]:
        """The full-context model's own answers: greedy, then sampled; cut at degenerate loops."""
        cfg = self.cfg
        convs = [_ask(q) for q in questions]
        runs = [("answer_greedy", convs, SamplingConfig())]
        if cfg.sampled_answers_per_question:
            sampled = SamplingConfig(cfg.answer_temperature, seed=cfg.seed * 1000 + 11)
            runs.append(("answer_sampled", convs * cfg.sampled_answers_per_question, sampled))
        probes = []
        for kind, cs, sampling in runs:
            answers = self.generate(cs, cfg.max_answer_tokens, sampling, f"probes: {kind.split('_')[1]} answers")
            for conv, a in zip(cs, answers, strict=True):
                if a := trim_repetition(a):
                    probes.append(self.probe(kind, conv[0]["content"], _ask(conv[0]["content"], a)))
        return probes

    def excerpts(self, st: DocStructure, seen: set[str]) -> list[Probe]:
        requests = excerpt_requests(self.ctx.text, st, self.cfg.excerpts, self.rng)
        probes = []
        for req, start, end in tqdm(requests, desc="probes: excerpts", unit="excerpt", disable=not self.progress):
            if question_key(req) not in seen:
                seen.add(question_key(req))
                ex = cut_to_tokens(self.ctx.text[start:end].strip("\n"), self.tokenizer, self.cfg.max_excerpt_tokens)
                probes.append(self.probe("excerpt", req, _ask(req, ex)))
        return probes

    def chains(self, probes: list[Probe]) -> list[Probe]:
        """Chains from the Q/A pairs of `probes`, built within each side of the held-out split."""
        cfg = self.cfg
        max_local = self.model.config.max_position - self.ctx.n
        span = min(cfg.min_position_span, max_local)
        held = heldout_keys([p.question_key for p in probes], cfg.holdout_frac, cfg.seed)
        n_held = min(cfg.chains, max(1, round(cfg.chains * cfg.holdout_frac))) if held else 0
        pairs = [(p.question_key, p.turns[0]["content"], p.turns[1]["content"], len(p.ids))
                 for p in probes if p.kind.startswith("answer") or p.kind == "excerpt"]
        out = []
        with tqdm(total=cfg.chains, desc="probes: chains", unit="chain", disable=not self.progress) as bar:
            for side, count in ((False, cfg.chains - n_held), (True, n_held)):
                side_pairs = [p for p in pairs if (p[0] in held) == side]
                out += _chains(side_pairs, count, span, max_local, self.ctx, self.tokenizer, self.rng)
                bar.update(count)
        return out


def build_probes(model, tokenizer, ctx: DocumentContext, doc_contexts: list, cfg: ProbeConfig,
                 progress: bool = True) -> list[Probe]:
    """All probes for one document, deterministic given cfg.seed.

    doc_contexts: the exact per-layer document KV the model answers with
    (`model.prefill_document(torch.tensor([ctx.context_ids])).contexts()`).
    Order: templated, model_question, answer_greedy, answer_sampled, excerpt, chain.
    """
    _seed_everything(cfg.seed)
    b = _Builder(model, tokenizer, ctx, doc_contexts, cfg, progress, random.Random(cfg.seed))
    st = extract_structure(ctx.text)
    questions = templated_questions(ctx.text, st, cfg.templated_questions, b.rng)
    probes = [b.probe("templated", q, _ask(q, "")) for q in questions]
    seen = {question_key(q) for q in questions}
    if cfg.model_questions:
        written, model_qs = b.model_questions(st, seen)
        probes += written
        questions += model_qs
    if questions:
        probes += b.answers(questions)
    probes += b.excerpts(st, seen)
    if cfg.chains:
        probes += b.chains(probes)
    return probes


def split_probes(probes: list[Probe], holdout_frac: float, seed: int) -> tuple[list[Probe], list[Probe]]:
    """(train, held-out) by question: every probe of one question (its prompt, answers, excerpt)
    lands on one side; a chain goes to the side all its questions are on, and is dropped if they
    are on both (never the case with the cfg.holdout_frac and cfg.seed it was built with)."""
    keys = [p.question_key for p in probes if p.kind != "chain"]
    held = heldout_keys(keys, holdout_frac, seed)
    train, heldout = [], []
    for p in probes:
        sides = {k in held for k in p.question_keys}
        if sides == {False}:
            train.append(p)
        elif sides == {True}:
            heldout.append(p)
    return train, heldout


def probe_stats(probes: list[Probe]) -> dict:
    lengths = [len(p.ids) for p in probes]
    per_kind = {k: sum(p.kind == k for p in probes) for k in KINDS}
    tokens = {k: sum(len(p.ids) for p in probes if p.kind == k) for k in KINDS}
    return {
        "probes": len(probes),
        "questions": len({p.question_key for p in probes if p.kind != "chain"}),
        "per_kind": per_kind,
        "tokens": sum(lengths),
        "tokens_per_kind": tokens,
        "max_local_len": max(lengths, default=0),
        "mean_local_len": round(sum(lengths) / max(1, len(lengths)), 1),
    }
