"""The document as context: the opening of a user chat turn, then local turns after it.

With a chat template, the user's first message is `document + SEPARATOR + question`; the
context is the rendered conversation up to the end of the document, and everything after it
(the question, the turn end, the assistant's answer, later turns) is local. Models without a
chat template use a plain `Question:/Answer:` format after the document.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .bundle import BUNDLE_KIND
from .errors import NectarError
from .tokenizer import literal_messages

SEPARATOR = "\n\n"
_MARK = "\u2063NECTAR_SPLIT\u2063"  # invisible separator: never appears in real text


def read_document(path: str | Path) -> str:
    """UTF-8 text of a document (a leading byte-order mark dropped), or a one-line error for missing,
    empty, binary, UTF-16 or other non-UTF-8 files."""
    p = Path(path)
    if p.is_dir():
        raise NectarError(f"{p}: is a directory; pass a text file (nectar fit also takes directories)")
    if not p.is_file():
        raise NectarError(f"{p}: " + ("not a regular file (a pipe or device); save the text to a file first" if p.exists()
                                      else "no such document file"))
    try:
        data = p.read_bytes()
    except OSError as e:
        raise NectarError(f"{p}: cannot be read ({e.strerror}); check its permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Windows "Unicode" text: NUL bytes, but not binary
        raise NectarError(f"{p}: is UTF-16 text; convert it to UTF-8 first (e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in data[:65536]:
        raise NectarError(f"{p}: looks like a binary file (NUL bytes); pass a UTF-8 text document")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NectarError(f"{p}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 text first") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark marks the encoding, it is not content
    if not text.strip():
        raise NectarError(f"{p}: the document is empty")
    return text


@dataclass(frozen=True)
class Source:
    """One file of a document made of several: `label` heads its part of the text."""

    label: str
    sha256: str  # of the file's text as read (BOM dropped)
    chars: int


def is_nectar_output(d: Path) -> bool:
    """Whether directory `d` is an artifact or bundle Nectar wrote (its manifest.json says so): never a source."""
    mf = d / "manifest.json"
    try:
        m = json.loads(mf.read_text("utf-8")) if mf.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and ("heads_sha256" in m or m.get("kind") == BUNDLE_KIND)


def source_files(paths: list[str | Path], exclude: str | Path | None = None) -> list[tuple[str, Path]]:
    """(label, file) for every file named or found under a named directory (recursively, sorted by path,
    hidden names skipped, nothing under `exclude`: the artifact being written), each file once. Labels: a
    named file's name; a directory's files `dirname/relative/path`; the path as given where two collide."""
    skip = Path(exclude).resolve() if exclude is not None else None
    outputs: dict[Path, bool] = {}  # directory -> is_nectar_output, each read once

    def wanted(f: Path, root: Path) -> bool:
        rel = f.relative_to(root)
        if not f.is_file() or any(part.startswith(".") for part in rel.parts):
            return False
        if skip is not None and skip in f.resolve().parents:
            return False
        dirs = [root / d for d in rel.parents if d != Path(".")]
        return not any(outputs.setdefault(d, is_nectar_output(d)) for d in dirs)

    found: list[tuple[str, Path, Path]] = []  # label, file, the path as the user gave it
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(f for f in given.rglob("*") if wanted(f, given))
            if not files:
                raise NectarError(f"{given}: the directory holds no files; pass text files or a directory of them")
            found += [(f"{given.resolve().name}/{f.relative_to(given).as_posix()}", f, f) for f in files]
        elif given.is_file():
            found.append((given.name, given, given))
        elif given.exists():
            raise NectarError(f"{given}: not a regular file (a pipe or device); save the text to a file first")
        else:
            raise NectarError(f"{given}: no such document file or directory")
    seen, unique = set(), []
    for label, f, shown in found:
        if (key := f.resolve()) not in seen:
            seen.add(key)
            unique.append((label, f, shown))
    labels = [label for label, _, _ in unique]
    return [(label if labels.count(label) == 1 else shown.as_posix(), f) for label, f, shown in unique]


def read_documents(paths: list[str | Path], exclude: str | Path | None = None) -> tuple[str, list[Source]]:
    """One document from one or more text files or directories of them -> (text, sources).

    A single file is the document as it is. Several become one text, each part under a heading line
    `# label` (so the probes' section questions can name the files), parts separated by a blank line,
    in the order given (a directory's files sorted by path). Every file must be UTF-8 text
    (`read_document`'s one-line errors, naming the file). `exclude`: as in source_files."""
    files = source_files(paths, exclude)
    parts, sources = [], []
    for label, f in files:
        text = read_document(f)
        parts.append(text)
        sources.append(Source(label, hashlib.sha256(text.encode()).hexdigest(), len(text)))
    if len(files) == 1:
        return parts[0], sources
    bodies = [t.lstrip("\r\n").rstrip() for t in parts]  # a first line's indentation is content
    return "\n\n".join(f"# {s.label}\n\n{body}" for s, body in zip(sources, bodies)) + "\n", sources


def describe_sources(sources: list[Source]) -> str:
    """`name` for one file, `N files (a, b, …)` for several: the document as messages and manifests name it."""
    if len(sources) == 1:
        return sources[0].label
    names = ", ".join(s.label for s in sources[:3]) + (", …" if len(sources) > 3 else "")
    return f"{len(sources)} files ({names})"


def read_stored_document(path: str | Path) -> str:
    """The document.txt of an artifact or bundle exactly as fitted: bytes decoded, no newline
    translation (a CRLF document read in text mode would no longer match its sha256 and tokens)."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


@dataclass(frozen=True)
class DocumentContext:
    """A document placed as context for one tokenizer's chat format.

    context_ids: the n tokens that are prefilled: the template prefix (its first `prefix_len`
    tokens: system prompt, user-turn header, BOS; the same for every document) then the document.
    Turns after it are built by `local_ids`. `chat` is False for models without a chat template.
    """

    text: str
    sha256: str
    context_text: str
    context_ids: tuple[int, ...]
    chat: bool
    prefix_len: int = 0

    @property
    def n(self) -> int:
        return len(self.context_ids)


def make_context(tokenizer, text: str, max_position: int, source: str = "document", reserve: int = 256) -> DocumentContext:
    """Place `text` as context; refuse a document that leaves fewer than `reserve` local positions."""
    chat = bool(tokenizer.chat_template)
    if chat:
        def upto_mark(content: str) -> str:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            if _MARK not in rendered:
                raise NectarError("the chat template drops the user's message; cannot place the document")
            return rendered.split(_MARK)[0]

        prefix_text, context_text = upto_mark(_MARK), upto_mark(text + _MARK)
        if not context_text.startswith(prefix_text):
            raise NectarError("the chat template renders the user turn's start differently with a document; cannot place it")
        prefix = tokenizer.encode(prefix_text, add_special_tokens=False)
        body = tokenizer.encode_literal(context_text[len(prefix_text) :])  # the document is data, not markup
    else:
        context_text = text
        body = tokenizer.encode_literal(text)
        full = tokenizer.encode(text, add_special_tokens=True)
        # whatever the tokenizer puts in front (BOS) is the prefix; an appended EOS is dropped
        prefix = full[: full.index(body[0])] if body and body[0] in full else []
    ids = prefix + body
    if len(ids) + reserve > max_position:
        raise NectarError(
            f"{source}: the document is {len(body)} tokens ({len(ids)} with the chat template's opening) but the "
            f"model's window is {max_position} "
            f"(with {reserve} kept for questions and answers); shorten the document (or pass fewer files), or use a "
            f"model with a longer window (--model; `nectar models` lists them)"
        )
    return DocumentContext(text, hashlib.sha256(text.encode()).hexdigest(), context_text, tuple(ids), chat, len(prefix))


def local_text(ctx: DocumentContext, tokenizer, turns: list[dict], add_generation_prompt: bool = True) -> str:
    """The text after the context for a conversation about the document.

    turns: [{"role": "user"|"assistant", "content": ...}, ...] starting with the first question
    (the document is prepended to it). A trailing assistant turn is left open (no turn end), so
    the text can be teacher-forced or continued.
    """
    if not turns or turns[0]["role"] != "user":
        raise ValueError("turns must start with a user question")
    if not ctx.chat:
        parts = []
        for t in turns:
            parts.append(f"{SEPARATOR}Question: {t['content']}\nAnswer:" if t["role"] == "user" else f" {t['content']}")
        if turns[-1]["role"] == "user" and not add_generation_prompt:
            parts[-1] = parts[-1].rsplit("\nAnswer:", 1)[0]
        return "".join(parts)
    msgs = [dict(turns[0], content=ctx.text + SEPARATOR + turns[0]["content"])] + [dict(t) for t in turns[1:]]
    open_answer = msgs[-1]["role"] == "assistant"
    if open_answer:
        answer = msgs.pop()["content"]
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=True) + answer
    else:
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt)
    if not rendered.startswith(ctx.context_text):
        raise NectarError("the chat template renders the document differently in later turns; cannot split context")
    return rendered[len(ctx.context_text) :]


def local_ids(ctx: DocumentContext, tokenizer, turns: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `local_text`. Questions and answers are data, as the document is: one that spells a
    special token ("<|im_end|>") is encoded as plain text, so it cannot end its turn or forge another
    (`literal_messages`); otherwise the ids are the plain encoding of the text."""
    return literal_messages(tokenizer, turns, lambda ts: local_text(ctx, tokenizer, ts, add_generation_prompt))
