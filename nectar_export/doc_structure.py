"""What a document is made of, found by plain heuristics: headings, option definitions, terms, paragraphs.

The probe builder turns these into questions and excerpt anchors. Every rule has to degrade
gracefully: a man page yields sections and options, a markdown file headings and code terms, a
novel or a statute almost only paragraphs and frequent phrases, and a single paragraph of prose
still yields paragraphs and phrases. Nothing here is tuned to one document type; whatever a rule
does not find is simply absent. All offsets are character offsets into the text.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    title: str
    start: int  # the heading line
    body_start: int
    end: int  # the next heading, or the end of the text


@dataclass(frozen=True)
class OptionDef:
    flags: tuple[str, ...]  # ("-i", "--ignore-case")
    arg: str | None  # "PATTERNS" in "-e PATTERNS", if any
    description: str  # whitespace-collapsed; may be empty
    start: int
    end: int


@dataclass(frozen=True)
class Term:
    text: str
    kind: str  # "defined" | "code" | "phrase"
    count: int
    start: int  # first occurrence


@dataclass(frozen=True)
class Paragraph:
    start: int
    end: int


@dataclass(frozen=True)
class DocStructure:
    sections: tuple[Section, ...]
    options: tuple[OptionDef, ...]
    terms: tuple[Term, ...]
    paragraphs: tuple[Paragraph, ...]


STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either else etc even ever every
    few for from further had has have having he her here hers him his how however i if in into is it its
    itself just least less let like may me might more most much must my no nor not now of off often on once
    one only or other otherwise our out over own per rather same see shall she should since so some such
    than that the their them then there these they this those though through thus to too under until up upon
    us use used uses using very via was we were what when where whether which while who whom whose why will
    with within without would yet you your yours also default given line lines following first second new
    non two three may means mean said says say made make makes many way ways well""".split()
)
_DETERMINERS = frozenset(
    "the a an this that these those each every any some no its their his her our your my "
    "of in on for with from by into about".split()
)
MAX_HEADING_CHARS = 60
_MAX_HEADING_INDENT = 4  # man pages indent body text by 7; headings sit at 0-3
_SMALL_WORDS = frozenset("a an and as at by for in of on or the to vs with from into via".split())
_MD_HEADING = re.compile(r"#{1,6}\s+(.+?)\s*#*")
_LABELLED = re.compile(r"(?i)(?:chapter|section|part|book|article|appendix|title)\s+[\dIVXLC]+\b.*|§\s*\d.*")
_NUMBERED = re.compile(r"\d+(?:\.\d+)*\.?\s+[A-Z].*")
_CAPS = re.compile(r"[A-Z][A-Z0-9 ,&'/()\-]*")
# one flag with an optional argument: -e PATTERNS, --regexp=PATTERNS, --color[=WHEN], -E <cert>
_FLAG = re.compile(
    r"(-[A-Za-z0-9?]|--[a-z0-9][a-z0-9\-]*)"
    r"(\[?=[^\s,\]]*\]?|\s(?:<[^>]+>|\[[^\]]+\]|[A-Z][A-Z0-9_:\[\]]*)(?=[\s,]|$))?"
)
_FLAG_SEP = re.compile(r",\s*|\s*/\s*|\s+(?:and|or)\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-\u2010]*[A-Za-z]|[A-Za-z]")
_CODE = re.compile(
    r"`([^`\n]{2,40})`"  # markdown code spans
    r"|(?<![\w$])(\$?[A-Za-z_][A-Za-z0-9]*(?:[_.][A-Za-z0-9]+)+(?:\(\))?|[A-Za-z_]\w+\(\))(?![\w(])"
)
_DEFINED = (  # legal-style definitions, and quoted names introduced by "called"/"known as"
    re.compile(r"[\"“]([A-Za-z][^\"”\n]{1,40})[\"”]\s*(?:means|shall mean|refers to|is defined as|includes)\b"),
    re.compile(r"\b(?:called|known as|termed|referred to as|defined as)\s+(?:the\s+)?[\"“‘]([A-Za-z][^\"”’\n]{1,40})[\"”’]"),
)


def _lines(text: str) -> list[tuple[int, str]]:
    out, pos = [], 0
    for line in text.splitlines(keepends=True):
        out.append((pos, line.rstrip("\r\n")))
        pos += len(line)
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _title_case(words: list[str]) -> bool:
    big = [w for w in words if w.lower() not in _SMALL_WORDS]
    return bool(big) and sum(w[:1].isupper() for w in big) >= 0.6 * len(big)


def _clean_title(s: str) -> str:
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)  # markdown links keep their text
    return s.strip("*_ `")


def heading_title(line: str, prev: str | None, nxt: str | None, prev_heading: bool = False) -> str | None:
    """The heading's title if `line` is one, judged with its neighbours (None at the text's edges;
    prev_heading: the line above is a heading, as in "OPTIONS" over "   Matching Control")."""
    s = line.strip()
    if not s or len(s) > 80:
        return None
    after_blank = prev is None or not prev.strip() or prev_heading
    before_blank = nxt is None or not nxt.strip()
    letters = [c for c in s if c.isalpha()]
    words = s.split()
    caps = len(letters) >= 3 and _CAPS.fullmatch(s) is not None and len(words) <= 8
    if _indent(line) > _MAX_HEADING_INDENT and not (caps and after_blank and before_blank):
        return None  # body text, unless a centred all-caps line standing alone
    if m := _MD_HEADING.fullmatch(s):
        return _clean_title(m.group(1)) or None
    if nxt is not None and re.fullmatch(r"\s*(=+|-+)\s*", nxt) and len(nxt.strip()) >= 3 and s[0] != "-":
        return _clean_title(s)  # setext underline
    if not after_blank or s.startswith("-"):
        return None
    if _LABELLED.fullmatch(s) and len(words) <= 12:
        return s.rstrip(".")
    if caps and s[-1] not in ".,;:":
        return s
    if len(s) > MAX_HEADING_CHARS or len(words) > 8 or before_blank and not _NUMBERED.fullmatch(s):
        return None
    if not s[0].isalnum() or not (s[0].isupper() or s[0].isdigit()) or s[-1] in ",;:":
        return None
    if _NUMBERED.fullmatch(s) and _title_case(words[1:]):
        return s.rstrip(".")  # "1. Source Code." / "2.3 Exit status"
    if s[-1] != "." and (_title_case(words) or len(words) <= 3):
        # a short line standing alone above longer or more indented text
        if len(nxt.strip()) > len(s) or _indent(nxt) > _indent(line):
            return _clean_title(s)
    return None


def find_sections(text: str) -> list[Section]:
    lines = _lines(text)
    heads = []
    in_code = False
    for i, (pos, line) in enumerate(lines):
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code  # "# comment" inside a fenced code block is no heading
        if in_code:
            continue
        prev = lines[i - 1][1] if i else None
        nxt = lines[i + 1][1] if i + 1 < len(lines) else None
        prev_heading = bool(heads) and i > 0 and heads[-1][1] == lines[i - 1][0]
        if (title := heading_title(line, prev, nxt, prev_heading)) is not None:
            body = lines[i + 1][0] if nxt is not None else len(text)
            if nxt is not None and re.fullmatch(r"\s*(=+|-+)\s*", nxt):
                body = lines[i + 2][0] if i + 2 < len(lines) else len(text)
            heads.append((title, pos, body))
    out = []
    for k, (title, pos, body) in enumerate(heads):
        end = heads[k + 1][1] if k + 1 < len(heads) else len(text)
        out.append(Section(title, pos, min(body, end), end))
    return out


def _join_lines(parts: list[str]) -> str:
    """Whitespace-collapsed text; words hyphenated at a line end with U+2010 (groff) are rejoined."""
    return re.sub("\u2010 ", "", " ".join(" ".join(parts).split()))


def parse_flags(s: str) -> tuple[tuple[str, ...], str | None, str]:
    """'-e PATTERNS, --regexp=PATTERNS  Use ...' -> (flags, argument, rest of the line)."""
    flags, arg, rest = [], None, s
    while m := _FLAG.match(rest):
        flags.append(m.group(1))
        if m.group(2):
            arg = arg or m.group(2).strip(" =[]<>")
        rest = rest[m.end() :]
        sep = _FLAG_SEP.match(rest)
        if not sep or not _FLAG.match(rest[sep.end() :]):
            break
        rest = rest[sep.end() :]
    if flags and (m := re.fullmatch(r"((?:\s+[\w\-\[\]<>.]+){1,3}):\s*", rest)):
        arg, rest = arg or m.group(1).strip(), ":"  # "--arg name value:" (a list item's label)
    elif flags and (m := re.fullmatch(r" ([^\s,]+)((?:,\s*--?[A-Za-z0-9]\S*)*)", rest)) \
            and not re.fullmatch(r"[A-Z][a-z]+[.:]?", m.group(1)):
        # BSD mdoc and systemd pages: "-B bind_interface", "-b [[ID]|all], --boot[=[ID]|all]": a lone
        # argument placeholder (any case) after the flag and nothing else; the description sits below.
        arg, rest = arg or m.group(1), ""
        flags += re.findall(r",\s*(--?[A-Za-z0-9][\w\-]*)", m.group(2))
    return tuple(flags), arg, rest


def find_options(text: str) -> list[OptionDef]:
    """Definitions like a man page's or a --help listing's, never flags merely mentioned in prose.

    A definition line starts with a flag and is either a list of flags ("-i, --ignore-case"), flags
    alone with the description indented below, a flag then two spaces then the description, or
    an indented flag followed by its description (man style).
    """
    lines = _lines(text)
    out: list[OptionDef] = []
    last_def = -2
    for i, (pos, line) in enumerate(lines):
        s = re.sub(r"^[\s*+•○·]*(?:-\s+)?", "", line.replace("`", ""))
        if not re.match(r"--?[A-Za-z0-9?]", s):
            continue
        flags, arg, rest = parse_flags(s)
        ind = _indent(line)
        prev = lines[i - 1][1] if i else ""
        if not flags or (prev.strip() and _indent(prev) == ind and last_def != i - 1):
            continue  # a wrapped line of running text that happens to start with a flag
        below = [nl for _, nl in lines[i + 1 : i + 3] if nl.strip()][:1]
        alone = not rest.strip() and below and _indent(below[0]) > ind
        ok = len(flags) > 1 or alone or rest.startswith(("  ", ":", "\t"))
        ok = ok or (ind >= 2 and rest[:1] == " " and rest.strip()[:1].isupper())
        if not (ok and (rest == "" or rest[0] in " :\t")):
            continue
        desc, end = [rest.strip(" :\t")], pos + len(line)
        for pos2, nl in lines[i + 1 :]:
            if nl.strip() and _indent(nl) <= ind or sum(map(len, desc)) > 800:
                break
            desc.append(nl.strip())
            end = pos2 + len(nl) if nl.strip() else end
        last_def = i
        out.append(OptionDef(flags, arg, _join_lines(desc), pos, end))
    return out


def find_paragraphs(text: str, max_chars: int = 1200) -> list[Paragraph]:
    """Blank-line separated blocks with some prose in them; long blocks cut at sentence ends."""
    out = []
    for m in re.finditer(r"\S(?:.|\n(?![ \t\r]*\n))*", text):  # \r: CRLF files have blank lines too
        start, end = m.start(), m.end()
        if sum(c.isalpha() for c in m.group()) < 40:
            continue
        while end - start > max_chars:
            cut = max(text.rfind(". ", start, start + max_chars), text.rfind(".\n", start, start + max_chars))
            cut = cut + 1 if cut > start + max_chars // 3 else start + max_chars
            out.append(Paragraph(start, cut))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        if end - start >= 40:
            out.append(Paragraph(start, end))
    return out


def find_terms(text: str, exclude: set[str] = frozenset(), limit: int = 40) -> list[Term]:
    """Defined terms, code-like tokens, then frequent content-word phrases (1-3 words)."""
    found: dict[str, Term] = {}

    def add(t: str, kind: str, count: int, start: int) -> None:
        t = t.strip(" .,;:'\"")
        key = t.lower()
        if len(t) < 2 or key in found or key in exclude or all(w.lower() in STOPWORDS for w in t.split()):
            return
        found[key] = Term(t, kind, count, start)

    for rx in _DEFINED:
        for m in rx.finditer(text):
            add(m.group(1), "defined", text.count(m.group(1)), m.start(1))
    codes: Counter[str] = Counter()
    first: dict[str, int] = {}
    for m in _CODE.finditer(text):
        t = m.group(1) or m.group(2)
        parts = re.split(r"[_.]", t)
        if len(t) >= 4 and not re.search(r"[\"'“”]", t) and len(t.split()) <= 3 and max(map(len, parts)) >= 3:
            codes[t] += 1
            first.setdefault(t, m.start())
    for t, c in codes.most_common(limit // 2):
        add(t, "code", c, first[t])
    for t, (c, start) in frequent_phrases(text).items():
        if len(found) >= limit:
            break
        add(t, "phrase", c, start)
    return list(found.values())


def frequent_phrases(text: str, max_words: int = 3) -> dict[str, tuple[int, int]]:
    """Noun-like runs of 1-3 content words, by frequency: {phrase: (count, first offset)}, best first.

    A run is consecutive non-stop words on one line with no punctuation between. Without a
    tagger, "noun-like" means the phrase ends a run that follows a determiner or preposition at
    least once ("the input file", "of regular expressions"), or is a name: capitalized away from
    sentence and line starts, and never written in lower case. That drops verbs ("Print NUM
    lines") and bare adjectives. The most common casing is returned; a
    phrase inside a longer one that is almost as frequent is dropped.
    """
    counts: Counter[str] = Counter()
    nounish: Counter[str] = Counter()
    surface: dict[str, Counter[str]] = {}
    first: dict[str, int] = {}
    run: list[re.Match] = []
    after_det: list[bool] = []
    lower = {m.group() for m in _WORD.finditer(text) if m.group().islower()}

    def flush() -> None:
        for n in range(1, max_words + 1):
            for k in range(len(run) - n + 1):
                ws = run[k : k + n]
                phrase = " ".join(w.group() for w in ws)
                key = phrase.lower()
                counts[key] += 1
                surface.setdefault(key, Counter())[phrase] += 1
                first.setdefault(key, ws[0].start())
                named = all(w.group().isupper() or (w.group()[0].isupper() and w.group().lower() not in lower) for w in ws)
                named = named and not (k == 0 and sentence_start)
                nounish[key] += (after_det[k] and k + n == len(run)) or named  # the head noun ends the run
        run.clear()
        after_det.clear()

    prev_end, prev_word, sentence_start = 0, "", True
    for m in _WORD.finditer(text):
        gap = text[prev_end : m.start()]
        w = m.group()
        if run and (gap.strip() or "\n" in gap):
            flush()
        abbrev = gap.startswith(".") and prev_word[:1].isupper() and len(prev_word) <= 3  # "Mr. Bennet"
        after_stop = bool(re.search(r"[.!?:;]\s*$", text[max(0, prev_end - 1) : m.start()]))
        starts = not prev_word or "\n" in gap or (after_stop and not abbrev)
        if w.lower() in STOPWORDS or len(w) < 3:
            flush()
        else:
            if not run:
                sentence_start = starts
            run.append(m)
            after_det.append(prev_word.lower() in _DETERMINERS and not gap.strip())
        prev_end, prev_word = m.end(), w
    flush()
    scored = []
    for key, c in counts.items():
        n = key.count(" ") + 1
        name = surface[key].most_common(1)[0][0][0].isupper()
        if nounish[key] and c >= (3 if n == 1 and not name else 2) and (n > 1 or len(key) >= 4):
            scored.append((c * (1 + 0.75 * (n - 1)), key))
    scored.sort(key=lambda x: (-x[0], first[x[1]]))
    kept: list[str] = []
    for _, key in scored:
        if any(key in k and counts[k] >= 0.7 * counts[key] for k in kept):
            continue
        kept.append(key)
    return {surface[k].most_common(1)[0][0]: (counts[k], first[k]) for k in kept}


def extract_structure(text: str) -> DocStructure:
    sections = find_sections(text)
    options = find_options(text)
    exclude = {s.title.lower() for s in sections} | {f.lower() for o in options for f in o.flags}
    body_of = {s.start: s.body_start for s in sections}
    paragraphs = []
    for p in find_paragraphs(text):  # a block opening with its heading(s) starts at the body
        start = p.start
        while (line_start := text.rfind("\n", 0, start) + 1) in body_of and body_of[line_start] > start:
            start = body_of[line_start]
            while start < p.end and text[start].isspace():
                start += 1
        if p.end - start >= 40:
            paragraphs.append(Paragraph(start, p.end))
    return DocStructure(tuple(sections), tuple(options), tuple(find_terms(text, exclude)), tuple(paragraphs))
