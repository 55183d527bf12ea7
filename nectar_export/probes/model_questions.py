"""What the model writes: the prompts that ask it for a question about the document, the parse
of its reply into one question (or None for junk), and the cut of its answers at degenerate
repetition."""

from __future__ import annotations

import re
from collections import Counter

from ..doc_structure import DocStructure
from .templated import prose_paragraphs, snippet

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
