"""A model + tokenizer + backend, ready to answer: what `nectar generate`, `ask` and `chat` drive.

Prompts are built here (plain text or the model's chat template, multi-turn history kept);
the backend holds whatever stands for the document (nothing, exact KV, or Nectar heads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .generate import GenerationConfig, check_fits, stream_text


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
        unless `cfg` says otherwise); the turn joins the history once the answer is complete."""
        cfg = cfg or GenerationConfig()
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
            answer.append(piece)
            yield piece
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


def open_artifact(path: str, device: str = "cpu", dtype: str = "float32", model: str | None = None) -> ChatSession:
    """A ChatSession over a Nectar artifact on the torch backend (what `nectar ask` runs; on CUDA with
    Triton the fused CUDA-graph step). Needs the exporter's extras (torch); the base model comes from
    the manifest unless `model` names a local copy of the same weights."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        from .errors import NectarError

        raise NectarError("open_artifact needs torch: pip install 'nectar-attention[export]' (or export a bundle "
                          "and use open_bundle, which needs no torch)") from None
    return open_torch_session(model, artifact=path, device=device, dtype=dtype)
