"""Building a `tokenizers.Tokenizer` from a GGUF file's tokenizer metadata, without transformers.

A GGUF carries no tokenizer.json, only llama.cpp's `tokenizer.ggml.*` keys. This rebuilds the
tokenizer transformers 5.x makes from them (`integrations/gguf/gguf_tokenizer_mapping.py` with
the `GPT2Tokenizer` / `LlamaTokenizer` / `GemmaTokenizer` classes), so that ids match
`AutoTokenizer.from_pretrained(dir, gguf_file=name)` exactly. Supported `tokenizer.ggml.model`:

- "gpt2": byte-level BPE (SmolLM2, Qwen2, Llama 3), with the split regex named by `tokenizer.ggml.pre`;
- "llama": sentencepiece-style BPE with byte fallback; Gemma 1-3 files get Gemma's normalizer and
  merges rebuilt from the vocabulary order, since those files list none.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .errors import NectarError

# llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4


def tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> tuple[Tokenizer, dict[str, Any]]:
    """The backend tokenizer (no post-processor yet) and its config, from `read_gguf_metadata` output.

    The config holds what transformers reads beside the vocabulary, as `TokenizerConfig` fields:
    bos/eos/unk/pad token strings, add_bos_token/add_eos_token, chat_template, and
    extra_eos_token_ids (llama.cpp's end-of-turn ids). `source` names the file in error messages.
    """
    model = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise NectarError(f"{source} has no tokenizer metadata; use a GGUF converted with its tokenizer")
    architecture = metadata.get("general.architecture", "")
    if model == "llama" and architecture in _GEMMA_ARCHITECTURES:
        family = _GEMMA
    elif model in _FAMILIES:
        family = _FAMILIES[model]
    else:
        raise NectarError(
            f"{source} uses tokenizer model {model!r}, which Nectar does not support; "
            f"supported: {sorted(_FAMILIES)} and Gemma's 'llama'"
        )
    token_types = metadata.get("tokenizer.ggml.token_type")
    token_types = [] if token_types is None else token_types.tolist()

    try:
        tokenizer = family.build(metadata)
    except Exception as e:  # tokenizers raises a bare Exception for e.g. a merge of unknown tokens
        raise NectarError(f"{source} has unusable tokenizer metadata ({e}); re-convert the GGUF") from None
    _add_special_tokens(tokenizer, tokens, token_types, byte_level=model == "gpt2")
    config = _read_config(metadata, model)
    named = [config[f"{name}_token"] for name in ("bos", "eos", "unk", "pad")] + list(family.default_specials)
    _add_named_specials(tokenizer, [t for t in named if t is not None])
    split = _SPLIT_REGEXES.get(metadata.get("tokenizer.ggml.pre"))
    if split is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    return tokenizer, config


def _byte_level(metadata: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE as `GPT2Tokenizer` builds it; tokens outside the byte alphabet are respelled."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(metadata["tokenizer.ggml.tokens"])
    }
    merges = _file_merges(metadata)
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(metadata: dict[str, Any]) -> Tokenizer:
    """Sentencepiece BPE as `LlamaTokenizer` builds it: Metaspace prefix on the first word only."""
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _file_merges(metadata) or generate_merges(vocab, dict(zip(tokens, _scores(metadata))))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tokenizer


def _gemma(metadata: dict[str, Any]) -> Tokenizer:
    """Gemma's BPE: spaces become "\u2581" in a normalizer, and merges follow the vocabulary order.

    A token of spaces is stored as real spaces ("  ") but looked up as "\u2581\u2581", so those are
    respelled first. Gemma's scores do not follow its merge order; the token order does.
    """
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in metadata["tokenizer.ggml.tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    positions = {token: -index for index, token in enumerate(tokens)}
    merges = _file_merges(metadata) or generate_merges(vocab, positions)
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _file_merges(metadata: dict[str, Any]) -> list[tuple[str, ...]]:
    return [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", [])]


def _scores(metadata: dict[str, Any]) -> list[float]:
    if "tokenizer.ggml.scores" not in metadata:
        raise ValueError("it has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    return metadata["tokenizer.ggml.scores"].tolist()


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best score first.

    Same order as transformers' `generate_merges(vocab, vocab_scores)`: within a token by the pair's
    ids, then stably by (score, left length, right length), descending.
    """
    merges = []
    for token, score in scores.items():
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tokenizer: Tokenizer, tokens: list[str], token_types: list[int], byte_level: bool) -> None:
    """Control tokens (type 3) as special, user-defined ones (type 4) as plain added tokens.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel; transformers skips it, and so do we. A user-defined token is only added when the
    vocabulary holds it as spelled (Gemma's space tokens are respelled, so they are not).
    """
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab()
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == _USER_DEFINED and token in vocab
    ]
    tokenizer.add_tokens(user_defined)


def _add_named_specials(tokenizer: Tokenizer, names: list[str]) -> None:
    """bos/eos/unk/pad (and the transformers class defaults) become special tokens, as transformers does.

    transformers would also append a named token the vocabulary lacks (e.g. "<|endoftext|>" in a
    Llama 3 file) as a new id past the model's vocabulary; we leave such tokens out.
    """
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    vocab = tokenizer.get_vocab()
    missing = [n for n in dict.fromkeys(names) if n not in added and n in vocab]
    tokenizer.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in missing])


def _read_config(metadata: dict[str, Any], model: str) -> dict[str, Any]:
    tokens = metadata["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    # a sentencepiece vocabulary gets BOS unless the file says otherwise (llama.cpp's default)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
    eot = [metadata.get(f"tokenizer.ggml.{key}") for key in ("eot_token_id", "eom_token_id")]
    return {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": metadata.get("tokenizer.chat_template"),
        "extra_eos_token_ids": tuple(int(i) for i in eot if i is not None),
    }


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE spells every token in it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@dataclass(frozen=True)
class _Family:
    build: Callable[[dict[str, Any]], Tokenizer]
    default_specials: tuple[str, ...]  # the transformers class's own default special tokens


_GEMMA = _Family(_gemma, ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>"))
_FAMILIES = {
    "gpt2": _Family(_byte_level, ("<|endoftext|>",)),
    "llama": _Family(_sentencepiece, ("<unk>", "<s>", "</s>")),
}
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# `tokenizer.ggml.pre` -> the split regex its merges were learned with (transformers' table). Any
# other value, "smollm" included, keeps GPT-2's ByteLevel regex, as transformers does.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEXES = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
}  # fmt: skip
