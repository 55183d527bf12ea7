"""The TensorRT backend: a bundle's engine.plan behind the `DecoderBackend` interface.

Needs tensorrt (>= 10.6) and torch with CUDA on the device (torch holds the device buffers and
runs the plugin's Triton kernel); the ONNX Runtime backend stays the torch-free path. One
sequence (batch 1); past keys/values hold exactly the local tokens so far (the engine's
NectarAttention nodes take the cache as one contiguous block).

NOT RUN IN THIS REPOSITORY'S CI (TensorRT cannot be installed there); see docs/deploy.md.
"""

from __future__ import annotations

import numpy as np

from ..errors import NectarError


class TrtBackend:
    def __init__(self, engine, context_len: int, max_local_len: int, layers: int, kv_heads: int, head_dim: int, vocab: int):
        import torch

        self.torch, self.engine = torch, engine
        self.context = engine.create_execution_context()
        self.context_len, self.max_local_len = context_len, max_local_len
        self.layers, self.kv_heads, self.head_dim, self.vocab = layers, kv_heads, head_dim, vocab
        self.stream = torch.cuda.Stream()
        self.kv_dtype = torch.float16 if "float16" in str(engine.get_tensor_dtype("past_key_values.0.key")).lower() else torch.float32

    @classmethod
    def from_bundle(cls, bundle) -> "TrtBackend":
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise NectarError(f"{bundle.path}: a TensorRT bundle needs tensorrt and torch with CUDA ({e.name} is missing); "
                              "or export with --format onnx for ONNX Runtime") from None
        if not torch.cuda.is_available():
            raise NectarError(f"{bundle.path}: a TensorRT bundle needs a CUDA GPU")
        import nectar_kernels.trt_plugin  # noqa: F401  (registers the plugin before deserializing)

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(bundle.graph_path.read_bytes())
        if engine is None:
            raise NectarError(f"{bundle.graph_path}: TensorRT cannot load this engine (built for another GPU or TensorRT version?); rebuild it")
        m = bundle.manifest["model"]
        return cls(engine, bundle.context_len, bundle.max_local_len, m["num_layers"], m["num_kv_heads"], m["head_dim"], m["vocab_size"])

    def reset(self, batch: int, capacity: int) -> None:
        if batch != 1:
            raise NectarError("TensorRT bundles run one sequence at a time (batch 1)")
        if capacity > self.max_local_len:
            raise NectarError(f"{capacity} local tokens requested but this engine holds at most {self.max_local_len}")
        t = self.torch
        self.past = [t.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype, device="cuda") for _ in range(2 * self.layers)]
        self.length = 0

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        t = self.torch
        n = ids.shape[1]
        feeds = {
            "input_ids": t.from_numpy(np.ascontiguousarray(ids, np.int64)).cuda(),
            "position_ids": t.from_numpy(np.ascontiguousarray(positions, np.int64)).cuda(),
            "attention_mask": t.ones((1, self.length + n), dtype=t.int64, device="cuda"),
        }
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = self.past[2 * i], self.past[2 * i + 1]
        outs = {"logits": t.empty((1, 1, self.vocab), dtype=t.float32, device="cuda")}
        for i in range(self.layers):
            for kind in ("key", "value"):
                outs[f"present.{i}.{kind}"] = t.empty((1, self.kv_heads, n, self.head_dim), dtype=self.kv_dtype, device="cuda")
        for name, x in feeds.items():
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        for name, x in outs.items():
            self.context.set_tensor_address(name, x.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        self.past = [t.cat([self.past[2 * i + j], outs[f"present.{i}.{kind}"]], dim=2)
                     for i in range(self.layers) for j, kind in enumerate(("key", "value"))]
        self.length += n
        return outs["logits"][:, -1].float().cpu().numpy()
