"""nectar_runtime: tokenization, chat templates, sampling and generation without torch.

Backends (torch, ONNX Runtime, TensorRT) live in `nectar_runtime.backends` and import their
libraries lazily, so `import nectar_runtime` needs only numpy, tokenizers, jinja2 and gguf.
"""

__version__ = "0.1.0"
