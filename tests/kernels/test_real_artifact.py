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


def _cli(capsys, *argv) -> tuple[str, str]:
    from nectar_runtime.cli import main

    assert main(list(argv)) == 0
    r = capsys.readouterr()
    return r.out, r.err


def test_cli_ask_and_generate_use_the_cuda_graph_step_with_torch_tokens(capsys, monkeypatch):
    """`nectar ask ART --device cuda` and `nectar generate --artifact ART --device cuda` run on
    the CUDA-graph fused step, and print the text the torch backend prints (greedy, 32 tokens)."""
    from nectar_export.pipeline import open_artifact_session
    from nectar_runtime.backends.cuda_graph import CudaGraphBackend

    model = os.environ.get("NECTAR_TEST_MODEL")
    over = ["--model", model] if model else []
    assert isinstance(open_artifact_session(ART, device="cuda", model=model).backend, CudaGraphBackend)
    opts = ["--device", "cuda", "--max-new-tokens", "32", "--temperature", "0"]
    for q in QUESTIONS[:2]:
        monkeypatch.delenv("NECTAR_BACKEND", raising=False)
        fused_ask, err = _cli(capsys, "ask", ART, q, *opts, *over)
        assert "falling back" not in err
        fused_gen, _ = _cli(capsys, "generate", "--artifact", ART, q, *opts)
        monkeypatch.setenv("NECTAR_BACKEND", "torch")
        torch_ask, err = _cli(capsys, "ask", ART, q, *opts, *over)
        assert "falling back to the torch backend" in err
        assert fused_ask.strip() and fused_ask == torch_ask == fused_gen, (fused_ask, torch_ask, fused_gen)
