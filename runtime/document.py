"""The document as context: the opening of a user chat turn, then local turns after it.

With a chat template, the user's first message is `document + SEPARATOR + question`; the
context is the rendered conversation up to the end of the document, and everything after it
(the question, the turn end, the assistant's answer, later turns) is local. Models without a
chat template use a plain `Question:/Answer:` format after the document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import NectarError

SEPARATOR = "\n\n"
_MARK = "\u2063NECTAR_SPLIT\u2063"  # invisible separator: never appears in real text


def read_document(path: str | Path) -> str:
    """UTF-8 text of a document (a leading byte-order mark dropped), or a one-line error for missing,
    empty, binary, UTF-16 or other non-UTF-8 files."""
    p = Path(path)
    if p.is_dir():
        raise NectarError(f"{p}: is a directory; pass one text file (join several documents into one first)")
    if not p.is_file():
        raise NectarError(f"{p}: no such document file")
    data = p.read_bytes()
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
            f"{source}: the document is {len(ids)} tokens but the model's window is {max_position} "
            f"(with {reserve} kept for questions and answers); shorten the document"
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
    return tokenizer.encode(local_text(ctx, tokenizer, turns, add_generation_prompt), add_special_tokens=False)
