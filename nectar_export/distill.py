"""End-to-end distillation: fine-tune all fitted heads at once against the full-context model.

The per-module fit (fit.py) matches each head's attention output to its own exact target, with
every error weighted alike. What a user sees, though, is the next-token distribution after 30
layers in which the errors of all heads add up and some matter far more than others. This stage
starts from the fitted heads and minimises, over the training probes (teacher-forced),

    KL( p_full(· | document, probe) ‖ p_nectar(· | heads, probe) )

per probe token, with the model frozen and gradients flowing through every layer into every
head (the context-distillation objective of self-study). The teacher is the same model with the
exact document cache; its top-K next tokens per probe token are computed once, and the KL is
taken over those K tokens plus "any other token" (`top_k_kl`). Held-out probes decide what is
kept: the heads of the best held-out KL seen, so the stage never leaves the heads worse on the
held-out KL it measures than it found them.

Shapes: probe batches `ids, pos: [B, T]` (left padded, padding at INVALID_POS), logits of the
valid rows `[N, V]`.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .collect import left_padded
from .fit import lr_factor


def probe_batches(probes_ids: list[list[int]], max_tokens: int, seed: int | None) -> list[list[int]]:
    """Probe indices grouped by length so that B × T_max ≤ max_tokens (a longer probe alone);
    batches shuffled with `seed` (None: in length order)."""
    order = sorted(range(len(probes_ids)), key=lambda i: len(probes_ids[i]))
    batches, cur = [], []
    for i in order:
        t = len(probes_ids[i])  # the longest so far, as order is by length
        if cur and (len(cur) + 1) * t > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def valid_log_probs(model, ids, pos, valid, contexts, context_len: int) -> torch.Tensor:
    """Log-probabilities [N, V] (fp32) at the valid positions of one teacher-forced pass, in
    row-major order (probe by probe, token by token)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1], contexts, context_len)
    h = model.final_hidden(ids, pos, cache)  # [B, T, hidden]
    return F.log_softmax(model.lm_head(h[valid]).float(), dim=-1)


@dataclass
class TeacherTopK:
    """The full-context model's K most likely next tokens per probe token: `logp[i]`, `index[i]`:
    [len(probe i), K]. Stored once (a few MB) instead of recomputing the teacher every step."""

    logp: list[torch.Tensor]
    index: list[torch.Tensor]

    def rows(self, idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, K] log-probabilities and token ids of the probes `idx`, in `left_padded` row order."""
        return (torch.cat([self.logp[i] for i in idx]).to(device), torch.cat([self.index[i] for i in idx]).to(device))


@torch.no_grad()
def teacher_top_k(model, teacher: list, context_len: int, probes_ids: list[list[int]], k: int, max_tokens: int,
                  progress: bool = False, desc: str = "teacher") -> TeacherTopK:
    dev = model.embed_tokens.weight.device
    logp, index = [None] * len(probes_ids), [None] * len(probes_ids)
    batches = probe_batches(probes_ids, max_tokens, None)
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        ids, pos, valid = left_padded(probes_ids, idx, context_len, dev)
        lp, ix = valid_log_probs(model, ids, pos, valid, teacher, context_len).topk(k, dim=-1)
        for i, a, b in zip(idx, lp.cpu().split([len(probes_ids[i]) for i in idx]), ix.cpu().split([len(probes_ids[i]) for i in idx])):
            logp[i], index[i] = a, b.to(torch.int32)
    return TeacherTopK(logp, index)


def top_k_kl(student_logp: torch.Tensor, t_logp: torch.Tensor, t_index: torch.Tensor) -> torch.Tensor:
    """Per row KL(teacher ‖ student) over K + 1 outcomes: the teacher's top-K tokens and "any other
    token". Exact for the coarsened distributions, a lower bound on the full KL and within the
    teacher's tail mass of it. student_logp: [N, V]; t_logp, t_index: [N, K] -> [N]."""
    s = student_logp.gather(1, t_index.long())  # [N, K]
    pt = t_logp.exp()
    tail_t = (1 - pt.sum(1)).clamp_min(1e-12)
    tail_s = (1 - s.exp().sum(1)).clamp_min(1e-12)
    return (pt * (t_logp - s)).sum(1) + tail_t * (tail_t.log() - tail_s.log())


@torch.no_grad()
def heldout_fidelity(model, student: list, context_len: int, probes_ids: list[list[int]], target: TeacherTopK,
                     max_tokens: int) -> dict:
    """Mean top-K KL(full ‖ nectar) and top-1 agreement over every token of `probes_ids`."""
    dev = model.embed_tokens.weight.device
    kl_sum, agree, count = 0.0, 0, 0
    for idx in probe_batches(probes_ids, max_tokens, None):
        ids, pos, valid = left_padded(probes_ids, idx, context_len, dev)
        ls = valid_log_probs(model, ids, pos, valid, student, context_len)
        t_logp, t_index = target.rows(idx, dev)
        kl_sum += float(top_k_kl(ls, t_logp, t_index).sum())
        agree += int((ls.argmax(-1) == t_index[:, 0].long()).sum())
        count += ls.shape[0]
    return {"kl_topk": kl_sum / max(1, count), "agreement": agree / max(1, count), "tokens": count}


def distill_heads(model, heads, teacher: list, student: list, context_len: int, train_ids: list[list[int]],
                  held_ids: list[list[int]], steps: int, lr: float, max_tokens: int, seed: int = 0,
                  top_k: int = 64, evals: int = 6, progress: bool = True) -> dict:
    """Fine-tune `heads` (in place) for `steps` optimiser steps; returns a report.

    teacher / student: per-layer context parts (exact document / Nectar heads over the same
    template prefix). The teacher's top-`top_k` next tokens are computed once per probe; the
    model's own weights stay frozen. Evaluates on `held_ids` before training and `evals` times
    during it, and leaves the heads at the best held-out KL seen (possibly the starting heads)."""
    t0 = time.perf_counter()
    dev = model.embed_tokens.weight.device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params = [p for p in heads.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    every = max(1, math.ceil(steps / max(1, evals)))
    try:
        t_train = teacher_top_k(model, teacher, context_len, train_ids, top_k, max_tokens, progress, "distill: teacher")
        t_held = teacher_top_k(model, teacher, context_len, held_ids, top_k, max_tokens)
        start = heldout_fidelity(model, student, context_len, held_ids, t_held, max_tokens)
        best, best_state, best_step = start, copy.deepcopy(heads.state_dict()), 0
        curve = [{"step": 0, **start}]
        batches, epoch, bi = probe_batches(train_ids, max_tokens, seed), 0, 0
        bar = tqdm(total=steps, desc="distill heads", unit="step", disable=not progress)
        losses: list[float] = []  # training KL since the last held-out evaluation
        for step in range(1, steps + 1):
            if bi == len(batches):
                epoch, bi = epoch + 1, 0
                batches = probe_batches(train_ids, max_tokens, seed + epoch)
            idx = batches[bi]
            bi += 1
            ids, pos, valid = left_padded(train_ids, idx, context_len, dev)
            t_logp, t_index = t_train.rows(idx, dev)
            loss = top_k_kl(valid_log_probs(model, ids, pos, valid, student, context_len), t_logp, t_index).mean()
            for group in opt.param_groups:  # 10% warm-up, then cosine decay to 0
                group["lr"] = lr * lr_factor(step - 1, max(1, steps // 10), steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.update(1)
            losses.append(loss.item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
            if step % every == 0 or step == steps:
                now = heldout_fidelity(model, student, context_len, held_ids, t_held, max_tokens)
                curve.append({"step": step, "train_kl_topk": sum(losses) / len(losses), **now})
                losses = []
                if now["kl_topk"] < best["kl_topk"]:
                    best, best_state, best_step = now, copy.deepcopy(heads.state_dict()), step
        bar.close()
        heads.load_state_dict(best_state)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return {"steps": steps, "kept_step": best_step, "lr": lr, "max_tokens": max_tokens, "top_k": top_k,
            "heldout_before": start, "heldout_after": best, "curve": curve,
            "seconds": round(time.perf_counter() - t0, 1)}
