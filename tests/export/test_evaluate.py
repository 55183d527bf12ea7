"""The evaluation harness: StreamingLLM subsets, teacher-forced alignment, evaluate_methods, on SmolLM2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from nectar_runtime.document import local_ids, make_context
from nectar_export.evaluate import evaluate_methods, format_table, teacher_forced_logprobs
from nectar_export.streaming import kv_bytes, streaming_contexts, streaming_tokens_for_bytes
from nectar_models.config import ModelConfig
from nectar_models.llama import Decoder

MANUALS = Path("/work/shared/data/manuals")


class CharTokenizer:
    """Printable ASCII, one token per character: 0 = BOS, 1 = EOS, 2.. = chr(32..126). No chat template."""

    chat_template = None
    eos_token_ids = {1}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * add_special_tokens + [ord(c) - 30 for c in text if 32 <= ord(c) < 127]

    def encode_literal(self, text: str) -> list[int]:
        return self.encode(text, add_special_tokens=False)

    def spells_special(self, text: str) -> bool:  # BOS/EOS have no spelling here
        return False

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(i + 30) for i in ids if i >= 2)


class ConstantEmbedder:
    """Stands in for MiniLM: tiny-model answers are noise anyway."""

    def similarity(self, a, b):
        return [1.0] * len(a)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position=1024, tie_embeddings=False)
    model = Decoder(cfg).eval()  # untied: a tied random head mostly repeats the current token
    tok = CharTokenizer()
    ctx = make_context(tok, "grep prints lines that match patterns. " * 4, cfg.max_position)
    full = model.prefill_document(torch.tensor([ctx.context_ids])).contexts()
    questions = [{"id": f"q{i}", "question": q, "answer": a} for i, (q, a) in enumerate(
        [("what does grep print?", "lines"), ("which?", "x"), ("how do I match a whole word, please?", "-w")])]
    return model, tok, ctx, full, questions


def test_kv_bytes_and_tokens_for_bytes():
    cfg = ModelConfig(family="llama", vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=30,
                      num_heads=9, num_kv_heads=3, head_dim=64, max_position=8192)
    per_token = 2 * 30 * 3 * 64 * 2  # k and v, all layers, fp16
    assert kv_bytes(1, cfg) == per_token and kv_bytes(100, cfg, dtype_bytes=4) == 200 * per_token
    assert streaming_tokens_for_bytes(kv_bytes(37, cfg), cfg) == 37
    assert streaming_tokens_for_bytes(kv_bytes(37, cfg) - 1, cfg) == 36


def test_streaming_keeps_sinks_and_recent_tokens_at_their_positions(tiny):
    _, _, ctx, full, _ = tiny
    n = ctx.n
    kept = streaming_contexts(full, n_keep=10, sinks=4)
    want = list(range(4)) + list(range(n - 6, n))
    for f, s in zip(full, kept):
        assert s.positions[0].tolist() == want
        assert torch.equal(s.k, f.k[:, :, want]) and torch.equal(s.v, f.v[:, :, want])
        assert (s.window, s.scale) == (f.window, f.scale)
    assert streaming_contexts(full, n_keep=3, sinks=4)[0].positions[0].tolist() == [0, 1, 2]
    everything = streaming_contexts(full, n_keep=n + 5)
    assert everything[0].positions[0].tolist() == list(range(n))


def test_teacher_forced_argmax_reproduces_the_greedy_answers(tiny):
    """Alignment and left padding: under full context, teacher forcing the greedy answers predicts them."""
    from nectar_export.answering import generate_answers
    from nectar_runtime.generate import GenerationConfig

    model, tok, ctx, full, questions = tiny
    convs = [[{"role": "user", "content": q["question"]}] for q in questions]
    answers = generate_answers(model, tok, ctx, full, convs, GenerationConfig(max_new_tokens=12))
    prompts = [local_ids(ctx, tok, c) for c in convs]
    assert len({len(p) for p in prompts}) == 3  # really padded
    rows = teacher_forced_logprobs(model, full, ctx.n, prompts, answers, [True] * 3)
    for a, r in zip(answers, rows):
        assert r.shape == (len(a) + 1, 97)
        assert r[: len(a)].argmax(-1).tolist() == a
        assert torch.allclose(r.exp().sum(-1), torch.ones(len(r)), atol=1e-5)


def test_identical_methods_agree_fully_and_no_document_does_not(tiny):
    model, tok, ctx, full, questions = tiny
    methods = {"full": full, "same": list(full), "streaming_all": streaming_contexts(full, ctx.n),
               "none": None, "streaming_8": streaming_contexts(full, 8)}
    res = evaluate_methods(model, tok, ctx, methods, questions, max_answer_tokens=10, batch_size=2,
                           progress=False, embedder=ConstantEmbedder())
    assert res["n_questions"] == 3
    n_full = [len(tok.encode(a, add_special_tokens=False)) for a in res["answers"]["full"]]
    assert res["n_answer_tokens"] == sum(n + (n < 10) for n in n_full)
    for name in ("full", "same", "streaming_all"):
        s = res["methods"][name]
        assert s["agreement"] == 1.0 and s["kl"] == pytest.approx(0.0, abs=1e-6), name
        assert s["exact_match"] == 1.0 and s["rouge_l"] == 1.0, name
        assert res["answers"][name] == res["answers"]["full"]
    none = res["methods"]["none"]
    assert none["kl"] > 1e-4 and none["agreement"] < 1.0
    assert set(res["methods"]) == set(methods)
    assert set(res["first_divergence"]) == set(methods) - {"full"}
    for name in ("same", "streaming_all"):
        assert res["first_divergence"][name] == [None] * 3
    for i, (ref, other) in enumerate(zip(res["answers"]["full"], res["answers"]["none"])):
        d = res["first_divergence"]["none"][i]
        assert (d is None) == (ref == other)
    table = format_table(res)
    assert table.splitlines()[0].split()[:3] == ["method", "agree", "KL"] and "streaming_8" in table
    assert "same - (3 identical)" in table.splitlines()[-1]


def test_first_divergence():
    from nectar_export.evaluate import first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # one stopped early: it leaves at the shorter length
    assert first_divergence([], [7]) == 0


def test_full_is_required(tiny):
    model, tok, ctx, full, questions = tiny
    with pytest.raises(ValueError, match="full"):
        evaluate_methods(model, tok, ctx, {"none": None}, questions, progress=False)


@pytest.mark.real
def test_smollm2_grep_excerpt_full_none_streaming(smollm2_gguf):
    from nectar_models.loading import load_model
    from nectar_runtime.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    model, tok = load_model(smollm2_gguf).model, load_tokenizer(smollm2_gguf)
    text = (MANUALS / "grep.txt").read_text()
    excerpt = text[: text.rfind("\n", 0, 2200)]  # NAME .. -i/--ignore-case, ~500 tokens
    ctx = make_context(tok, excerpt, model.config.max_position)
    assert 350 < ctx.n < 650
    rows = [json.loads(line) for line in (MANUALS / "grep.questions.jsonl").read_text().splitlines()]
    questions = [r for r in rows if r["id"] in ("grep-01", "grep-13", "grep-20")]
    full = model.prefill_document(torch.tensor([ctx.context_ids])).contexts()
    methods = {"full": full, "none": None, "streaming": streaming_contexts(full, 128)}
    res = evaluate_methods(model, tok, ctx, methods, questions, max_answer_tokens=32, progress=False)
    print(format_table(res), f"\n{time.perf_counter() - t0:.1f} s")
    full_s, none_s = res["methods"]["full"], res["methods"]["none"]
    assert full_s["agreement"] == 1.0 and full_s["kl"] == 0.0 and full_s["exact_match"] == 1.0
    assert none_s["agreement"] < 1.0 and none_s["kl"] > 0.0
    assert none_s["semantic_similarity"] < full_s["semantic_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < res["methods"]["streaming"]["kl"] and res["n_answer_tokens"] >= 3


def test_questions_file_variants(tmp_path):
    from nectar_export.cli import read_questions
    from nectar_runtime.errors import NectarError

    p = tmp_path / "q.jsonl"
    rows = [{"id": "a", "question": "Year?", "answer": 1871}, {"id": "b", "question": "Why?"},
            {"id": "c", "question": "Who?", "answer": ""}]
    p.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode())  # with a BOM
    qs = read_questions(p)
    assert [q["answer"] for q in qs] == ["1871", None, None]
    p.write_bytes(json.dumps({"question": "Caf\u00e9?"}).encode().replace(b"\\u00e9", b"\xe9"))  # latin-1 byte
    with pytest.raises(NectarError, match="UTF-8"):
        read_questions(p)
    p.write_text(json.dumps({"question": "Q", "answer": ["a", "b"]}))
    with pytest.raises(NectarError, match="answer"):
        read_questions(p)


def test_questions_without_reference_answers_have_no_qa_accuracy(tiny):
    model, tok, ctx, full, questions = tiny
    unanswered = [{**q, "answer": None} for q in questions]
    res = evaluate_methods(model, tok, ctx, {"full": full, "none": None}, unanswered, max_answer_tokens=4,
                           batch_size=2, progress=False, embedder=ConstantEmbedder())
    assert res["methods"]["none"]["qa_accuracy"] is None and res["methods"]["full"]["qa_accuracy"] is None
    one = [{**questions[0], "answer": None}] + questions[1:]  # the others still count
    res = evaluate_methods(model, tok, ctx, {"full": full}, one, max_answer_tokens=4, batch_size=2, progress=False,
                           embedder=ConstantEmbedder())
    texts = res["answers"]["full"]
    want = sum(q["answer"] in t for q, t in zip(questions[1:], texts[1:])) / 2
    assert res["methods"]["full"]["qa_accuracy"] == want
    assert [q["id"] for q in res["questions"]] == [q["id"] for q in questions]
