"""`nectar profile --backend ort --bundle B [--bundle B2 ...]`: decode latency of exported bundles
on ONNX Runtime, as deployed — no torch needed (numpy + onnxruntime + the bundle).

Each bundle brings its own method (nectar | full), document length n and dtype; the document is
the real one and the weights are the bundle's. Per batch size: `local_len` random local tokens are
prefilled, then `warmup` + `steps` single-token decode steps are timed one by one (wall clock;
the ORT call is synchronous on CPU). The floor is the bytes a step must read (every initializer
a decode step touches — an embedding table used only by the token lookup counts one row — plus
the past KV) over the copy bandwidth measured with numpy.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from nectar_runtime.errors import NectarError

from .memory import can_reset_peak_rss, peak_rss, reset_peak_rss


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The vector extensions that decide CPU matmul speed here, e.g. "avx512_bf16" or "avx2" (from
    /proc/cpuinfo; "" elsewhere): "AMD EPYC" alone names machines of very different speed."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return ""
    for isa in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
        if isa in flags:
            return isa
    return "sse"


def step_weight_bytes(graph: Path, manifest: dict) -> int:
    """Bytes of the initializers a decode step reads: all of them, except a table consumed only
    by Gather (the token embedding of a bundle whose LM head has its own quantized copy).
    Without the onnx package (a runtime-only install): the weight file's size, less the fp32
    embedding table of a quantized bundle."""
    try:
        import onnx
    except ImportError:
        size = (graph.parent / manifest["graph"]["weights"]).stat().st_size
        m = manifest["model"]
        if manifest.get("quantize") and m.get("hidden_size"):
            size -= m["vocab_size"] * m["hidden_size"] * 4
        return size

    m = onnx.load(str(graph), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in m.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    total = 0
    for t in m.graph.initializer:
        size = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        if users.get(t.name) == {"Gather"} and len(t.dims) == 2:
            size = size // max(1, min(t.dims))  # one row (or column) per token
        total += size
    return total


def bundle_model(manifest: dict) -> str:
    """The model a bundle was exported from, as records and plots name it."""
    return str(manifest["base_model"].get("name", manifest["model"]["family"]))


class OrtRunner:
    """The runner `nectar profile` drives for --backend ort (see profiling/profile.py)."""

    def __init__(self, cfg):
        from nectar_runtime.bundle import read_bundle

        if not cfg.bundles:
            raise NectarError("--backend ort profiles exported bundles: give --bundle DIR (repeatable; `nectar export` writes them)")
        if cfg.device != "cpu":
            raise NectarError("--backend ort runs on the CPU provider here; GPU timing uses --backend torch")
        self.cfg = cfg
        self.threads = cfg.threads or os.cpu_count() or 1
        self.bundles = []
        for path in cfg.bundles:
            b = read_bundle(path)
            if b.format != "onnx":
                raise NectarError(f"{path}: a {b.format} bundle; --backend ort takes ONNX bundles")
            self.bundles.append((b, step_weight_bytes(b.graph_path, b.manifest)))
        m = self.bundles[0][0].manifest
        self.shape = bundle_model(m)
        self.notes = (f"real weights and documents from {len(self.bundles)} bundle(s); onnxruntime CPU provider, "
                      f"{self.threads} threads; each bundle loaded once, alone, for all its batch sizes; peak memory "
                      + ("counted from its load" if can_reset_peak_rss() else "of the whole process (no per-bundle reset here)"))
        self._bw = None
        self._loaded: tuple[int, object] | None = None  # (bundle index, its OrtBackend)

    def _backend(self, index: int):
        """The session of bundle `index`, loaded once for all its points (points() lists a bundle's
        batch sizes together); one bundle's session in memory at a time."""
        if self._loaded is None or self._loaded[0] != index:
            from nectar_runtime.backends.ort_backend import OrtBackend

            self._loaded = None  # drop the previous bundle's session before loading the next
            reset_peak_rss()  # the peak of this bundle's points: the process with its session alone
            self._loaded = (index, OrtBackend.from_bundle(self.bundles[index][0], threads=self.threads, provider="cpu"))
        return self._loaded[1]

    def device_name(self) -> str:
        return f"cpu: {cpu_name()} ({self.threads} threads)"

    def bandwidth(self) -> float:
        """Copy bandwidth (bytes read + written per second) of a 256 MiB numpy copy, best of 5."""
        if self._bw is None:
            src = np.ones(1 << 25, np.float64)
            dst = np.empty_like(src)
            best = min(self._timed_copy(src, dst) for _ in range(5))
            self._bw = 2 * src.nbytes / best
        return self._bw

    @staticmethod
    def _timed_copy(src, dst) -> float:
        t = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t

    def points(self) -> list[tuple[str, int, int, int]]:
        """(method, batch, n, bundle index) per bundle and batch size: what this runner measures (two
        bundles of one method and n, e.g. fp32 and int4, are two points)."""
        return [(b.manifest["method"], batch, b.context_len, i) for i, (b, _) in enumerate(self.bundles) for batch in self.cfg.batch]

    def measure(self, method: str, batch: int, n: int, index: int | None = None) -> dict:
        if index is None:  # the first bundle of this method and n
            index = next(i for i, x in enumerate(self.bundles) if x[0].manifest["method"] == method and x[0].context_len == n)
        b, wbytes = self.bundles[index]
        cfg = self.cfg
        be = self._backend(index)
        rng = np.random.default_rng(0)
        be.reset(batch, cfg.local_len + cfg.warmup + cfg.steps + 1)
        vocab = b.manifest["model"]["vocab_size"]
        ids = rng.integers(0, vocab, (batch, cfg.local_len))
        be.step(ids, n + np.tile(np.arange(cfg.local_len), (batch, 1)))
        tok = np.full((batch, 1), 5, np.int64)
        times = []
        for i in range(cfg.warmup + cfg.steps):
            pos = np.full((batch, 1), n + cfg.local_len + i, np.int64)
            t = time.perf_counter()
            be.step(tok, pos)
            if i >= cfg.warmup:
                times.append(1e3 * (time.perf_counter() - t))
        times.sort()
        peak = peak_rss()
        med = statistics.median(times)
        m = b.manifest["model"]
        kv_item = 2 if b.manifest["dtype"] == "fp16" else 4
        local_kv = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * kv_item * batch * (cfg.local_len + cfg.steps // 2)
        nbytes = wbytes + local_kv
        return {
            "method": method, "backend": "ort", "device": self.device_name(),
            "dtype": b.manifest["quantize"] or b.manifest["dtype"], "shape": bundle_model(b.manifest), "batch": batch, "n": n,
            "local_len": cfg.local_len, "latency_ms_median": round(med, 4),
            "latency_ms_p90": round(times[int(0.9 * (len(times) - 1))], 4), "tokens_per_s": round(batch * 1e3 / med, 1),
            "peak_mem_bytes": peak, "floor_ms": round(nbytes / self.bandwidth() * 1e3, 4), "bytes_per_step": nbytes,
            "bundle": str(b.path), "steps": cfg.steps, "synthetic": False,
        }
