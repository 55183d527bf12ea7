"""Self-study probes: conversations about the document whose local queries train the Nectar heads.

A probe is a conversation placed after the document (`nectar_runtime.document.local_ids`); every token of it
gives, in every layer, a query q whose exact attention over the document the heads must learn.
The probes should look like real use, so they come from five sources:

- "templated": questions written from the document's structure (`doc_structure`): headings,
  option definitions, terms, paragraphs ("What does -i do?", "Explain the section X.").
  Turns: the question, then an empty assistant turn (the prompt as a user sends it).
- "model_question": the model, reading the document, writes a question (sampled). Turns: the
  writing instruction, then the model's reply. The parsed question is asked like the others.
- "answer_greedy" / "answer_sampled": the full-context model's own answers to every question
  (templated and model-written), greedy and sampled; cut at degenerate repetition.
- "excerpt": the user asks to quote a part; the assistant turn is the document's own text.
- "chain": earlier Q/A pairs concatenated into one multi-turn conversation whose local
  positions reach n + `min_position_span`, so far positions are covered too.

The last assistant turn of every probe is left open (teacher-forced, no turn end). Probes are
grouped by `question_key` for the held-out split; chains are built within each side of the split
(`ProbeConfig.holdout_frac`, `seed`), so `split_probes` with the same values keeps all of them.
"""

from .build import build_probes, heldout_keys, probe_stats, split_probes
from .config import KINDS, Probe, ProbeConfig, question_key
from .excerpts import cut_to_tokens, even_windows, excerpt_requests
from .model_questions import WRITE_QUESTION, WRITE_QUESTION_ABOUT, parse_model_question, trim_repetition
from .templated import option_clause, prose_paragraphs, snippet, templated_questions

__all__ = [
    "KINDS", "Probe", "ProbeConfig", "question_key",
    "option_clause", "prose_paragraphs", "snippet", "templated_questions",
    "WRITE_QUESTION", "WRITE_QUESTION_ABOUT", "parse_model_question", "trim_repetition",
    "cut_to_tokens", "even_windows", "excerpt_requests",
    "build_probes", "heldout_keys", "probe_stats", "split_probes",
]
