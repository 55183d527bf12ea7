"""Excerpt probes: requests to quote a part of the document, spread over it, and the quoted
text cut to whole lines within a token budget."""

from __future__ import annotations

import random
import re

from ..doc_structure import DocStructure
from .templated import prose_paragraphs, snippet

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
