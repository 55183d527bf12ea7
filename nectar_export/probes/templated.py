"""Questions written from the document's structure (`doc_structure`): headings, option
definitions, terms, paragraphs ("What does -i do?", "Explain the section X."), and the snippet
and prose-paragraph helpers the other probe sources quote from."""

from __future__ import annotations

import random
import re

from ..doc_structure import STOPWORDS, DocStructure, OptionDef
from .config import question_key

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
