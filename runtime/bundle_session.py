"""Open a bundle for chat: tokenizer + chat template + document placement + a graph backend.

torch-free: what `nectar run` and `nectar chat` use, on edge devices and GPUs alike.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, read_bundle
from .chat_session import ChatSession
from .document import local_ids, make_context, read_stored_document
from .errors import NectarError
from .tokenizer import load_tokenizer


def bundle_backend(bundle: Bundle, threads: int | None = None, provider: str | None = None):
    """The backend a bundle's format calls for: ONNX Runtime, or a TensorRT engine."""
    if bundle.format == "onnx":
        from .backends.ort_backend import OrtBackend

        return OrtBackend.from_bundle(bundle, threads=threads, provider=provider)
    if bundle.format == "trt":
        from .backends.trt_backend import TrtBackend

        return TrtBackend.from_bundle(bundle)
    if bundle.format == "trt-onnx":
        raise NectarError(f"{bundle.path}: holds only the TensorRT plugin graph; build the engine with `nectar export --format trt` on the target")
    raise NectarError(f"{bundle.path}: unknown bundle format {bundle.format!r}; re-export the bundle")


def open_bundle_session(path: str | Path, threads: int | None = None, provider: str | None = None,
                        verify: bool = True) -> ChatSession:
    """A ChatSession whose turns follow the bundle's document (exact KV or Nectar heads inside)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise NectarError(f"threads (--threads) must be a whole number >= 1 or None for all cores, got {threads!r}")
    bundle = read_bundle(path, verify=verify)
    tok = load_tokenizer(bundle.path)
    text = read_stored_document(bundle.path / "document.txt")
    ctx = make_context(tok, text, bundle.manifest["model"]["max_position"], source=str(bundle.path / "document.txt"), reserve=0)
    if ctx.n != bundle.context_len or ctx.sha256 != bundle.manifest["document"]["sha256"]:
        raise NectarError(f"{bundle.path}: document.txt does not give the manifest's context ({ctx.n} vs {bundle.context_len} tokens); re-export")
    backend = bundle_backend(bundle, threads, provider)
    return ChatSession(tok, backend, build_prompt=lambda turns: local_ids(ctx, tok, turns), plain_qa=not ctx.chat)
