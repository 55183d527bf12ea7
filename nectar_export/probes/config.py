"""What a probe is: its kinds (`KINDS`), how many of each to build (`ProbeConfig`), the
conversation itself (`Probe`) and the normalized question that groups probes (`question_key`)."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace

from nectar_runtime.errors import NectarError

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
