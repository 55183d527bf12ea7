"""Where the probe stage's generation time goes on a GPU: batches of 16 greedy 96-token answers
after a 4,032-token document, SmolLM2-135M shape with random weights (no EOS, so every step
runs), fp32 like `nectar fit`. Per decode step: backend.step (graph replay + logits to host) and
the sampler, for the fused CUDA-graph backend and the eager torch backend.

    python benchmarks/probe_gen.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=3)
    nb = ap.parse_args().batches
    from nectar_export.answering import answer_backend
    from nectar_models.config import ModelConfig, RopeConfig
    from nectar_models.llama import Decoder
    from nectar_profiling.shapes import SHAPES
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.generate import GenerationConfig, generate_ids
    from nectar_runtime.sampling import SamplingConfig

    kw = dict(SHAPES["smollm2-135m"])
    kw["rope"] = RopeConfig(**kw["rope"])
    cfg = ModelConfig(family="llama", max_position=8192, name="smollm2-135m", **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Decoder(cfg).eval()
    n = 4032
    contexts = model.prefill_document(torch.randint(0, cfg.vocab_size, (1, n), device="cuda")).contexts()
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, cfg.vocab_size, int(rng.integers(20, 45))).tolist() for _ in range(16)] for _ in range(nb)]
    gen = GenerationConfig(96, SamplingConfig())
    for name, backend in (("fused", answer_backend(model, contexts, n)), ("torch", TorchBackend(model, contexts, n))):
        step, times = backend.step, []

        def timed(ids, pos):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step(ids, pos)
            times.append((ids.shape[1], time.perf_counter() - t0))
            return out

        backend.step = timed
        for i, prompts in enumerate(batches):
            times.clear()
            t0 = time.perf_counter()
            for _ in generate_ids(backend, prompts, gen, set()):
                pass
            total = time.perf_counter() - t0
            dec = [t for w, t in times if w == 1]
            pre = sum(t for w, t in times if w > 1)
            print(f"{name} batch {i}: {total:.2f} s total, prefill {pre * 1e3:.1f} ms, {len(dec)} decode steps, "
                  f"median {statistics.median(dec) * 1e3:.2f} ms, max {max(dec) * 1e3:.1f} ms; "
                  f"host rest {(total - pre - sum(dec)) * 1e3:.0f} ms", flush=True)
        backend.step = step
    be = answer_backend(model, contexts, n)
    list(generate_ids(be, batches[0], GenerationConfig(4, SamplingConfig()), set()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in generate_ids(be, batches[0], GenerationConfig(4, SamplingConfig()), set()):
            pass
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
