"""Per-token decode latency of Nectar and of full attention, both through the same fused step
(runtime/backends/cuda_graph.py): median and p90 over timed steps after warm-up (CUDA events
around each CUDA-graph replay on GPU, a host clock on CPU), tokens/s, peak memory, and the
bandwidth floor = bytes a step must move / the device's measured copy bandwidth.

Backends are a name -> factory map (`BACKENDS`); a factory takes the ProfileConfig and returns
a runner with `device_name()`, `bandwidth()`, `measure(method, batch, n) -> record`, `notes`.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from nectar_runtime.errors import NectarError
from nectar_runtime.files import write_text_atomic

from .memory import peak_rss, reset_peak_rss
from .shapes import SHAPES, ProfileConfig

if TYPE_CHECKING:
    from nectar_runtime.backends.cuda_graph import StepOptions  # imports torch: only where used

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _ort_backend(cfg: ProfileConfig):
    from .ort_runner import OrtRunner  # numpy + onnxruntime only

    return OrtRunner(cfg)


class TorchRunner:
    """The fused torch step (CUDA graph on GPU) at one model shape; weights built once.
    step_options: the step's StepOptions (None: from the NECTAR_* environment variables)."""

    def __init__(self, cfg: ProfileConfig, step_options: StepOptions | None = None):
        import torch

        from nectar_kernels.weights import random_layer
        from nectar_runtime.backends.cuda_graph import FusedDecoder, StepOptions
        from nectar_runtime.backends.torch_backend import resolve_device

        options = StepOptions.from_env() if step_options is None else step_options

        self.torch, self.cfg = torch, cfg
        self.device = torch.device(resolve_device(cfg.device))
        self.cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, TORCH_DTYPES[cfg.dtype])
        torch.manual_seed(0)
        if cfg.model:
            from nectar_models.loading import load_model
            from nectar_runtime.hub import resolve_model

            lm = load_model(resolve_model(cfg.model, pull_missing=True), dtype=self.dtype, device=str(self.device))
            self.model_cfg, self.shape = lm.config, cfg.model
            self.dec = FusedDecoder.from_decoder(lm.model, options)
            self.notes = f"real weights of {cfg.model}; synthetic (random) document KV, local KV and Nectar heads"
        else:
            from nectar_models.config import ModelConfig, RopeConfig

            kw = dict(SHAPES[cfg.shape])
            kw["rope"] = RopeConfig(**kw["rope"]) if "rope" in kw else RopeConfig()
            self.model_cfg = ModelConfig(family="llama", max_position=1 << 24, name=cfg.shape, **kw)
            self.shape = cfg.shape
            self.dec = FusedDecoder.random(self.model_cfg, self.dtype, self.device, options=options)
            self.notes = (f"random weights of the {cfg.shape} shape; synthetic (random) document KV, local KV "
                          f"and Nectar heads: latency only, no meaningful text")
        c = self.model_cfg
        # Nectar heads: fp32 weights on CPU (its reference path), the model dtype on GPU.
        wdt = self.dtype if self.cuda else torch.float32
        self.packed = [random_layer(cfg.variant, cfg.width, c.num_kv_heads, c.head_dim, dtype=wdt, device=self.device,
                                    seed=l) + (cfg.variant, cfg.width) for l in range(c.num_layers)]
        self._doc = (0, None, None)
        self._bw = None

    # ------------------------------------------------------------------ device facts
    def device_name(self) -> str:
        if self.cuda:
            return self.torch.cuda.get_device_name(self.device)
        return f"{platform.processor() or platform.machine()} CPU, {self.torch.get_num_threads()} threads"

    def bandwidth(self) -> float:
        """Bytes/s of a large device-to-device copy (bytes read + bytes written)."""
        if self._bw is None:
            torch = self.torch
            nbytes = (1 << 30) if self.cuda else (1 << 27)
            x = torch.randn(nbytes // 4, device=self.device)
            y = torch.empty_like(x)
            y.copy_(x)
            times = []
            for _ in range(10):
                t = self._timer()
                y.copy_(x)
                times.append(t())
            self._bw = 2 * nbytes / (statistics.median(times) / 1e3)
            del x, y
        return self._bw

    def _timer(self):
        """Start timing now; the returned function gives elapsed milliseconds."""
        torch = self.torch
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()

            def stop():
                b.record()
                b.synchronize()
                return a.elapsed_time(b)

            return stop
        t0 = time.perf_counter()
        return lambda: (time.perf_counter() - t0) * 1e3

    # ------------------------------------------------------------------ one point
    def _document(self, n: int):
        """Synthetic post-RoPE document KV, [1, Hkv, n, D] per layer, kept while n is unchanged."""
        if self._doc[0] != n:
            self._doc = (0, None, None)
            if self.cuda:
                self.torch.cuda.empty_cache()
            c = self.model_cfg
            shape = (1, c.num_kv_heads, n, c.head_dim)
            ks = [self.torch.randn(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]
            vs = [self.torch.randn(shape, device=self.device, dtype=self.dtype) for _ in range(c.num_layers)]
            self._doc = (n, ks, vs)
        return self._doc[1], self._doc[2]

    def step_bytes(self, method: str, batch: int, n: int) -> int:
        """Bytes one decode step must move at least: every weight once (one embedding row per
        sequence), the document part once (KV shared by the batch, or the heads), the local KV."""
        dec, c = self.dec, self.model_cfg
        el = dec.embed.element_size()
        w = sum(t.numel() * t.element_size() for lw in dec.layers
                for t in (lw.ln1, lw.wqkv, lw.wo, lw.ln2, lw.wgu, lw.wd))
        w += dec.lm_head.numel() * el + batch * c.hidden_size * el
        local = 2 * c.num_layers * batch * c.num_kv_heads * (self.cfg.local_len + 1) * c.head_dim * el
        if method == "full":
            doc = 2 * c.num_layers * c.num_kv_heads * n * c.head_dim * el
        else:
            doc = sum(hw.numel() * hw.element_size() + hb.numel() * hb.element_size() for hw, hb, _, _ in self.packed)
        return w + doc + local

    def measure(self, method: str, batch: int, n: int) -> dict:
        torch, cfg, dec, c = self.torch, self.cfg, self.dec, self.model_cfg
        from nectar_runtime.backends.cuda_graph import GraphedStep

        if method == "full":
            ks, vs = self._document(n)
            dec.set_full_document(ks, vs, n)
        else:
            dec.set_nectar_document(self.packed, n)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()  # this point's peak, not the run's so far
        st = dec.new_state(batch, cfg.local_len + 1)
        st.k.normal_()
        st.v.normal_()
        st.slot.fill_(cfg.local_len)  # every step writes the same slot: constant work per step
        st.kv_len.fill_(cfg.local_len + 1)
        ids = torch.randint(0, c.vocab_size, (batch, 1), device=self.device)
        pos = torch.full((batch, 1), n + cfg.local_len, device=self.device)
        times = []
        with torch.inference_mode():
            if self.cuda:
                step = GraphedStep(dec, st)
                step(ids, pos)
                for _ in range(cfg.warmup):
                    step()
                for _ in range(cfg.steps):
                    t = self._timer()
                    step()
                    times.append(t())
                peak = torch.cuda.max_memory_allocated(self.device)
                del step
            else:
                for i in range(cfg.warmup + cfg.steps):
                    t = self._timer()
                    dec.forward(ids, pos, st)
                    if i >= cfg.warmup:
                        times.append(t())
                peak = peak_rss()
        del st
        times.sort()
        med = statistics.median(times)
        nbytes = self.step_bytes(method, batch, n)
        return {
            "method": method, "backend": "torch", "device": self.device_name(), "dtype": cfg.dtype,
            "shape": self.shape, "batch": batch, "n": n, "local_len": cfg.local_len,
            "latency_ms_median": round(med, 4), "latency_ms_p90": round(times[int(0.9 * (len(times) - 1))], 4),
            "tokens_per_s": round(batch * 1e3 / med, 1), "peak_mem_bytes": int(peak),
            "floor_ms": round(nbytes / self.bandwidth() * 1e3, 4), "bytes_per_step": nbytes,
            "variant": cfg.variant if method == "nectar" else None, "width": cfg.width if method == "nectar" else None,
            "cuda_graph": self.cuda, "steps": cfg.steps, "synthetic": not cfg.model,
        }


BACKENDS = {"torch": TorchRunner, "ort": _ort_backend}


def run_profile(cfg: ProfileConfig, json_out: str | Path, plot_out: str | Path | None = None, log=print) -> dict:
    factory = BACKENDS.get(cfg.backend)
    if factory is None:
        raise NectarError(f"--backend {cfg.backend!r}: use one of {', '.join(BACKENDS)}")
    runner = factory(cfg)
    log(f"[nectar profile] {runner.device_name()}; {runner.notes}")
    log(f"[nectar profile] measured copy bandwidth {runner.bandwidth() / 1e9:.0f} GB/s")
    records = []
    log(f"{'method':7s} {'batch':>5s} {'n':>7s} {'median ms':>10s} {'p90 ms':>8s} {'floor ms':>8s} {'tok/s':>9s} {'peak MiB':>9s}")
    # a runner may decide its own points (the ORT runner: one per bundle and batch size)
    points = runner.points() if hasattr(runner, "points") else [(m, b, n) for n in cfg.n for b in cfg.batch for m in cfg.methods]
    for point in points:
        method, batch, n = point[:3]
        r = runner.measure(*point)
        records.append(r)
        log(f"{method:7s} {batch:5d} {n:7d} {r['latency_ms_median']:10.3f} {r['latency_ms_p90']:8.3f} "
            f"{r['floor_ms']:8.3f} {r['tokens_per_s']:9.1f} {r['peak_mem_bytes'] / 2**20:9.0f}"
            + (f"  {Path(r['bundle']).name} ({r['dtype']})" if r.get("bundle") else ""))
    out = {"meta": {"device": runner.device_name(), "backend": cfg.backend, "bandwidth_bytes_per_s": runner.bandwidth(),
                    "notes": runner.notes, "command": "nectar " + " ".join(sys.argv[1:]) if sys.argv else "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
           "records": records}
    write_text_atomic(json_out, json.dumps(out, indent=1) + "\n", "--json records")
    if plot_out:  # bundles carry their own model and dtype (in each series' label)
        title = runner.device_name() if cfg.backend == "ort" else f"{runner.shape}, {cfg.dtype}, {runner.device_name()}"
        plot_records(records, plot_out, title=title)
    return out


def series_key(r: dict) -> tuple:
    """What one plotted line is: a bundle (its own model, dtype and n) and batch, or a synthetic (method, batch)."""
    return (r.get("bundle") or "", r["method"], r["batch"])


def series_label(r: dict) -> str:
    if r.get("bundle"):
        return f"{Path(r['bundle']).name}: {r['shape']}, {r['dtype']}, {r['method']}, batch {r['batch']}"
    return f"{r['method']}, batch {r['batch']}"


def plot_records(records: list[dict], out: str | Path, title: str = "") -> None:
    """Latency vs n (log x), a line per series (`series_key`), the bandwidth floor dashed, with a bar
    marker at each point so that a series of one point (a bundle: one n) shows its floor too."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NectarError("--plot needs matplotlib (pip install matplotlib)") from None
    shapes = sorted({r["shape"] for r in records}) if not any(r.get("bundle") for r in records) else [None]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in records if shape is None or r["shape"] == shape]
        for key in sorted({series_key(r) for r in rs}):
            series = sorted((r for r in rs if series_key(r) == key), key=lambda r: r["n"])
            ns = [r["n"] for r in series]
            line, = ax.plot(ns, [r["latency_ms_median"] for r in series], marker="o", label=series_label(series[0]))
            ax.plot(ns, [r["floor_ms"] for r in series], ls="--", marker="_", markersize=14, color=line.get_color(),
                    alpha=0.6)
        ax.plot([], [], ls="--", marker="_", color="gray", label="bandwidth floor (same colour)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens n")
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title(f"{shape}: {title}" if shape is not None and len(shapes) > 1 else title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
