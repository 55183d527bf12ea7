"""Text <-> token ids for the runtime, with no torch and no transformers.

`load_tokenizer(path)` accepts a .gguf file, a Hugging Face model directory (tokenizer.json plus
tokenizer_config.json, maybe chat_template.jinja and generation_config.json) or a tokenizer.json
file, and returns a `TextTokenizer`. For a GGUF the ids match transformers'
`AutoTokenizer.from_pretrained(dir, gguf_file=name)`; see `gguf_tokenizer.py`.

`TextTokenizer.to_json(directory)` writes tokenizer.json + tokenizer_config.json, a directory
that `load_tokenizer` (and transformers) reads back with identical ids.
"""

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from .chat_template import render_chat_template
from .errors import NectarError
from .gguf_metadata import read_gguf_metadata
from .gguf_tokenizer import tokenizer_from_gguf

# Tokens that end a turn in common chat templates; the ones a template uses also stop generation.
_TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>")
_CONFIG_FILE = "tokenizer_config.json"


def check_utf8(text: str) -> None:
    """Command-line text that was not UTF-8 reaches Python as lone surrogates, which the tokenizer
    cannot take: one line instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NectarError("the text given is not valid UTF-8 (check the terminal's encoding); pass UTF-8 text") from None


@dataclass(frozen=True)
class TokenizerConfig:
    """Everything beside the vocabulary: named special tokens, BOS/EOS flags, chat template."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    add_bos_token: bool = False
    add_eos_token: bool = False
    chat_template: str | None = None
    extra_eos_token_ids: tuple[int, ...] = ()  # more stop ids: GGUF end-of-turn, generation_config.json


def literal_messages(tokenizer: "TextTokenizer", messages: Sequence[Mapping[str, Any]], render) -> list[int]:
    """Ids of `render(messages)` (chat markup: a str) with every message content read as plain text.

    When no content spells a special token, that is the plain encoding of the rendered text (as
    transformers tokenizes a chat). Otherwise those contents are rendered as unique markers and
    encoded apart (`encode_marked`); a template that changes a content (trims it, say) cannot be
    split that way and is refused in one line rather than letting the text act as markup."""
    text = render(messages)
    risky = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str) and tokenizer.spells_special(m["content"])]
    if not risky:
        return tokenizer.encode(text, add_special_tokens=False)
    marks = {f"\u2063NECTAR_TEXT_{i}\u2063": messages[i]["content"] for i in risky}
    by_index = dict(zip(risky, marks))
    marked = render([dict(m, content=by_index[i]) if i in by_index else m for i, m in enumerate(messages)])
    restored = marked
    for mark, content in marks.items():
        restored = restored.replace(mark, content)
    if restored != text or any(marked.count(m) != 1 for m in marks):
        raise NectarError("a message spells a special token (e.g. <|im_end|>) and the chat template changes it, so it "
                          "cannot be kept as plain text; remove that spelling from the message")
    return tokenizer.encode_marked(marked, marks)


class TextTokenizer:
    """A `tokenizers.Tokenizer` plus its config. The backend's post-processor adds BOS/EOS."""

    def __init__(self, backend: Tokenizer, config: TokenizerConfig):
        self.backend = backend
        self.config = config

    @property
    def chat_template(self) -> str | None:
        return self.config.chat_template

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.config.bos_token)

    @property
    def eos_token_ids(self) -> set[int]:
        """Ids that end generation: EOS, the file's extra stop ids, and turn-end tokens the template writes."""
        template = self.config.chat_template or ""
        turn_ends = [t for t in _TURN_END_TOKENS if t in template]
        ids = {self._id(t) for t in (self.config.eos_token, *turn_ends)} | set(self.config.extra_eos_token_ids)
        return ids - {None}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; `add_special_tokens` adds BOS/EOS where the config asks for them."""
        check_utf8(text)
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_literal(self, text: str) -> list[int]:
        """Token ids for `text` read as plain text: a special token's spelling inside it ("<|im_end|>" in a
        document about chat formats) is split like any other text instead of becoming the control token,
        which would end the user turn in the middle of the document. No BOS/EOS."""
        check_utf8(text)
        before = self.backend.encode_special_tokens
        self.backend.encode_special_tokens = True
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = before

    def spells_special(self, text: str) -> bool:
        """Whether `text` contains the spelling of a special token ("<|im_end|>"), which `encode` would
        read as that control token."""
        # Gemma 3 has ~6,250 special tokens, nearly all "<…>": most text holds none of their first characters
        if not any(c in text for c in self._special_firsts):
            return False
        return any(tok in text for tok in self._special_spellings)

    @cached_property
    def _special_spellings(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content)

    @cached_property
    def _special_firsts(self) -> frozenset[str]:
        return frozenset(tok[0] for tok in self._special_spellings)

    def encode_marked(self, marked: str, literals: Mapping[str, str]) -> list[int]:
        """Ids of chat markup `marked` in which each marker (a key of `literals`, unique invisible text put
        where a message's content goes) stands for its content: the markup is encoded as usual (its
        special tokens are control tokens), each content as plain text (`encode_literal`). No BOS/EOS."""
        ids, rest = [], marked
        while literals:
            at = {m: rest.find(m) for m in literals}
            first = min((m for m in at if at[m] >= 0), key=at.get, default=None)
            if first is None:
                break
            ids += self.encode(rest[: at[first]], add_special_tokens=False) if at[first] else []
            ids += self.encode_literal(literals[first])
            rest = rest[at[first] + len(first):]
        return ids + (self.encode(rest, add_special_tokens=False) if rest else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Text pieces for ids arriving one by one; their concatenation is `decode(all ids)`."""
        detokenizer = StreamDetokenizer(self, skip_special_tokens)
        for token_id in ids:
            if text := detokenizer.push(token_id):
                yield text
        if text := detokenizer.flush():
            yield text

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> str:
        """The prompt text for a conversation, as transformers' `apply_chat_template(..., tokenize=False)`."""
        template = chat_template or self.config.chat_template
        if template is None:
            raise NectarError("this model's tokenizer has no chat template; pass a plain prompt instead of messages")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        variables = {name: getattr(self.config, name) for name in names if getattr(self.config, name) is not None}
        return render_chat_template(template, messages, add_generation_prompt, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation; no BOS is added, since the template writes its own. Only the
        template writes control tokens: a message that spells one ("<|im_end|>" typed in a question) is
        encoded as plain text (`literal_messages`), so it cannot close its turn or open another."""
        render = lambda msgs: self.apply_chat_template(msgs, add_generation_prompt)  # noqa: E731
        return literal_messages(self, messages, render)

    def to_json(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (made if needed); returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in asdict(self.config).items() if k != "extra_eos_token_ids"}
        config |= {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token_ids": sorted(self.eos_token_ids)}
        (directory / _CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
        return directory

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)


class StreamDetokenizer:
    """Turns ids arriving one at a time into text, never splitting a multi-byte character.

    It decodes a short window of recent ids and emits what the newest ids added, holding text back
    while it ends in U+FFFD (an unfinished UTF-8 sequence). The window starts one emission back,
    so decoders that treat a sequence's first token specially (a stripped leading space) agree.
    """

    def __init__(self, tokenizer: TextTokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this were emitted

    def push(self, token_id: int) -> str:
        """Add one id; the new complete text, or "" while a character is unfinished."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back. Ids that end partway through a character (generation cut by
        a token limit) never make a whole character: those bytes are dropped, not shown as U+FFFD."""
        return self._advance(final=True).rstrip("\ufffd")

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        emitted = decode(self.ids[self._prefix : self._read], self.skip_special_tokens)
        text = decode(self.ids[self._prefix :], self.skip_special_tokens)
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted) :]


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """The tokenizer in a .gguf file, an HF model directory, or a tokenizer.json file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise NectarError(f"{path} has no tokenizer.json; pass a .gguf file or a Hugging Face model directory")
        return _load_hf(path / "tokenizer.json")
    if not path.is_file():
        raise NectarError(f"{path}: no such file or directory; check the path (or fetch the model with `nectar pull`)")
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf or path.suffix == ".gguf":
        return _load_gguf(path)
    if path.suffix == ".json":
        return _load_hf(path)
    raise NectarError(f"{path} is not a tokenizer: pass a .gguf file, a tokenizer.json or a model directory")


def _load_gguf(path: Path) -> TextTokenizer:
    backend, fields = tokenizer_from_gguf(read_gguf_metadata(path), str(path))
    config = TokenizerConfig(**fields)
    return TextTokenizer(_with_bos_eos(backend, config), config)


def _load_hf(tokenizer_file: Path) -> TextTokenizer:
    """tokenizer.json, plus tokenizer_config.json / chat_template.jinja / generation_config.json beside it."""
    try:
        backend = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise NectarError(f"{tokenizer_file} is not a valid tokenizer.json ({e}); re-download it") from None
    directory = tokenizer_file.parent
    raw = _read_json(directory / _CONFIG_FILE)
    template = raw.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text("utf-8")
    generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id") or []
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    extra_eos = [*raw.get("eos_token_ids", []), *generation_eos]
    config = TokenizerConfig(
        bos_token=_token_text(raw.get("bos_token")),
        eos_token=_token_text(raw.get("eos_token")),
        unk_token=_token_text(raw.get("unk_token")),
        pad_token=_token_text(raw.get("pad_token")),
        add_bos_token=bool(raw.get("add_bos_token", False)),
        add_eos_token=bool(raw.get("add_eos_token", False)),
        chat_template=template,
        extra_eos_token_ids=tuple(sorted(set(extra_eos))),
    )
    # As transformers: an explicit add_bos/add_eos flag (or no post-processor) rebuilds the post-processor.
    if "add_bos_token" in raw or "add_eos_token" in raw or backend.post_processor is None:
        backend = _with_bos_eos(backend, config)
    return TextTokenizer(backend, config)


def _with_bos_eos(backend: Tokenizer, config: TokenizerConfig) -> Tokenizer:
    """Set the post-processor that adds BOS/EOS, as transformers' `update_post_processor`."""
    bos = config.bos_token if config.add_bos_token and backend.token_to_id(config.bos_token or "") is not None else None
    eos = config.eos_token if config.add_eos_token and backend.token_to_id(config.eos_token or "") is not None else None
    head, tail = (f"{bos}:0 " if bos else ""), (f" {eos}:0" if eos else "")
    single = f"{head}$A:0{tail}"
    pair = f"{single}{f' {bos}:1' if bos else ''} $B:1{f' {eos}:1' if eos else ''}"
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return backend


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as e:
        raise NectarError(f"{path} is not valid JSON ({e}); re-download it") from None


def _token_text(value: str | dict | None) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value
