"""Answer questions about a document with any context part (exact KV, Nectar, none, a cache subset).

`contexts` is the per-layer list a KVCache carries: what stands for the document in each layer.
Generation is batched (left padding): on a CPU a batch of 8 costs little more than one sequence.
"""

from __future__ import annotations

import numpy as np

from nectar_runtime.backends.torch_backend import TorchBackend
from nectar_runtime.generate import GenerationConfig, generate_ids

from nectar_runtime.document import DocumentContext, local_ids


def answer_backend(model, contexts: list | None, context_len: int):
    """The backend to answer with: for the exact document on CUDA, the fused CUDA-graph step
    (runtime/backends/cuda_graph.py: the document KV read by split-KV flash decoding, one graph
    replay per token, ~10x the eager decoder; its StepOptions from the NECTAR_* environment
    variables); otherwise the torch decoder. Both compute the same attention; greedy tokens can
    differ only where fp32 rounding flips a near tie."""
    from nectar_models.attention import ExactContextAttention
    from nectar_runtime.backends.fast_path import fused_unavailable

    exact = bool(contexts) and all(isinstance(c, ExactContextAttention) and not c.window and c.k.shape[0] == 1
                                   for c in contexts)
    if exact and fused_unavailable(model) is None:
        from nectar_runtime.backends.cuda_graph import StepOptions, full_backend

        return full_backend(model, contexts, context_len, StepOptions.from_env())
    return TorchBackend(model, contexts, context_len)


def generate_answers(
    model, tokenizer, ctx: DocumentContext, contexts: list | None, conversations: list[list[dict]],
    cfg: GenerationConfig, batch_size: int = 8, progress=None, backend=None,
) -> list[list[int]]:
    """Token ids of the next assistant answer for each conversation (EOS excluded).

    conversations: lists of turns starting with a user question (the document goes before it).
    contexts=None answers without the document (positions still start after n).
    backend: reuse one from `answer_backend(model, contexts, ctx.n)` across calls (its CUDA graphs
    are kept); None builds one.
    """
    backend = backend or answer_backend(model, contexts, ctx.n)
    eos = set(tokenizer.eos_token_ids)
    prompts = [local_ids(ctx, tokenizer, conv) for conv in conversations]
    order = np.argsort([len(p) for p in prompts], kind="stable")  # similar lengths pad less
    precompile = getattr(backend, "precompile", None)  # the fused CUDA backend: its kernels, in parallel
    if precompile is not None:
        precompile({len(order[s : s + batch_size]) for s in range(0, len(order), batch_size)})
    out: list[list[int]] = [[] for _ in prompts]
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        done = np.zeros(len(idx), dtype=bool)
        for tok in generate_ids(backend, [prompts[i] for i in idx], cfg, eos):
            for j, t in enumerate(tok):
                if not done[j] and t >= 0 and t not in eos:
                    out[idx[j]].append(int(t))
                else:
                    done[j] = True
        if progress is not None:
            progress.update(len(idx))
    return out


def decode_answers(tokenizer, answers: list[list[int]]) -> list[str]:
    # an answer cut inside a character by the token limit ends without its unfinished bytes (no U+FFFD)
    return [tokenizer.decode(a, skip_special_tokens=True).rstrip("\ufffd").strip() for a in answers]
