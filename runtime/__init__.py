"""nectar_runtime: tokenization, chat templates, sampling and generation without torch.

Backends (torch, ONNX Runtime, TensorRT) live in `nectar_runtime.backends` and import their
libraries lazily, so `import nectar_runtime` needs only numpy, tokenizers, jinja2 and gguf.

The embedding API (docs/deploy.md, "Python API"), imported on first use:

    import nectar_runtime as nr
    assistant = nr.open_bundle("grep.int4", threads=4)       # a ChatSession over the bundle's document
    print(assistant.ask("How do I count matching lines?"))   # or: for piece in assistant.stream(q): ...
    assistant.reset()                                        # forget the conversation, keep the document

`open_artifact(ART, device="cuda")` gives the same session over a fitted artifact on the torch backend
(needs the exporter's extras).
"""

__version__ = "0.1.0"

# public name -> (module, attribute); resolved lazily so importing the package stays light
_API = {
    "open_bundle": ("bundle_session", "open_bundle_session"),
    "open_artifact": ("chat_session", "open_artifact"),
    "ChatSession": ("chat_session", "ChatSession"),
    "GenerationConfig": ("generate", "GenerationConfig"),
    "SamplingConfig": ("sampling", "SamplingConfig"),
    "NectarError": ("errors", "NectarError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'nectar_runtime' has no attribute {name!r}")
    import importlib

    module, attr = _API[name]
    return getattr(importlib.import_module(f".{module}", __name__), attr)
