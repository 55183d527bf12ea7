"""Execution backends. Each imports its library (torch, onnxruntime, tensorrt) lazily."""
