"""The ONNX Runtime backend: a bundle's decoder graph behind the `DecoderBackend` interface.

No torch. The decode loop allocates nothing per token beyond the token itself: `reset` allocates
the past KV memory for the whole capacity once, binds a view of it, the attention-mask buffer and
the output buffers (IO binding over numpy memory), and each `step` writes the new token and
position in place, runs the graph, and copies the new tokens' keys/values (`present.*`,
[B, Hkv, T, D]) into their slots of the past buffers. Empty slots are masked out by
`attention_mask` (the graph rebuilds key positions from it).

The graph reads every bound past slot, used or not, so the bound past grows in pages of `PAGE`
slots as the tokens fill it, within the memory reserved by `reset`: a step costs what its tokens
so far cost, not what `max_new_tokens` reserved (on a 2-core CPU each unused slot of a SmolLM2
bundle cost ~6–8 µs per token, docs/benchmarks.md). A page turn, once every `PAGE` tokens,
re-lays the used slots out in place and rebinds.

Execution providers: TensorRT and CUDA are used when this onnxruntime build has them (GPU
builds: onnxruntime-gpu, JetPack), CPU otherwise; with a GPU provider the bound host buffers are
copied to the device by ORT on every run (correct, not the fastest path).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import NectarError
from .base import PAD_POSITION

PAGE = 64  # past slots are bound in multiples of this many (the last page: up to the capacity)
# The oldest onnxruntime that runs each kind of bundle (CPU builds, measured by benchmarks/ort_versions.py,
# docs/deploy.md): standard-op graphs from 1.16; quantized ones need 8-bit MatMulNBits (1.22) and 8-bit
# GatherBlockQuantized for the shared embedding (1.23).
MIN_ONNXRUNTIME = {"standard": "1.16", "quantized": "1.23"}
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def min_onnxruntime(manifest: dict) -> str:
    """The oldest onnxruntime release that runs a bundle: its manifest's `min_onnxruntime`, or (bundles
    exported before that field) what its kind needs."""
    return manifest.get("min_onnxruntime") or MIN_ONNXRUNTIME["quantized" if manifest.get("quantize") else "standard"]


def check_onnxruntime(manifest: dict, where, version: str | None = None) -> None:
    """Refuse, in one line, an onnxruntime older than the bundle needs (it would fail to load the graph
    with an error about an unknown or invalid com.microsoft node)."""
    if version is None:
        import onnxruntime as ort

        version = ort.__version__
    need = min_onnxruntime(manifest)
    if _release(version) < _release(need):
        kind = manifest.get("quantize") or manifest.get("dtype") or "this"
        way_out = (f", or export with --dtype fp32 or fp16 (standard ops: onnxruntime >= {MIN_ONNXRUNTIME['standard']})"
                   if manifest.get("quantize") else "")
        raise NectarError(f"{where}: this {kind} bundle needs onnxruntime >= {need} and this one is {version}: upgrade it "
                          f"(pip install -U onnxruntime; on Jetson the onnxruntime-gpu wheel of that release){way_out}")


def _release(version: str) -> tuple[int, int]:
    """'1.20.1' / '1.23.0.dev20250101' -> (1, 20)."""
    import re

    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def select_providers(requested: str | None = None) -> list[str]:
    """'cpu' | 'cuda' | 'tensorrt' | None (best available) -> an ORT provider list."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if requested is None:
        return [p for p in PREFERRED_PROVIDERS if p in have]
    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}.get(requested)
    if name is None:
        raise NectarError(f"provider (--provider) {requested!r}: use cpu, cuda or tensorrt")
    if name not in have:
        raise NectarError(f"provider (--provider) {requested}: this onnxruntime has only {', '.join(have)}; install onnxruntime-gpu for CUDA/TensorRT")
    return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])


# ORT session config entries added to every session (none by default). Tried for decode on a
# 2-core CPU, and not adopted: `session.dynamic_block_base` (parallel loops hand out work in
# shrinking blocks): −5 to −7% per SmolLM2 step in one state of the machine, −4% (fp32) to +3%
# (int4) in two later runs (benchmarks/ort_session_knobs.py, docs/benchmarks.md).
SESSION_CONFIG: dict[str, str] = {}


def session_options(threads: int | None, config: dict[str, str] | None = None):
    """ORT session options for a decode graph: all graph optimizations, `threads` intra-op
    threads (default: every core), sequential execution, `config` entries (default SESSION_CONFIG)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for key, value in (SESSION_CONFIG if config is None else config).items():
        so.add_session_config_entry(key, value)
    return so


class OrtBackend:
    """A `DecoderBackend` over an exported decoder graph (see nectar_export/export/decoder_graph.py)."""

    def __init__(self, session, context_len: int, max_local_len: int):
        self.session = session
        self.context_len = context_len
        self.max_local_len = max_local_len
        names = {i.name: i for i in session.get_inputs()}
        self.layers = sum(1 for n in names if n.startswith("past_key_values.") and n.endswith(".key"))
        k0 = names["past_key_values.0.key"]
        self.kv_heads, self.head_dim = int(k0.shape[1]), int(k0.shape[3])
        self.kv_dtype = _NP[k0.type]
        self.vocab = int(session.get_outputs()[0].shape[2])
        self._bind = None

    @classmethod
    def from_graph(cls, graph: str | Path, context_len: int, max_local_len: int, threads: int | None = None,
                   providers: list[str] | None = None) -> "OrtBackend":
        import onnxruntime as ort

        try:
            sess = ort.InferenceSession(str(graph), session_options(threads), providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            why = str(e).splitlines()[0]
            why = why.split(" failed:", 1)[-1].strip()  # ORT repeats the path first; keep what went wrong
            raise NectarError(f"{graph}: ONNX Runtime {ort.__version__} cannot load this graph ({why[:300]}); re-export "
                              "the bundle with this nectar") from None
        return cls(sess, context_len, max_local_len)

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None, provider: str | None = None) -> "OrtBackend":
        check_onnxruntime(bundle.manifest, bundle.path)
        return cls.from_graph(bundle.graph_path, bundle.context_len, bundle.max_local_len, threads, select_providers(provider))

    # ------------------------------------------------------------------ DecoderBackend
    def reset(self, batch: int, capacity: int) -> None:
        """Reserve the memory of one generation, past KV [B, Hkv, capacity, D] per layer, and bind
        its first page."""
        if capacity > self.max_local_len:
            raise NectarError(f"{capacity} local tokens requested but this bundle holds at most {self.max_local_len}")
        b, h, d = batch, self.kv_heads, self.head_dim
        self.batch, self.capacity, self.length = b, capacity, 0
        self._memory = [np.zeros(b * h * capacity * d, self.kv_dtype) for _ in range(2 * self.layers)]
        # decode-step buffers: ids, positions, outputs, and (per bound size) the mask, whose first
        # `bound` columns say which past slots hold a real token, the last one the new token
        self.d_ids = np.zeros((b, 1), np.int64)
        self.d_pos = np.zeros((b, 1), np.int64)
        self.d_real = np.zeros((b, 1), np.bool_)
        self.d_logits = np.zeros((b, 1, self.vocab), np.float32)
        self.d_present = [np.zeros((b, h, 1, d), self.kv_dtype) for _ in range(2 * self.layers)]
        self.bound = 0
        self._bind_past(min(capacity, PAGE))

    def _bind_past(self, bound: int) -> None:
        """Bind `bound` past slots: views [B, Hkv, bound, D] of the reserved memory, the used slots
        moved to their place in the larger view (in place: the tail first), and the mask widened."""
        import onnxruntime as ort

        b, h, d, old = self.batch, self.kv_heads, self.head_dim, self.bound
        self.past = [m[: b * h * bound * d].reshape(b, h, bound, d) for m in self._memory]
        if old:
            for m, view in zip(self._memory, self.past):
                prev = m[: b * h * old * d].reshape(b, h, old, d)
                for r in reversed(range(b * h)):  # a row's new start is at or after its old one: move the last first
                    view[r // h, r % h, :old] = prev[r // h, r % h]
                    view[r // h, r % h, old:] = 0
        mask = np.zeros((b, bound + 1), np.int64)
        if old:
            mask[:, :old] = self.d_mask[:, :old]
        self.d_mask, self.bound = mask, bound
        io = self.session.io_binding()
        ov = ort.OrtValue.ortvalue_from_numpy
        self._keep = []  # the OrtValues must outlive the binding

        def bind_in(name, arr):
            v = ov(arr)
            self._keep.append(v)
            io.bind_ortvalue_input(name, v)

        def bind_out(name, arr):
            v = ov(arr)
            self._keep.append(v)
            io.bind_ortvalue_output(name, v)

        bind_in("input_ids", self.d_ids)
        bind_in("position_ids", self.d_pos)
        bind_in("attention_mask", self.d_mask)
        bind_out("logits", self.d_logits)
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                bind_in(f"past_key_values.{i}.{kind}", self.past[2 * i + j])
                bind_out(f"present.{i}.{kind}", self.d_present[2 * i + j])
        self._bind = io

    def _make_room(self, t: int) -> None:
        """Bind enough pages for `t` more tokens (they are written after the run)."""
        need = self.length + t
        if need > self.capacity:
            raise NectarError(f"local tokens exceed the capacity of {self.capacity} given to reset()")
        if need > self.bound:
            self._bind_past(min(self.capacity, -(-need // PAGE) * PAGE))

    def step(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """ids, positions: [B, T] (PAD_POSITION = padding) -> last-token logits [B, V] (a view of
        the bound output buffer, valid until the next step)."""
        if self._bind is None:
            raise RuntimeError("reset() first")
        b, t = ids.shape
        self._make_room(t)
        if t == 1:  # the decode loop: in-place writes into bound buffers, no allocation
            np.copyto(self.d_ids, ids)
            np.not_equal(positions, PAD_POSITION, out=self.d_real)
            np.maximum(positions, 0, out=self.d_pos)
            self.d_mask[:, self.bound] = self.d_real[:, 0]
            self.session.run_with_iobinding(self._bind)
            for buf, new in zip(self.past, self.d_present):
                buf[:, :, self.length] = new[:, :, 0]
            self.d_mask[:, self.length] = self.d_real[:, 0]
            self.length += 1
            return self.d_logits[:, -1]
        real = (positions != PAD_POSITION).astype(np.int64)
        presents, logits = self._run_prefill(ids, np.where(real == 1, positions, 0), real)
        s = slice(self.length, self.length + t)
        for buf, new in zip(self.past, presents):
            buf[:, :, s] = new
        self.d_mask[:, s] = real
        self.length += t
        return logits[:, -1]

    def _run_prefill(self, ids, pos, real):
        """A multi-token step (the prompt): bound like a decode step, with T-sized inputs/outputs."""
        import onnxruntime as ort

        b, t = ids.shape
        io = self.session.io_binding()
        ov = ort.OrtValue.ortvalue_from_numpy
        mask = np.concatenate([self.d_mask[:, : self.bound], real], axis=1)
        keep = [ov(np.ascontiguousarray(ids, np.int64)), ov(np.ascontiguousarray(pos, np.int64)), ov(mask)]
        for name, v in zip(("input_ids", "position_ids", "attention_mask"), keep):
            io.bind_ortvalue_input(name, v)
        logits = np.zeros((b, 1, self.vocab), np.float32)
        presents = [np.zeros((b, self.kv_heads, t, self.head_dim), self.kv_dtype) for _ in range(2 * self.layers)]
        outs = [ov(logits)] + [ov(p) for p in presents]
        io.bind_ortvalue_output("logits", outs[0])
        pasts = [ov(p) for p in self.past]
        for i in range(self.layers):
            for j, kind in enumerate(("key", "value")):
                io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", pasts[2 * i + j])
                io.bind_ortvalue_output(f"present.{i}.{kind}", outs[1 + 2 * i + j])
        self.session.run_with_iobinding(io)
        del keep, pasts  # the OrtValues lived through the run
        return presents, logits
