"""Generation: greedy parity with transformers on SmolLM2, sampling, stop strings, EOS."""

from __future__ import annotations

import numpy as np
import pytest

from nectar_runtime.generate import GenerationConfig, StopMatcher, generate_ids, stream_text
from nectar_runtime.sampling import Sampler, SamplingConfig

PROMPTS = [  # answers longer than 64 tokens, so all 64 greedy steps are compared
    "Write a short story about a robot learning to paint.",
    "Explain how a compiler works, step by step.",
    "List ten tips for writing clean Python code.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from nectar_models.loading import load_model
    from nectar_runtime.tokenizer import load_tokenizer

    return load_model(smollm2_gguf).model, load_tokenizer(smollm2_gguf)


@pytest.mark.real
def test_greedy_64_tokens_identical_to_transformers(smollm2, smollm2_gguf):
    import torch
    import transformers as T

    from nectar_runtime.backends.torch_backend import TorchBackend

    model, tok = smollm2
    ref = T.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    backend = TorchBackend(model)
    cfg = GenerationConfig(max_new_tokens=64)
    for prompt in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        ours = [int(t[0]) for t in generate_ids(backend, [ids], cfg, eos_ids=tok.eos_token_ids)]
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)
        assert ours == out[0, len(ids):].tolist(), prompt
        assert len(ours) == 64


@pytest.mark.real
def test_batch_with_left_padding_equals_one_by_one(smollm2):
    from nectar_runtime.backends.torch_backend import TorchBackend

    model, tok = smollm2
    backend = TorchBackend(model)
    cfg = GenerationConfig(max_new_tokens=12)
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    batched = np.stack(list(generate_ids(backend, prompts, cfg, eos_ids=set())), 1)
    for i, p in enumerate(prompts):
        single = np.stack(list(generate_ids(backend, [p], cfg, eos_ids=set())), 1)[0]
        assert batched[i].tolist() == single.tolist()


@pytest.mark.real
def test_chat_answer_names_paris_and_stops_at_eos(smollm2):
    from nectar_runtime.backends.torch_backend import TorchBackend

    model, tok = smollm2
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    text = "".join(stream_text(TorchBackend(model), tok, ids, GenerationConfig(max_new_tokens=40)))
    assert "Paris" in text
    assert "<|im_end|>" not in text


def test_sampler_seeded_is_reproducible_and_respects_top_k():
    logits = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
    cfg = SamplingConfig(temperature=0.8, top_k=3, seed=7)
    a = [Sampler(cfg)(logits).tolist() for _ in range(1)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    draws1 = [s1(logits).tolist() for _ in range(20)]
    draws2 = [s2(logits).tolist() for _ in range(20)]
    assert draws1 == draws2 and a[0] == draws1[0]
    top3 = np.argsort(-logits, axis=1)[:, :3]
    for d in draws1:
        assert d[0] in top3[0] and d[1] in top3[1]


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float64))
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    seen = {int(s(logits)[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_greedy_is_argmax():
    logits = np.random.default_rng(1).normal(size=(3, 10))
    assert Sampler(SamplingConfig())(logits).tolist() == logits.argmax(1).tolist()


def test_stop_matcher_holds_back_partial_stop_strings():
    m = StopMatcher(("STOP",))
    assert m.cut("hello ST") == ("hello", False)
    assert m.cut("hello STOP there") == ("hello ", True)
    assert m.final("abc ST") == "abc ST"
    long = StopMatcher(("\nQuestion:",))  # longer than the text so far: nothing may show early
    assert [long.cut(t)[0] for t in (" Yes\n", " Yes\nQu", " Yes\nQuestion")] == ["", "", " Yes"]


class _ScriptedBackend:
    """Emits a fixed token sequence, whatever the input."""

    context_len, max_local_len = 0, 100

    def __init__(self, script, vocab=10):
        self.script, self.vocab, self.i = script, vocab, 0

    def reset(self, batch, capacity):
        self.i = 0

    def step(self, ids, positions):
        out = np.zeros((ids.shape[0], self.vocab), dtype=np.float32)
        out[:, self.script[min(self.i, len(self.script) - 1)]] = 1.0
        self.i += 1
        return out


class _CharTokenizer:
    eos_token_ids = {9}
    alphabet = "abcdefgh "

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.alphabet[i] for i in ids if i != 9)


def test_stream_stops_at_eos_and_stop_string_and_max_tokens():
    tok = _CharTokenizer()
    eos = "".join(stream_text(_ScriptedBackend([0, 1, 2, 9, 3]), tok, [1], GenerationConfig(max_new_tokens=10)))
    assert eos == "abc"
    stop = "".join(stream_text(_ScriptedBackend([0, 1, 8, 2, 3, 4]), tok, [1], GenerationConfig(max_new_tokens=10, stop_strings=("cd",))))
    assert stop == "ab "
    capped = "".join(stream_text(_ScriptedBackend([0, 1, 2, 3, 4]), tok, [1], GenerationConfig(max_new_tokens=2)))
    assert capped == "ab"


def test_prompt_beyond_window_is_refused():
    from nectar_runtime.errors import NectarError

    b = _ScriptedBackend([0])
    with pytest.raises(NectarError, match="does not fit"):
        list(generate_ids(b, [[1] * 101], GenerationConfig(), set()))


class _CapacityBackend(_ScriptedBackend):
    """Counts the tokens fed and refuses more than reset() reserved, as the real backends do."""

    def reset(self, batch, capacity):
        self.i, self.capacity, self.fed = 0, capacity, 0
        assert capacity <= self.max_local_len

    def step(self, ids, positions):
        self.fed += ids.shape[1]
        assert self.fed <= self.capacity, (self.fed, self.capacity)
        return super().step(ids, positions)


@pytest.mark.parametrize("prompt_len", [1, 57, 99, 100])
def test_generation_uses_every_cache_slot_and_never_more(prompt_len):
    """The last sampled token is never fed back: a prompt of t tokens leaves room for
    max_local_len - t + 1 new tokens, so even a prompt that fills the window answers one token."""
    b = _CapacityBackend([0])
    toks = list(generate_ids(b, [[1] * prompt_len], GenerationConfig(max_new_tokens=1000), set()))
    assert len(toks) == b.max_local_len - prompt_len + 1
    assert b.fed == b.capacity == b.max_local_len


def test_top_p_fast_cut_equals_full_stable_sort():
    """top_p_keep sorts only the largest candidates; the kept set (order, ties by index, the cut)
    must equal the full stable sort's on any distribution, including ties and a missing nucleus."""
    from nectar_runtime.sampling import top_p_keep

    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(5, 400))
        logits = rng.normal(size=n) * rng.uniform(0.1, 5)
        if trial % 3 == 0:
            logits = np.round(logits, 1)  # many exact ties
        p = np.exp(logits - logits.max())
        p /= p.sum()
        for top_p in (0.1, 0.5, 0.9, 0.95, 0.999999, 1 - 1e-15):
            order = np.argsort(-p, kind="stable")
            want = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
            for cands in (1, 3, 16, 1024):
                assert np.array_equal(top_p_keep(p, top_p, cands), want), (trial, top_p, cands)


def test_a_long_conversation_drops_its_oldest_turns_to_fit_the_window():
    """ChatSession keeps a turn's question + answer; when the next prompt would leave less than a
    quarter of the window for the answer, the oldest pairs go (the document is not history)."""
    from nectar_runtime.chat_session import ChatSession
    from nectar_runtime.errors import NectarError

    b = _CapacityBackend([0, 1, 2, 9])  # every answer: "abc", then EOS
    s = ChatSession(_CharTokenizer(), b, build_prompt=lambda turns: [1] * sum(len(t["content"]) for t in turns))
    q = "q" * 30
    assert s.ask(q) == "abc" and s.turns_dropped == 0  # 30 tokens
    assert s.ask(q) == "abc" and s.turns_dropped == 0  # 30 + 3 + 30 = 63, + 25 of room <= 100
    assert s.ask(q + "!") == "abc" and s.turns_dropped == 2  # 96 + 25 > 100: the first pair goes
    assert [t["content"] for t in s.history] == [q, "abc", q + "!", "abc"]
    assert s.ask("r" * 90) == "abc" and s.turns_dropped == 4  # the rest goes too: 90 alone fits (room 10)
    with pytest.raises(NectarError, match="does not fit"):  # too long on its own: refused, history kept
        s.ask("x" * 101)
    assert [t["content"] for t in s.history] == ["r" * 90, "abc"]


def test_a_session_checks_its_arguments_at_once():
    from nectar_runtime.chat_session import ChatSession
    from nectar_runtime.errors import NectarError

    s = ChatSession(_CharTokenizer(), _ScriptedBackend([0, 9]), build_prompt=lambda turns: [1])
    with pytest.raises(NectarError, match="the question is empty"):
        s.stream("  \n")  # at the call, not at the first piece
    with pytest.raises(TypeError, match="must be a str, got NoneType"):
        s.ask(None)
    with pytest.raises(TypeError, match="cfg must be a nectar_runtime.GenerationConfig or None, got dict"):
        s.ask("hi", {"max_new_tokens": 4})
    assert s.history == [] and s.ask("hi") == "a"


def test_a_newer_turn_supersedes_an_unfinished_stream():
    from nectar_runtime.chat_session import ChatSession
    from nectar_runtime.errors import NectarError

    s = ChatSession(_CharTokenizer(), _ScriptedBackend([0, 1, 2, 3, 9]), build_prompt=lambda turns: [1])
    first = s.stream("q1")
    assert next(first) == "a"
    assert s.ask("q2") == "abcd"  # the newer turn runs whole
    with pytest.raises(NectarError, match="superseded"):
        next(first)
    assert [t["content"] for t in s.history] == ["q2", "abcd"]  # the unfinished turn never joined the history


def test_the_plain_question_answer_format_ends_an_answer_at_the_next_question():
    """A base model (no chat template) runs on into "\\nQuestion: …" turns of its own: the answer ends there,
    and the format's space after "Answer:" is not part of it."""
    from nectar_runtime.chat_session import ChatSession

    class Tok:
        alphabet, eos_token_ids = " Yes\nQuestion:", {19}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.alphabet[i] for i in ids if i != 19)

    script = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # " Yes\nQuestion:" then more
    s = ChatSession(Tok(), _ScriptedBackend(script, vocab=20), build_prompt=lambda turns: [1], plain_qa=True)
    assert s.ask("Is it?") == "Yes"
    assert s.history[-1] == {"role": "assistant", "content": "Yes"}
