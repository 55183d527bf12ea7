"""An artifact with retained heads on CUDA: the fused CUDA-graph step against the torch backend.

    python benchmarks/retained_gpu_step.py ART --questions Q.jsonl [--count 3] [--tokens 64] [--json OUT.json]

For each of the first `count` questions, greedy generation of `tokens` tokens on both backends (same
prompt, the artifact's model in fp32 and bf16): identical tokens or not, the largest logit difference
relative to the logits' range (teacher-forced on the torch backend's tokens is not needed: the runs are
compared only up to their first differing token), and the wall time per generated token after a warm-up
question (CUDA synchronized; includes each question's short prefill).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from nectar_export.pipeline import artifact_backend, open_artifact
from nectar_runtime.backends.torch_backend import TorchBackend
from nectar_runtime.document import local_ids
from nectar_runtime.generate import GenerationConfig, generate_ids
from nectar_runtime.sampling import SamplingConfig


def run(backend, prompt: list[int], tokens: int) -> tuple[list[int], list[np.ndarray], float]:
    """(greedy tokens, per-step logits, seconds) for one prompt."""
    logits, step = [], backend.step

    def spy(ids, pos):
        out = step(ids, pos)
        logits.append(np.array(out, dtype=np.float32))
        return out

    backend.step = spy
    cfg = GenerationConfig(max_new_tokens=tokens, sampling=SamplingConfig(temperature=0.0))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = [int(x[0]) for x in generate_ids(backend, [prompt], cfg, eos_ids=set())]
    sync()
    backend.step = step
    return out, logits, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--questions", required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (cpu only checks this script: both backends are torch there)")
    a = ap.parse_args(argv)
    qs = [json.loads(x)["question"] for x in Path(a.questions).read_text().splitlines() if x.strip()][: a.count + 1]
    oa = open_artifact(a.artifact, a.device)
    report = {"artifact": a.artifact, "retained": None if oa.retained is None else
              {"heads": len(oa.retained.modules), "tokens": oa.retained.length}, "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu", "runs": []}
    for dtype in (torch.float32, torch.bfloat16):
        oa.base.model.to(dtype)
        fused, plain = artifact_backend(oa), TorchBackend(oa.base.model, oa.contexts(), oa.ctx.n)
        if a.device == "cuda" and type(fused).__name__ != "CudaGraphBackend":
            raise SystemExit(f"the fused step did not serve the artifact ({type(fused).__name__})")
        times = {"fused": 0.0, "torch": 0.0}
        for i, q in enumerate(qs):
            prompt = local_ids(oa.ctx, oa.base.tokenizer, [{"role": "user", "content": q}])
            tf, lf, sf = run(fused, prompt, a.tokens)
            tt, lt, st = run(plain, prompt, a.tokens)
            if i == 0:
                continue  # warm-up: CUDA graph capture, Triton compilation
            times["fused"] += sf
            times["torch"] += st
            same = next((k for k, (x, y) in enumerate(zip(tf, tt)) if x != y), len(tf))
            rel = max(float(np.abs(x - y).max() / (np.abs(y).max() + 1e-9)) for x, y in list(zip(lf, lt))[: same + 1])
            report["runs"].append({"dtype": str(dtype).split(".")[-1], "question": q, "identical_tokens": same == len(tf),
                                   "first_difference": same, "max_rel_logit_diff_to_it": rel})
            print(f"{str(dtype):16s} identical={same == len(tf)} first_diff={same} max|Δlogit|/max|logit|={rel:.2e}  {q[:50]}")
        n = a.tokens * (len(qs) - 1)
        report[f"ms_per_token_{str(dtype).split('.')[-1]}"] = {k: 1e3 * v / n for k, v in times.items()}
        print(f"{str(dtype):16s} ms per generated token (with prefill): fused {1e3 * times['fused'] / n:.2f}, torch {1e3 * times['torch'] / n:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
