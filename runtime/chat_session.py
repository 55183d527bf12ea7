"""A model + tokenizer + backend, ready to answer: what `nectar generate`, `ask` and `chat` drive.

Prompts are built here (plain text or the model's chat template, multi-turn history kept);
the backend holds whatever stands for the document (nothing, exact KV, or Nectar heads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from .errors import NectarError
from .generate import GenerationConfig, check_fits, stream_text


PLAIN_QA_STOP = "\nQuestion:"


def check_turn(prompt, cfg) -> None:
    """A question must be non-empty text and `cfg` a GenerationConfig (or None): one clear error, before anything runs."""
    if not isinstance(prompt, str):
        raise TypeError(f"the question must be a str, got {type(prompt).__name__}")
    if cfg is not None and not isinstance(cfg, GenerationConfig):
        raise TypeError(f"cfg must be a nectar_runtime.GenerationConfig or None, got {type(cfg).__name__} "
                        "(e.g. GenerationConfig(max_new_tokens=64))")
    if not prompt.strip():
        raise NectarError("the question is empty; ask something")


@dataclass
class ChatSession:
    tokenizer: object  # nectar_runtime.tokenizer.TextTokenizer
    backend: object  # a DecoderBackend
    history: list[dict] = field(default_factory=list)
    # turns -> local token ids; set for documents (the turns come after the document's context)
    build_prompt: Callable[[list[dict]], list[int]] | None = None
    # set by `stream` when its answer stopped because the local window was full: the tokens it held
    window_full: int | None = None
    # set by `stream`: how many of the oldest turns it dropped so the conversation fits the window
    turns_dropped: int = 0
    # the plain "Question: …\nAnswer:" format of models without a chat template (document.local_text): a base
    # model runs on into turns of its own, so an answer ends at the next "\nQuestion:", and its leading space
    # (the format's, after "Answer:") is not shown
    plain_qa: bool = False
    # answers started so far: an unfinished stream sees a newer turn by this count
    turns_started: int = field(default=0, init=False, repr=False)

    def prompt_ids(self, prompt: str, chat: bool, system: str | None = None, history: list[dict] | None = None) -> list[int]:
        """Token ids of the local part: the whole prompt, or the chat turns (`history`, by default the
        session's, then `prompt`) after the document."""
        turns = (self.history if history is None else history) + [{"role": "user", "content": prompt}]
        if self.build_prompt is not None:
            return self.build_prompt(turns)
        if not chat:
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def stream(self, prompt: str, cfg: GenerationConfig | None = None, chat: bool = True,
               system: str | None = None) -> Iterator[str]:
        """The answer to `prompt` as text pieces while they are generated (greedy, 256 new tokens
        unless `cfg` says otherwise); the turn joins the history once the answer is complete. The
        arguments are checked at once (an empty question: NectarError; wrong types: TypeError); a
        newer `stream`/`ask` on this session supersedes an unfinished one (it then raises if resumed)."""
        check_turn(prompt, cfg)
        self.turns_started += 1
        return self._answer(prompt, cfg or GenerationConfig(), chat, system, self.turns_started)

    def _answer(self, prompt: str, cfg: GenerationConfig, chat: bool, system: str | None, turn: int) -> Iterator[str]:
        if self.plain_qa:
            cfg = replace(cfg, stop_strings=(*cfg.stop_strings, PLAIN_QA_STOP))
        keep = self.history
        ids = self.prompt_ids(prompt, chat, system, keep)
        # A long conversation outgrows the local window: drop the oldest question + answer pairs until
        # this turn fits with room for an answer (a quarter of the window, or max_new_tokens if less).
        # The document is not in the history: it stays whole. A question too long on its own is refused,
        # and the history is left as it was.
        room = min(cfg.max_new_tokens, max(1, self.backend.max_local_len // 4))
        while keep and (chat or self.build_prompt is not None) and len(ids) + room > self.backend.max_local_len:
            keep = keep[2:]
            ids = self.prompt_ids(prompt, chat, system, keep)
        check_fits(self.backend, len(ids))
        self.turns_dropped, self.history = len(self.history) - len(keep), keep
        answer = []
        self.window_full = None

        def full(n: int) -> None:
            self.window_full = n

        for piece in stream_text(self.backend, self.tokenizer, ids, cfg, on_window_full=full):
            if self.plain_qa and not answer:  # until the first visible text: pieces kept are never blank
                piece = piece.lstrip()
                if not piece:
                    continue
            answer.append(piece)
            yield piece
            if self.turns_started != turn:  # resumed after a newer turn reset the backend: its state is gone
                raise NectarError("this answer was superseded: a newer ask/stream started on the same session before "
                                  "it finished; finish or drop one answer before asking the next")
        if chat or self.build_prompt is not None:
            self.history += [{"role": "user", "content": prompt}, {"role": "assistant", "content": "".join(answer)}]

    def ask(self, prompt: str, cfg: GenerationConfig | None = None) -> str:
        """The whole answer to `prompt` (one chat turn, kept in the history like `stream`'s)."""
        return "".join(self.stream(prompt, cfg))

    def reset(self) -> None:
        """Forget the conversation; the document (exact KV or Nectar heads) stays."""
        self.history = []


def open_torch_session(model: str | None, artifact: str | None = None, device: str = "cpu", dtype: str = "float32") -> ChatSession:
    """Load a model (name, .gguf or HF dir; default model when None) on the torch backend. With an
    artifact, `model` (when given) replaces the manifest's model name: a local copy of the same
    weights; the artifact's weight-hash check refuses any other model."""
    from .backends.torch_backend import TorchBackend, resolve_device
    from .hub import resolve_model
    from .tokenizer import load_tokenizer

    device = resolve_device(device)
    if artifact:
        from nectar_export.pipeline import open_artifact_session

        return open_artifact_session(artifact, device=device, dtype=dtype, model=model)
    import torch
    from nectar_models.loading import load_model

    path = resolve_model(model, pull_missing=True)
    tok = load_tokenizer(path)
    lm = load_model(path, dtype=getattr(torch, dtype), device=device)
    return ChatSession(tok, TorchBackend(lm.model))


def open_artifact(path: str, device: str = "auto", dtype: str = "float32", model: str | None = None) -> ChatSession:
    """A ChatSession over a Nectar artifact on the torch backend (what `nectar ask` runs; on CUDA with
    Triton the fused CUDA-graph step). `device`: "auto" (CUDA when torch sees a GPU, as the CLI), "cpu", "cuda". Needs the exporter's extras (torch); the base model comes from
    the manifest unless `model` names a local copy of the same weights."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        from .errors import NectarError

        raise NectarError("open_artifact needs torch: pip install 'nectar-attention[export]' (or export a bundle "
                          "and use open_bundle, which needs no torch)") from None
    return open_torch_session(model, artifact=path, device=device, dtype=dtype)
