"""The TensorRT backend: a bundle's engine.plan behind the `DecoderBackend` interface.

Needs tensorrt (>= 10.6) and torch with CUDA on the device (torch holds the device buffers and
runs the plugin's Triton kernel, so triton too); the ONNX Runtime backend stays the torch-free
path. One sequence (batch 1); past keys/values hold exactly the local tokens so far (the engine's
NectarAttention nodes take the cache as one contiguous block). Prompts longer than the engine's
largest call (its optimization profile, 64 tokens) go in chunks of 64, 32, ..., 1 tokens, so the
Triton kernel compiles for at most 7 token counts.

NOT RUN IN THIS REPOSITORY'S CI (TensorRT cannot be installed there); see docs/deploy.md.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from ..errors import NectarError


class TrtBackend:
    def __init__(self, engine, context_len: int, max_local_len: int, keep=()):
        import tensorrt as trt
        import torch

        self.torch, self.engine, self._keep = torch, engine, keep  # keep: the runtime and logger outlive the engine
        self.context = engine.create_execution_context()
        self.context_len, self.max_local_len = context_len, max_local_len
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        if "logits" not in self.outputs or not self.past_names:
            raise NectarError("this engine.plan is not a Nectar decoder (no logits / past_key_values); rebuild it with `nectar export --format trt`")
        types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64}
        self.dtypes = {n: types[engine.get_tensor_dtype(n)] for n in names}
        _, self.kv_heads, _, self.head_dim = engine.get_tensor_shape(self.past_names[0])
        self.chunk = engine.get_tensor_profile_shape("input_ids", 0)[2][1]  # most new tokens a call
        self.stream = torch.cuda.Stream()  # TensorRT syncs extra on the legacy default stream
        self.dummy = torch.empty(256, dtype=torch.uint8, device="cuda")  # address for empty tensors (must be non-null)

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
        if importlib.util.find_spec("triton") is None or importlib.util.find_spec("tensorrt.plugin") is None:
            raise NectarError(f"{bundle.path}: the NectarAttention plugin needs TensorRT >= 10.6 (found {trt.__version__}) and triton")
        import nectar_kernels.trt_plugin  # noqa: F401  (registers the plugin before deserializing)

        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(bundle.graph_path.read_bytes())
        if engine is None:
            raise NectarError(f"{bundle.graph_path}: TensorRT {trt.__version__} cannot load this engine (built for another GPU "
                              "or TensorRT version?); rebuild it on this device with `nectar export --format trt`")
        return cls(engine, bundle.context_len, bundle.max_local_len, keep=(logger, runtime))

    def reset(self, batch: int, capacity: int) -> None:
        if batch != 1:
            raise NectarError("TensorRT bundles run one sequence at a time (batch 1)")
        if capacity > self.max_local_len:
            raise NectarError(f"{capacity} local tokens requested but this engine holds at most {self.max_local_len}")
        t = self.torch
        self.past = {n: t.empty((1, self.kv_heads, 0, self.head_dim), dtype=self.dtypes[n], device="cuda") for n in self.past_names}
        self.length = 0

    def _bind(self, name: str, x) -> None:
        self.context.set_tensor_address(name, x.data_ptr() if x.numel() else self.dummy.data_ptr())

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n, i = ids.shape[1], 0
        if self.length + n > self.max_local_len:
            raise NectarError(f"{self.length + n} local tokens but this engine holds at most {self.max_local_len}")
        with self.torch.cuda.stream(self.stream):
            while i < n:  # chunks of self.chunk tokens, then powers of two
                c = self.chunk if n - i >= self.chunk else 1 << ((n - i).bit_length() - 1)
                logits = self._run(ids[:, i:i + c], positions[:, i:i + c])
                i += c
            return logits[:, -1].float().cpu().numpy()  # .cpu() waits for the stream

    def _run(self, ids: np.ndarray, positions: np.ndarray):
        t = self.torch
        n = ids.shape[1]
        feeds = {
            "input_ids": t.from_numpy(np.ascontiguousarray(ids, np.int64)).cuda(),
            "position_ids": t.from_numpy(np.ascontiguousarray(positions, np.int64)).cuda(),
            "attention_mask": t.ones((1, self.length + n), dtype=t.int64, device="cuda"),
            **self.past,
        }
        for name, x in feeds.items():
            if not self.context.set_input_shape(name, tuple(x.shape)):
                raise NectarError(f"TensorRT refused shape {tuple(x.shape)} for {name} (outside the engine's profile)")
            self._bind(name, x)
        outs = {}
        for name in self.outputs:  # output shapes follow from the input shapes just set
            outs[name] = t.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self._bind(name, outs[name])
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise NectarError("TensorRT execution failed (see its log above)")
        for name in self.past_names:  # present.* hold this call's tokens only
            self.past[name] = t.cat([self.past[name], outs[name.replace("past_key_values", "present")]], dim=2)
        self.length += n
        return outs["logits"]
