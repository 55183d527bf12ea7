"""A real SmolLM2 artifact served by the fused CUDA-graph decoder gives the same greedy tokens as
the torch path (nectar_models decoder + NectarContext), fp32 on both sides.

Needs a GPU and an artifact: NECTAR_TEST_ARTIFACT=dir (optional NECTAR_TEST_MODEL=the base model
file when the manifest's name cannot be resolved offline, NECTAR_TEST_QUESTIONS=a questions
.jsonl). benchmarks/gpu_session.sh sets them after `nectar fit --device cuda`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

ART = os.environ.get("NECTAR_TEST_ARTIFACT")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ART), reason="needs CUDA and NECTAR_TEST_ARTIFACT")

QUESTIONS = ["How do I count matching lines?", "What does the -v option do?", "How can I search recursively?",
             "Summarize the document in one sentence."]


def _greedy(backend, prompts, n=32):
    from nectar_runtime.generate import GenerationConfig, generate_ids
    from nectar_runtime.sampling import SamplingConfig

    cfg = GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=0.0))
    return np.stack(list(generate_ids(backend, prompts, cfg, eos_ids=set())), 1)  # [B, n]


def test_fused_backend_same_greedy_tokens():
    from nectar_export.pipeline import open_artifact
    from nectar_runtime.backends.cuda_graph import nectar_backend_from_artifact
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.document import local_ids

    oa = open_artifact(ART, device="cuda", model=os.environ.get("NECTAR_TEST_MODEL"))
    qpath = os.environ.get("NECTAR_TEST_QUESTIONS")
    questions = [json.loads(l)["question"] for l in open(qpath) if l.strip()][:6] if qpath else QUESTIONS
    prompts = [local_ids(oa.ctx, oa.base.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    ref = TorchBackend(oa.base.model, oa.contexts(), oa.ctx.n)
    fused = nectar_backend_from_artifact(oa)
    for p in prompts:  # one at a time: prefill then CUDA-graph decode steps
        a, b = _greedy(ref, [p]), _greedy(fused, [p])
        assert (a == b).all(), (oa.base.tokenizer.decode(a[0].tolist()), oa.base.tokenizer.decode(b[0].tolist()))
    # a left-padded batch decodes as each prompt alone
    a, b = _greedy(ref, prompts[:3], 16), _greedy(fused, prompts[:3], 16)
    assert (a == b).mean() >= 0.95
