"""Self-study probes: conversations about the document whose local queries train the Nectar heads.

A probe is a conversation placed after the document (`context.local_ids`); every token of it
gives, in every layer, a query q whose exact attention over the document the heads must learn.
The probes should look like real use, so they come from five sources:

- "templated": questions written from the document's structure (`doc_structure`): headings,
  option definitions, terms, paragraphs ("What does -i do?", "Explain the section X.").
  Turns: the question, then an empty assistant turn (the prompt as a user sends it).
- "model_question": the model, reading the document, writes a question (sampled). Turns: the
  writing instruction, then the model's reply. The parsed question is asked like the others.
- "answer_greedy" / "answer_sampled": the full-context model's own answers to every question
  (templated and model-written), greedy and sampled; cut at degenerate repetition.
- "excerpt": the user asks to quote a part; the assistant turn is the document's own text.
- "chain": earlier Q/A pairs concatenated into one multi-turn conversation whose local
  positions reach n + `min_position_span`, so far positions are covered too.

The last assistant turn of every probe is left open (teacher-forced, no turn end). Probes are
grouped by `question_key` for the held-out split; chains are built within each side of the split
(`ProbeConfig.holdout_frac`, `seed`), so `split_probes` with the same values keeps all of them.
"""

from __future__ import annotations

import hashlib
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm.auto import tqdm

from nectar_runtime.errors import NectarError
from nectar_runtime.generate import GenerationConfig
from nectar_runtime.sampling import SamplingConfig

from .answering import answer_backend, decode_answers, generate_answers
from nectar_runtime.document import DocumentContext, local_ids
from .doc_structure import STOPWORDS, DocStructure, OptionDef, extract_structure

KINDS = ("templated", "model_question", "answer_greedy", "answer_sampled", "excerpt", "chain")


@dataclass(frozen=True)
class ProbeConfig:
    """How many probes of each source; generation lengths and temperatures; the held-out split."""

    templated_questions: int = 48  # 48 + 32 questions = 5 generation batches of 16 per answer kind
    model_questions: int = 32
    sampled_answers_per_question: int = 1
    excerpts: int = 16
    chains: int = 8
    max_answer_tokens: int = 96
    max_question_tokens: int = 32
    max_excerpt_tokens: int = 160
    min_position_span: int = 1024  # chains reach local position n + this (capped by the window)
    question_temperature: float = 0.8
    question_top_p: float = 0.95  # keeps a 135M model's written questions out of the junk tail
    answer_temperature: float = 0.7
    holdout_frac: float = 0.15  # chains are built within each side of this split
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        counts = ("templated_questions", "model_questions", "sampled_answers_per_question", "excerpts", "chains")
        for name in counts:
            if getattr(self, name) < 0:
                raise NectarError(f"probe config: {name} must be >= 0, got {getattr(self, name)}")
        if self.templated_questions + self.model_questions + self.excerpts == 0:
            raise NectarError("probe config: no questions and no excerpts; nothing to build probes from")
        for name in ("max_answer_tokens", "max_question_tokens", "max_excerpt_tokens", "min_position_span", "batch_size"):
            if getattr(self, name) < 1:
                raise NectarError(f"probe config: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("question_temperature", "answer_temperature"):
            if not 0 < getattr(self, name) <= 2:
                raise NectarError(f"probe config: {name} must be in (0, 2], got {getattr(self, name)}")
        if not 0 < self.question_top_p <= 1:
            raise NectarError(f"probe config: question_top_p must be in (0, 1], got {self.question_top_p}")
        if not 0 <= self.holdout_frac < 1:
            raise NectarError(f"probe config: holdout_frac must be in [0, 1), got {self.holdout_frac}")

    def scaled(self, factor: float) -> "ProbeConfig":
        """The same probe mix with every probe count times `factor` (rounded, at least 1 where
        the count was positive). More probes cost probe generation, collection time and fit
        memory in proportion; on an H100, 4x lowered KL on all six development manuals
        (docs/results.md, "More probes")."""
        if not 0 < factor <= 64:
            raise NectarError(f"probe config: scale (nectar fit --probe-scale) must be in (0, 64], got {factor:g}")
        counts = ("templated_questions", "model_questions", "excerpts", "chains")
        return replace(self, **{k: max(1, round(getattr(self, k) * factor)) if getattr(self, k) else 0 for k in counts})


@dataclass
class Probe:
    """One conversation after the document. ids == local_ids(ctx, tokenizer, turns), last turn open.

    question_keys: every question the probe contains (a chain has several; others just
    `question_key`).
    """

    kind: str
    question_key: str
    turns: list[dict]
    ids: list[int]
    question_keys: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown probe kind {self.kind!r}")
        if not self.question_keys:
            self.question_keys = (self.question_key,)


def question_key(text: str) -> str:
    """Normalized question: lower case, punctuation stripped; flags (-v vs -V) keep case and dashes."""
    text = unicodedata.normalize("NFKC", text).replace("\u2010", "-")
    words = []
    for w in text.split():
        if re.fullmatch(r"[\"'“‘(]*--?[A-Za-z0-9][\w-]*.*", w):
            words.append(re.sub(r"^[\"'“‘(]+|[^\w-]+$", "", w))
        else:
            words.append(re.sub(r"[^\w\s]", "", w.lower()))
    return " ".join(w for w in words if w)


# ---------------------------------------------------------------- templated questions

_SECTION_Q = (
    "Explain the section {t}.",
    'Summarize the section "{t}".',
    "What does the {t} section cover?",
    "What is described under {t}?",
    "Give an example of what the {t} section describes.",
    "What should I know about {t}?",
)
_OPTION_Q = ("What does {f} do?", "What is {f} used for?", "Give an example of using {f}.", "When should I use {f}?")
_OPTION_DEFAULT_Q = ("What is the default for {f}?",)
_OPTION_PAIR_Q = ("What is the difference between {a} and {b}?", "Is {a} the same as {b}?")
_OPTION_ARG_Q = ("What argument does {f} take?", "What is {arg} in {f}?")
_CLAUSE_Q = ("How do I {c}?", "Which option should I use to {c}?", "Which option lets me {c}?")
_TERM_Q = (  # names, code and defined terms
    "What is {t}?", "What does the text say about {t}?", "Explain {t}.", "How is {t} used?",
    "Give an example of {t}.", "What does {t} mean?", "Summarize what is said about {t}.",
)
_NAME_Q = (  # capitalized phrases: people, places, products
    "Who or what is {t}?", "What does the text say about {t}?", "What role does {t} play in the text?",
    "Summarize what is said about {t}.", "What do we learn about {t}?",
)
_PHRASE_Q = (  # plain lower-case phrases ("input file"): no bare "What is input file?"
    "What does the text say about {t}?", "Summarize what is said about {t}.", "What should I know about {t}?",
    "Where does the text mention {t}?", "How does the document describe {t}?",
)
_PASSAGE_Q = (
    'Summarize the paragraph that begins "{s}".',
    'What is the main point of the passage starting "{s}"?',
    'Explain the passage beginning "{s}".',
)
_GENERIC_Q = (
    "Summarize the text.", "What is this document about?", "List the main topics covered in the text.",
    "What are the key points of the text?", "Who is this text written for?",
    "Give an example of something described in the text.",
)
_NOT_IMPERATIVE = frozenset(
    "is are was were will can may has have does do must should instead also only usually normally like unlike "
    "same similar note see remaining default".split()
)


def snippet(text: str, words: int = 6) -> str:
    """The opening words of a passage, as a user would quote them (markup dropped)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text[:400]).replace("**", "")
    text = re.sub(r"^[\s#*>•-]+", "", text)
    return " ".join(text.split()[:words]).strip(".,;:!?\"'“”")


def prose_paragraphs(text: str, st: DocStructure) -> list:
    """Paragraphs that open like prose (mostly plain words), not with a flag, a synopsis or code."""
    flag_starts = {o.start for o in st.options}
    out = []
    for p in st.paragraphs:
        head = text[p.start : p.end].split()[:6]
        # words of letters in any script (accented, Cyrillic, CJK runs), optionally quoted or punctuated
        plain = sum(bool(re.fullmatch(r"[\"'“„«(]?[^\W\d_][^\W\d_'’\u2010-]*[,.;:!?)\"”»。、]?", w)) for w in head)
        if p.start not in flag_starts and not head[0].startswith("-") and plain >= 0.66 * len(head):
            out.append(p)
    return out


def option_clause(opt: OptionDef) -> str | None:
    """'Ignore case distinctions in patterns.' -> 'ignore case distinctions in patterns' (an
    imperative verb phrase a user could ask for), or None when the description is not one."""
    d = re.sub(r"^\([^)]*\)\s*", "", opt.description)  # "(HTTP) Tells curl ..."
    first = re.split(r"(?<=[.;])\s|;", d, maxsplit=1)[0].strip().rstrip(".;:")
    if len(first.split()) > 14:  # "Ignore case distinctions in patterns and input data, so that ..."
        first = first.split(", ", 1)[0]
    words = first.split()
    if not 3 <= len(words) <= 14 or not words[0].isalpha() or not words[0][0].isupper() or words[0].isupper():
        return None
    w = words[0].lower()
    if w.endswith(("ing", "ed", "ly")) or w in _NOT_IMPERATIVE or any(x in _NOT_IMPERATIVE for x in words[1:3]):
        return None
    if w in STOPWORDS:
        return None
    if w.endswith("ies"):
        w = w[:-3] + "y"
    elif w.endswith(("sses", "shes", "ches", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return " ".join([w] + words[1:])


def _option_questions(opt: OptionDef, rng: random.Random) -> list[str]:
    f = rng.choice(opt.flags)
    qs = [t.format(f=f) for t in _OPTION_Q]
    if "default" in opt.description.lower():
        qs += [t.format(f=f) for t in _OPTION_DEFAULT_Q]
    if len(opt.flags) > 1:
        qs += [t.format(a=opt.flags[0], b=opt.flags[1]) for t in _OPTION_PAIR_Q]
    if opt.arg:
        qs += [t.format(f=f, arg=opt.arg) for t in _OPTION_ARG_Q]
    if c := option_clause(opt):
        qs += [t.format(c=c) for t in _CLAUSE_Q] * 2  # the most natural phrasing: weight it up
    return qs


def _term_templates(term) -> tuple[str, ...]:
    if term.kind != "phrase" or term.text.isupper():
        return _TERM_Q
    return _PHRASE_Q if term.text.islower() else _NAME_Q


def _candidates(text: str, st: DocStructure, rng: random.Random) -> dict[str, list[list[str]]]:
    """Per category, per item, its candidate questions (each list shuffled)."""
    items = {
        "section": [[t.format(t=re.sub(r"^\d+(\.\d+)*\.?\s+", "", s.title)) for t in _SECTION_Q] for s in st.sections],
        "option": [_option_questions(o, rng) for o in st.options],
        "term": [[t.format(t=x.text) for t in _term_templates(x)] for x in st.terms],
        "passage": [[t.format(s=snippet(text[p.start : p.end])) for t in _PASSAGE_Q] for p in prose_paragraphs(text, st)],
        "generic": [[q] for q in _GENERIC_Q],
    }
    for lists in items.values():
        rng.shuffle(lists)
        for qs in lists:
            rng.shuffle(qs)
    return {k: v for k, v in items.items() if v}


def templated_questions(text: str, st: DocStructure, count: int, rng: random.Random) -> list[str]:
    """`count` distinct questions, round-robin over the categories the document has, one per item
    before any item gets a second phrasing."""
    cats = _candidates(text, st, rng)
    order = sorted(cats)
    rng.shuffle(order)
    cursors = {c: [0, 0] for c in order}  # (round, item index)
    rounds = {c: max(map(len, lists)) for c, lists in cats.items()}
    out, seen = [], set()
    while len(out) < count and order:
        for c in list(order):
            lists, cur = cats[c], cursors[c]
            while cur[0] < rounds[c]:
                qs = lists[cur[1]]
                q = qs[cur[0]] if cur[0] < len(qs) else None
                cur[1] += 1
                if cur[1] == len(lists):
                    cur[0], cur[1] = cur[0] + 1, 0
                if q is not None and question_key(q) not in seen:
                    seen.add(question_key(q))
                    out.append(q)
                    break
            else:
                order.remove(c)
            if len(out) == count:
                break
    return out


# ---------------------------------------------------------------- model-written questions

WRITE_QUESTION = "Write one question a user could ask about the text above. Reply with the question only."
WRITE_QUESTION_ABOUT = "Write one question a user could ask about {x} in the text above. Reply with the question only."
_IMPERATIVE_START = frozenset("explain describe give list summarize tell name compare show".split())


def _focus_points(text: str, st: DocStructure) -> list[str]:
    return (
        [f'the section "{s.title}"' for s in st.sections]
        + [o.flags[-1] for o in st.options]
        + [f'"{t.text}"' for t in st.terms]
        + [f'the passage beginning "{snippet(text[p.start : p.end])}"' for p in prose_paragraphs(text, st)]
    )


def parse_model_question(raw: str, document: str = "") -> str | None:
    """The question in the model's reply, or None for junk: no question (a question mark, or an
    imperative such as "Explain ..."), too short or long, looping, or with non-ASCII characters
    that the document never uses (script salad)."""
    lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    head = " ".join(lines[:2])  # a question may wrap onto a second line
    quoted = re.match(r"[^\"“?]*?(?:ask|question|:)[^\"“?]*[\"“]([A-Z][^\"”]{6,}?\?)", head, flags=re.I)
    if quoted:  # 'The user asks: "What ...?"'
        line = quoted.group(1)
    else:
        line = head if lines and "?" not in lines[0] and "?" in head else (lines[0] if lines else "")
        line = re.sub(r"^\**\s*(?:question|q)\s*\d*\s*[:.)\-]\s*\**\s*", "", line, flags=re.I)
        line = re.sub(r"^\w+(?:\s\w+)?\s*:\s+(?=[A-Z])", "", line)  # "Sentence: What ..."
        line = re.sub(r"^(?:\d+[.)]|[-*•])\s+", "", line)
    line = " ".join(line.split()).strip(" \"“”'*`")
    if "?" in line:
        line = line[: line.index("?") + 1]
    words = line.split()
    if not 3 <= len(words) <= 40 or len(line) > 300 or sum(c.isalpha() for c in line) < 10:
        return None
    if len({w.lower() for w in words}) < 0.5 * len(words) or re.search(r"(\w{1,3}?)\1{3,}|\S{30,}", line):
        return None
    if not line.endswith("?") and words[0].lower().strip(",") not in _IMPERATIVE_START:
        return None
    if re.match(r"(?i)(sure|here|certainly|of course|i |i'm|as an ai|the user)\b", line):
        return None
    if any(ord(c) > 127 and c not in document for c in line):
        return None
    return line


# ---------------------------------------------------------------- answers, excerpts, chains


def trim_repetition(text: str, keep: int = 2) -> str:
    """Cut a degenerate loop: from the third copy of a repeated line, or of a 1-4 word unit
    repeated back to back. What stays is a prefix of the model's real output."""
    seen: Counter[str] = Counter()
    pos = 0
    for line in text.splitlines(keepends=True):
        key = line.strip()
        if key:
            seen[key] += 1
            if seen[key] > keep:
                text = text[:pos]
                break
        pos += len(line)
    m = re.search(r"((\S+(?:\s+\S+){0,3}?)(?:\s+\2){%d})(?:\s+\2)+" % keep, text)
    if m:
        text = text[: m.end(1)]
    return text.rstrip()


def cut_to_tokens(text: str, tokenizer, max_tokens: int) -> str:
    """The longest prefix made of whole lines (or sentences) within max_tokens; at least one piece."""
    pieces = [p for p in re.split(r"(?<=\n)|(?<=[.!?] )", text) if p]
    out, n = "", 0
    for p in pieces:
        k = len(tokenizer.encode(p, add_special_tokens=False))
        if out and n + k > max_tokens:
            break
        out, n = out + p, n + k
    if n > max_tokens:  # one piece alone is too long: cut by tokens
        out = tokenizer.decode(tokenizer.encode(out, add_special_tokens=False)[:max_tokens])
    return out.rstrip()


_EXCERPT_Q = {
    "section": (
        'Repeat the section "{x}" verbatim.', 'Quote the text under the heading "{x}".',
        "Copy the {x} section exactly as it is written.", 'What does the section "{x}" say, word for word?',
    ),
    "option": (
        "Quote the part about {x}.", "Repeat the description of {x} word for word.", "Copy the exact text that documents {x}.",
    ),
    "passage": ('Repeat the paragraph that begins "{x}" verbatim.', 'Quote the passage starting with "{x}".'),
}


def excerpt_requests(text: str, st: DocStructure, count: int, rng: random.Random) -> list[tuple[str, int, int]]:
    """(request, start, end) spread over the document: one anchor per equal slice of the text."""
    anchors = (
        [("section", s.title, s.body_start, s.end) for s in st.sections if s.end - s.body_start >= 40]
        + [("option", o.flags[-1], o.start, o.end) for o in st.options]
        + [("passage", snippet(text[p.start : p.end]), p.start, p.end) for p in prose_paragraphs(text, st)]
    )
    if count == 0:
        return []
    if len(anchors) < count:  # little structure found (no headings, options or prose): plain windows
        anchors += [("passage", snippet(text[a:b]), a, b) for a, b in even_windows(text, count - len(anchors))
                    if snippet(text[a:b])]
    if not anchors:
        return []
    slices: list[list[int]] = [[] for _ in range(count)]
    for i, a in enumerate(anchors):
        slices[min(count - 1, a[2] * count // max(1, len(text)))].append(i)
    picked: list[int] = []
    for s in slices:
        if s:
            picked.append(rng.choice(s))
    taken = set(picked)
    rest = [i for i in range(len(anchors)) if i not in taken]
    rng.shuffle(rest)
    picked += rest[: count - len(picked)]
    out = []
    for i in sorted(picked, key=lambda i: anchors[i][2]):
        kind, label, start, end = anchors[i]
        out.append((rng.choice(_EXCERPT_Q[kind]).format(x=label), start, end))
    return out


def even_windows(text: str, count: int, chars: int = 600) -> list[tuple[int, int]]:
    """`count` (start, end) windows spread evenly over `text`, starting at a line start where one is near."""
    out = []
    for i in range(count):
        start = len(text) * i // max(1, count)
        nl = text.rfind("\n", max(0, start - 200), start)
        start = nl + 1 if nl >= 0 else start
        while start < len(text) and text[start].isspace():
            start += 1
        if start < len(text):
            out.append((start, min(len(text), start + chars)))
    return out


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
