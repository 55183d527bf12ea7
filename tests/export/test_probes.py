"""Self-study probes: structure extraction on man pages, markdown and plain prose; questions;
the held-out split by question; determinism and ids; one real build with SmolLM2."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from nectar_export import probes as P
from nectar_export.probes import build as probe_build
from nectar_runtime.document import local_ids, make_context
from nectar_export.doc_structure import extract_structure, find_options
from nectar_export.probes import Probe, ProbeConfig, build_probes, probe_stats, question_key, split_probes

GREP = Path("/work/shared/data/manuals/grep.txt")  # the development set (README of the data)
MAN = """\
GREP(1)                          User Commands                         GREP(1)

NAME
       grep, egrep, fgrep, rgrep - print lines that match patterns

DESCRIPTION
       grep  searches  for  PATTERNS  in  each  FILE.  PATTERNS is one or more
       patterns separated by newline characters, and  grep  prints  each  line
       that  matches a pattern.

OPTIONS
   Matching Control
       -e PATTERNS, --regexp=PATTERNS
              Use PATTERNS as the patterns.  If this option is used  multiple
              times, search for all patterns given.

       -i, --ignore-case
              Ignore case distinctions in patterns and input data,  so  that
              characters that differ only in case match each other.

       -m NUM, --max-count=NUM
              Stop  reading  a  file  after NUM matching lines.  When the  -v  or
              --invert-match  option is also used, grep stops after outputting
              NUM non-matching lines.

       --help Output a usage message and exit.

   General Output Control
       -c, --count
              Suppress normal output; instead print a count of matching  lines
              for each input file.
"""

MARKDOWN = """\
# Widget Manual

Widgets are configured through `widget.toml` and the `WIDGET_HOME` variable.

## Installation

Run `pip install widget` and then call `widget.setup()` once.

```sh
# not a heading: a comment in a code block
widget --init
```

## Command line

- `--verbose`: print every step the widget takes while it runs.
- `-q, --quiet`  print nothing except errors.

## Troubleshooting

If the widget hangs, remove the cache directory and start it again.
"""

PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must "
    "be in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters. My dear Mr. Bennet, "
    "said his lady to him one day, have you heard that Netherfield Park is let at last? Mr. Bennet replied "
    "that he had not."
)


# ---------------------------------------------------------------- structure


def test_man_page_structure():
    st = extract_structure(MAN)
    titles = [s.title for s in st.sections]
    assert titles == ["NAME", "DESCRIPTION", "OPTIONS", "Matching Control", "General Output Control"]
    flags = [o.flags for o in st.options]
    assert flags == [("-e", "--regexp"), ("-i", "--ignore-case"), ("-m", "--max-count"), ("--help",), ("-c", "--count")]
    opt = {o.flags[0]: o for o in st.options}
    assert opt["-e"].arg == "PATTERNS" and opt["-m"].arg == "NUM"
    assert opt["-i"].description.startswith("Ignore case distinctions in patterns and input data, so that characters")
    assert opt["--help"].description == "Output a usage message and exit."
    # a wrapped line of running text that starts with a flag is not a definition
    assert all("--invert-match" not in o.flags for o in st.options)
    assert P.option_clause(opt["-i"]) == "ignore case distinctions in patterns and input data"
    assert P.option_clause(opt["-c"]) == "suppress normal output"


def test_markdown_structure():
    st = extract_structure(MARKDOWN)
    assert [s.title for s in st.sections] == ["Widget Manual", "Installation", "Command line", "Troubleshooting"]
    assert {f for o in st.options for f in o.flags} == {"--verbose", "-q", "--quiet"}
    codes = {t.text for t in st.terms if t.kind == "code"}
    assert {"widget.toml", "WIDGET_HOME", "widget.setup()"} <= codes


def test_crlf_document_has_the_same_structure():
    crlf = MARKDOWN.replace("\n", "\r\n")
    lf, cr = extract_structure(MARKDOWN), extract_structure(crlf)
    assert [s.title for s in cr.sections] == [s.title for s in lf.sections]
    assert {f for o in cr.options for f in o.flags} == {f for o in lf.options for f in o.flags}
    assert len(cr.paragraphs) == len(lf.paragraphs) > 1  # blank CRLF lines separate paragraphs
    # offsets index the CRLF text itself: the same paragraph texts up to line endings
    assert [crlf[p.start : p.end].replace("\r", "").strip() for p in cr.paragraphs] == \
        [MARKDOWN[p.start : p.end].strip() for p in lf.paragraphs]


def test_plain_prose_without_headings_still_yields_questions():
    st = extract_structure(PROSE)
    assert st.sections == () and st.options == ()
    assert st.paragraphs, "the text itself is a paragraph"
    qs = P.templated_questions(PROSE, st, 12, random.Random(0))
    assert len(qs) >= 8 and len({question_key(q) for q in qs}) == len(qs)
    assert any("It is a truth universally acknowledged" in q for q in qs)  # a passage question
    assert any(t.text == "Bennet" for t in st.terms)  # a name, from frequency + capitalization


@pytest.mark.parametrize("text", [
    "2026-11-23 12:00:01 worker started\n" * 60,  # a log: no headings, options or prose
    "Le café est prêt à être servi à l'heure où les élèves arrivent. " * 20,  # one long accented line
    "東京は日本の首都です。人口が多い都市です。\n" * 40,  # CJK, no spaces
])
def test_excerpts_exist_for_documents_without_structure(text):
    st = extract_structure(text)
    reqs = P.excerpt_requests(text, st, 6, random.Random(0))
    assert len(reqs) == 6, "every document gets its excerpt probes"
    for req, start, end in reqs:
        assert 0 <= start < end <= len(text) and text[start:end].strip() and req


def test_accented_prose_counts_as_prose():
    text = ("Élodie prépare le café très tôt chaque matin, avant l'arrivée des clients.\n\n"
            "Été comme hiver, elle ouvre la boutique à sept heures précises.\n")
    assert len(P.prose_paragraphs(text, extract_structure(text))) == 2


def test_help_listing_and_prose_dashes():
    helptext = ("Usage: tool [OPTION]\n  -a, --all        show everything\n  -b               be brief\n"
                "      --color=WHEN  colorize\n")
    assert [o.flags for o in find_options(helptext)] == [("-a", "--all"), ("-b",), ("--color",)]
    novel = "He paused.\n--and then, without a word, he left the room.\n--Nobody followed.\n"
    assert find_options(novel) == []


@pytest.mark.parametrize("line, flags, arg", [
    ("-C dir, --directory=dir", ("-C", "--directory"), "dir"),  # GNU roff: lowercase placeholders
    ("-n max-args, --max-args=max-args", ("-n", "--max-args"), "max-args"),
    ("-B bind_interface", ("-B",), "bind_interface"),  # BSD mdoc
    ("-L [bind_address:]port:host:hostport", ("-L",), "[bind_address:]port:host:hostport"),
    ("-M, --machine=", ("-M", "--machine"), None),  # systemd: an empty "=" argument
    ("-S, --since=, -U, --until=", ("-S", "--since", "-U", "--until"), None),
    ("-b [[ID][±offset]|all], --boot[=[ID][±offset]|all]", ("-b", "--boot"), "[[ID][±offset]|all]"),
])
def test_option_definition_styles(line, flags, arg):
    page = f"OPTIONS\n     {line}\n             Does something useful here.\n\n     -q      Quiet mode.\n"
    opts = find_options(page)
    assert [o.flags for o in opts] == [flags, ("-q",)]
    assert (opts[0].arg or None) == arg and opts[0].description == "Does something useful here."


def test_capitalized_word_after_a_flag_is_a_description_not_an_argument():
    opts = find_options("     -q Quiet.\n     -v  Verbose\n")
    assert all(o.arg is None for o in opts)


def test_templated_questions_cover_each_category():
    st = extract_structure(MAN)
    qs = P.templated_questions(MAN, st, 30, random.Random(1))
    assert len(qs) == 30 and len({question_key(q) for q in qs}) == 30
    assert any("Matching Control" in q or "General Output Control" in q for q in qs)
    assert any("-i" in q or "--ignore-case" in q or "ignore case" in q for q in qs)


def test_option_clause_makes_imperatives():
    clause = lambda d: P.option_clause(SimpleNamespace(description=d))  # noqa: E731
    assert clause("Suppress error messages about nonexistent files.") == "suppress error messages about nonexistent files"
    assert clause("(HTTP) Tells curl to use HTTP Basic authentication.") == "tell curl to use HTTP Basic authentication"
    assert clause("Matches the whole line.") == "match the whole line"
    assert clause("This option is ignored.") is None
    assert clause("Remaining arguments are positional strings.") is None


def test_question_key_normalizes_but_keeps_flags_apart():
    assert question_key("What does  the OPTIONS section cover?") == question_key("what does the options section cover")
    assert question_key("What does -v do?") != question_key("What does -V do?")
    assert question_key("Explain --ignore-case.") == "explain --ignore-case"


def test_parse_model_question():
    doc = "grep searches for PATTERNS"
    assert P.parse_model_question("What does grep search for?\nIt searches...", doc) == "What does grep search for?"
    assert P.parse_model_question('Question: "How do I count lines?" is a good one', doc) == "How do I count lines?"
    assert P.parse_model_question("Sentence: What is a pattern?", doc) == "What is a pattern?"
    assert P.parse_model_question('The user asks: “What does -f do?” and more', doc) == "What does -f do?"
    assert P.parse_model_question("What is the order of the text in\nthe section OPTIONS? More.", doc) == (
        "What is the order of the text in the section OPTIONS?")
    assert P.parse_model_question("Explain the DESCRIPTION section", doc) == "Explain the DESCRIPTION section"
    assert P.parse_model_question("What is the order of the text in the section on", doc) is None  # cut off
    assert P.parse_model_question("Sure! Here is a question you could ask.", doc) is None
    assert P.parse_model_question("What is the牌号 keyword?", doc) is None
    assert P.parse_model_question("-l -l -l -l -l -l -l -l", doc) is None


def test_trim_repetition_keeps_a_prefix():
    looped = "The -v option inverts.\n\nIt is used a lot.\n\nIt is used a lot.\n\nIt is used a lot.\n\nIt is"
    assert P.trim_repetition(looped) == "The -v option inverts.\n\nIt is used a lot.\n\nIt is used a lot."
    flags = "Use grep -c -n -l -l -l -l -l -l -l"
    assert P.trim_repetition(flags) == "Use grep -c -n -l -l -l"
    assert P.trim_repetition("A fine answer.") == "A fine answer."


# ---------------------------------------------------------------- split


def _probe(kind, key, keys=()):
    return Probe(kind, key, [{"role": "user", "content": key}, {"role": "assistant", "content": ""}], [1, 2], tuple(keys))


def test_split_is_by_question_and_chains_respect_sides():
    keys = [f"q{i}" for i in range(40)]
    probes = [_probe(k, q) for q in keys for k in ("templated", "answer_greedy", "answer_sampled")]
    held = P.heldout_keys(keys * 3, 0.15, seed=3)
    assert len(held) == 6
    train_keys = [k for k in keys if k not in held]
    h = sorted(held)
    probes += [_probe("chain", "c-train", train_keys[:5]), _probe("chain", "c-held", h[:3]),
               _probe("chain", "c-mixed", [train_keys[0], h[0]])]
    train, heldout = split_probes(probes, 0.15, seed=3)
    tk = {k for p in train for k in p.question_keys}
    hk = {k for p in heldout for k in p.question_keys}
    assert tk.isdisjoint(hk) and hk == held
    assert [p.question_key for p in train if p.kind == "chain"] == ["c-train"]
    assert [p.question_key for p in heldout if p.kind == "chain"] == ["c-held"]
    assert len(train) + len(heldout) == len(probes) - 1  # only the mixed chain is dropped


# ---------------------------------------------------------------- build (fake model and tokenizer)


class CharTokenizer:
    """One token per character; a ChatML template. Enough for local_ids and probe lengths."""

    chat_template = "chatml"
    eos_token_ids = {0}

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    encode_literal = encode

    def spells_special(self, text):  # one token per character: no control token can be spelled
        return False

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _fake_generate(model, tokenizer, ctx, contexts, conversations, cfg, batch_size=8, progress=None, backend=None):
    """Deterministic stand-in for generation: greedy depends on the prompt, sampling on the seed too."""
    out = []
    for conv in conversations:
        s = cfg.sampling
        h = hashlib.sha256(f"{conv[-1]['content']}|{s.temperature}|{s.seed}|{len(out)}".encode()).hexdigest()
        if conv[-1]["content"].startswith("Write one question"):
            text = f"What is item {h[:6]} in the text?"
        else:
            text = f"It is explained in part {h[:8]}. " * 3
        out.append(tokenizer.encode(text[: cfg.max_new_tokens * 4]))
        if progress is not None:
            progress.update(1)
    return out


@pytest.fixture
def fake_build(monkeypatch):
    monkeypatch.setattr(probe_build, "generate_answers", _fake_generate)
    tok = CharTokenizer()
    model = SimpleNamespace(config=SimpleNamespace(max_position=20000))
    ctx = make_context(tok, MAN, model.config.max_position)
    cfg = ProbeConfig(templated_questions=12, model_questions=6, excerpts=4, chains=4, min_position_span=1500,
                      holdout_frac=0.25)

    def build(**over):
        c = ProbeConfig(**{**cfg.__dict__, **over})
        return build_probes(model, tok, ctx, None, c, progress=False), ctx, tok, c

    return build


def test_build_is_deterministic_given_a_seed_and_ids_match_turns(fake_build):
    a, ctx, tok, cfg = fake_build()
    b, *_ = fake_build()
    c, *_ = fake_build(seed=1)
    assert [(p.kind, p.turns, p.ids) for p in a] == [(p.kind, p.turns, p.ids) for p in b]
    assert [p.turns for p in a] != [p.turns for p in c]
    for p in a:
        assert p.ids == local_ids(ctx, tok, p.turns)
        assert p.turns[-1]["role"] == "assistant"
    stats = probe_stats(a)
    assert all(stats["per_kind"][k] > 0 for k in P.KINDS), stats
    assert stats["tokens"] == sum(len(p.ids) for p in a)


def test_built_chains_reach_the_span_and_survive_the_split(fake_build):
    probes, ctx, tok, cfg = fake_build()
    chains = [p for p in probes if p.kind == "chain"]
    assert len(chains) == cfg.chains
    assert all(len(p.ids) >= cfg.min_position_span for p in chains)
    assert max(len(p.ids) for p in probes) <= 20000 - ctx.n
    train, held = split_probes(probes, cfg.holdout_frac, cfg.seed)
    assert len(train) + len(held) == len(probes)  # no chain mixes sides
    assert any(p.kind == "chain" for p in held) and any(p.kind == "chain" for p in train)
    assert {p.question_key for p in train}.isdisjoint({p.question_key for p in held})
    # excerpts are the document's own text
    for p in probes:
        if p.kind == "excerpt":
            assert p.turns[-1]["content"].strip() in MAN


def test_config_is_validated():
    from nectar_runtime.errors import NectarError

    with pytest.raises(NectarError, match="templated_questions"):
        ProbeConfig(templated_questions=-1)
    with pytest.raises(NectarError, match="holdout_frac"):
        ProbeConfig(holdout_frac=1.0)
    with pytest.raises(NectarError, match="nothing to build"):
        ProbeConfig(templated_questions=0, model_questions=0, excerpts=0)
    assert ProbeConfig().min_position_span >= 1024


def test_scaled_multiplies_every_probe_count_and_keeps_the_rest():
    from nectar_runtime.errors import NectarError

    base = ProbeConfig(templated_questions=10, model_questions=3, excerpts=0, chains=1, max_answer_tokens=40, seed=7)
    big = base.scaled(4)
    assert (big.templated_questions, big.model_questions, big.excerpts, big.chains) == (40, 12, 0, 4)
    small = base.scaled(0.1)  # a positive count never rounds away to no probes of its kind
    assert (small.templated_questions, small.model_questions, small.excerpts, small.chains) == (1, 1, 0, 1)
    assert (big.max_answer_tokens, big.seed, big.sampled_answers_per_question) == (40, 7, base.sampled_answers_per_question)
    assert base.scaled(1) == base
    for bad in (0, -1, 100):
        with pytest.raises(NectarError, match="--probe-scale"):
            base.scaled(bad)


# ---------------------------------------------------------------- real model


@pytest.mark.real
def test_real_build_on_a_manual_piece(smollm2_gguf):
    import torch

    from nectar_models.loading import load_model
    from nectar_runtime.tokenizer import load_tokenizer

    tok, model = load_tokenizer(smollm2_gguf), load_model(smollm2_gguf).model
    text = GREP.read_text(encoding="utf-8")[:2600] if GREP.exists() else MAN  # ~670 tokens
    ctx = make_context(tok, text, model.config.max_position)
    contexts = model.prefill_document(torch.tensor([ctx.context_ids])).contexts()
    cfg = ProbeConfig(templated_questions=6, model_questions=3, excerpts=3, chains=2, max_answer_tokens=32,
                      max_question_tokens=24, batch_size=8)  # ~20 s on 2 idle cores
    probes = build_probes(model, tok, ctx, contexts, cfg, progress=False)
    stats = probe_stats(probes)
    assert all(stats["per_kind"][k] > 0 for k in P.KINDS if k != "model_question"), stats
    longest = max(len(p.ids) for p in probes)
    assert cfg.min_position_span <= longest <= model.config.max_position - ctx.n
    for p in probes[:: max(1, len(probes) // 8)]:
        assert p.ids == local_ids(ctx, tok, p.turns)
