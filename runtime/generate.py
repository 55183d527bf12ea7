"""Generation as plain functions over a `DecoderBackend`: prefill, then one token per step.

`generate_ids` drives a batch (left-padded prompts); `stream_text` turns one sequence into text
pieces as they become complete UTF-8, stopping at EOS, a stop string, or max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends.base import PAD_POSITION, DecoderBackend
from .errors import NectarError
from .sampling import Sampler, SamplingConfig


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise NectarError(f"max_new_tokens (--max-new-tokens) must be >= 1, got {self.max_new_tokens}")


def check_fits(backend: DecoderBackend, prompt_len: int) -> None:
    if prompt_len > backend.max_local_len:
        doc = f" after the {backend.context_len} tokens of the document and its turn opening" if backend.context_len else ""
        raise NectarError(
            f"prompt of {prompt_len} tokens does not fit: at most {backend.max_local_len} local tokens "
            f"fit{doc} (the model's window, or the bundle's max_local_len); shorten the prompt"
        )


def answer_room(backend: DecoderBackend, prompt_len: int) -> int:
    """New tokens that fit after a prompt: the last sampled token is never fed back, so the window
    holds prompt_len + room - 1 tokens."""
    return backend.max_local_len - prompt_len + 1


def generate_ids(
    backend: DecoderBackend, prompts: list[list[int]], cfg: GenerationConfig, eos_ids: set[int]
) -> Iterator[np.ndarray]:
    """Yield the next token of every sequence, [B] int64, -1 once a sequence has finished (EOS).

    Prompts of different lengths are left-padded; padding slots are never attended to.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise NectarError("empty prompt: give at least one token of input")
    lengths = [len(p) for p in prompts]
    t = max(lengths)
    check_fits(backend, t)
    steps = min(cfg.max_new_tokens, answer_room(backend, t))
    b = len(prompts)
    ids = np.zeros((b, t), dtype=np.int64)
    pos = np.full((b, t), PAD_POSITION, dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = p
        pos[i, t - len(p) :] = backend.context_len + np.arange(len(p))
    backend.reset(b, t + steps - 1)
    sampler = Sampler(cfg.sampling)
    logits = backend.step(ids, pos)
    next_pos = backend.context_len + np.array(lengths, dtype=np.int64)
    done = np.zeros(b, dtype=bool)
    eos = np.array(sorted(eos_ids), dtype=np.int64)
    for i in range(steps):
        tok = sampler(logits)
        tok = np.where(done, -1, tok)
        done |= np.isin(tok, eos)
        yield tok
        if done.all() or i == steps - 1:
            return
        logits = backend.step(np.maximum(tok, 0)[:, None], next_pos[:, None])
        next_pos = next_pos + 1


class StopMatcher:
    """Holds back text that could still become a stop string; reports where one completed."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def cut(self, text: str) -> tuple[str, bool]:
        """Full text so far -> (text safe to show, stopped?)."""
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            return text[: min(hits)], True
        return text[: max(0, len(text) - self.hold)], False  # max: a text shorter than the hold shows nothing yet

    def final(self, text: str) -> str:
        """Text to show once generation has ended: everything before the first stop string."""
        hits = [text.find(s) for s in self.stops if s in text]
        return text[: min(hits)] if hits else text


def stream_text(
    backend: DecoderBackend,
    tokenizer,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    on_token: Callable[[int], None] | None = None,
    on_window_full: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield new text pieces of one generation (EOS and stop strings excluded).

    tokenizer: a `TextTokenizer` (decode, eos_token_ids); text is released only as complete UTF-8.
    on_window_full(n_tokens): called when the answer stopped because the local window was full
    (before EOS, a stop string or max_new_tokens), so a caller can say so rather than cut silently.
    """
    from .tokenizer import StreamDetokenizer

    detok = StreamDetokenizer(tokenizer, skip_special_tokens=True)
    matcher = StopMatcher(cfg.stop_strings)
    text, shown, count = "", 0, 0
    room = answer_room(backend, len(prompt_ids))  # generate_ids' cap from the window
    for tok in generate_ids(backend, [prompt_ids], cfg, set(tokenizer.eos_token_ids)):
        t = int(tok[0])
        if t < 0 or t in tokenizer.eos_token_ids:
            break
        count += 1
        if on_token:
            on_token(t)
        text += detok.push(t)
        safe, stopped = matcher.cut(text)
        if len(safe) > shown:
            yield safe[shown:]
            shown = len(safe)
        if stopped:
            return
    final = matcher.final(text + detok.flush())
    if len(final) > shown:
        yield final[shown:]
    if on_window_full and count == room < cfg.max_new_tokens:
        on_window_full(len(prompt_ids) + count - 1)
