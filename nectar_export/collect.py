"""Query collection: run probe sequences after the document and record, per layer, every query
with its exact targets over the document (o_ctx, lse_ctx) and its local log-normalizer lse_loc.

Recording is a wrapper around each layer's context part (a hook in the kvpress sense): the model
code is untouched. With `serve` (on-policy collection) the model is fed Nectar's prediction in
every layer while the exact targets are still recorded, so later layers see the queries they
will see at inference.

The document part is what the heads learn; the template prefix before it (system prompt, turn
header: the same for every document) stays exact and counts, like the local tokens, as "the rest".

Stored per layer l: q [N, Hkv, G, D], o [N, Hkv, G, D] (computed in fp32, stored in `store_dtype`:
fp16 halves a fit's largest tensors) and lse [N, Hkv, G] over the document, lse_loc [N, Hkv, G] over
the rest (prefix + local tokens), fp32; N = all non-padding probe tokens; `probe_index[N]` says
which probe each row came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from nectar_runtime.errors import NectarError

from nectar_models.attention import INVALID_POS, attention_with_lse, merge_attention, visibility


@dataclass
class QuerySet:
    q: list[torch.Tensor]
    o: list[torch.Tensor]
    lse: list[torch.Tensor]
    lse_loc: list[torch.Tensor]
    probe_index: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]

    @property
    def n(self) -> int:
        return int(self.probe_index.shape[0])

    def select(self, rows: torch.Tensor) -> "QuerySet":
        """rows: [N] bool or index tensor (CPU) -> the subset."""
        pick = lambda xs: [x[rows.to(x.device)] for x in xs]  # noqa: E731
        return QuerySet(pick(self.q), pick(self.o), pick(self.lse), pick(self.lse_loc), self.probe_index[rows], self.positions[rows])

    def stored_as(self, dtype: torch.dtype) -> "QuerySet":
        """The same queries with q and o stored in `dtype` (lse stays fp32); self when already so.
        Rounding fp32 records to fp16 here equals recording them in fp16."""
        if self.q[0].dtype == dtype:
            return self
        q, o = [_stored(x, dtype) for x in self.q], [_stored(x, dtype) for x in self.o]
        return QuerySet(q, o, self.lse, self.lse_loc, self.probe_index, self.positions)


def _stored(x: torch.Tensor, dtype: torch.dtype, overflow: torch.Tensor | None = None) -> torch.Tensor:
    """x converted to the storage dtype. A finite value that fp16 cannot hold (|x| > 65504) is refused,
    not stored as inf: at once, or, with `overflow` (a bool flag on x's device), flagged there so
    that collection checks once at the end instead of syncing the device per tensor."""
    y = x.to(dtype)
    if dtype != torch.float16:
        return y
    lost = (torch.isfinite(x) & ~torch.isfinite(y)).any()
    if overflow is not None:
        overflow |= lost
    elif lost:
        raise _overflow_error(x)
    return y


def _overflow_error(x: torch.Tensor | None = None) -> NectarError:
    peak = f" reach {float(x[torch.isfinite(x)].abs().max()):.3g}," if x is not None else ""
    return NectarError(f"recorded queries or attention outputs{peak} beyond fp16's range: "
                       "fit with query_dtype='float32' (nectar fit --query-dtype float32)")


class RecordingContext:
    """One layer's context part = exact prefix + document; records (q, o_doc, lse_doc, lse_prefix).

    The model is served the exact document, or `serve` (Nectar heads) for on-policy collection.
    """

    def __init__(self, prefix, exact, serve=None):
        self.prefix, self.exact, self.serve = prefix, exact, serve
        self.records: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, q: torch.Tensor, q_pos: torch.Tensor):
        o, lse = self.exact(q, q_pos)
        if self.prefix is not None:
            o_p, lse_p = self.prefix(q, q_pos)
        else:
            o_p, lse_p = torch.zeros_like(o), torch.full_like(lse, float("-inf"))
        self.records.append((q.float(), o.float(), lse, lse_p))
        if self.serve is not None:
            o, lse = self.serve(q, q_pos)
        return merge_attention(o_p, lse_p, o, lse), torch.logaddexp(lse_p, lse)


def _rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x: [B, Hkv, G, T, ...] -> [N_valid, Hkv, G, ...] for valid [B, T]."""
    x = x.movedim(3, 1)  # [B, T, Hkv, G, ...]
    return x[valid]


def left_padded(probes_ids: list[list[int]], idx: list[int], context_len: int, device):
    """The probes `idx` as one left-padded batch: ids, pos, valid: [B, T] on `device` (padding at
    INVALID_POS, so no query sees it)."""
    t = max(len(probes_ids[i]) for i in idx)
    ids = torch.zeros(len(idx), t, dtype=torch.long)
    pos = torch.full((len(idx), t), INVALID_POS, dtype=torch.long)
    for r, i in enumerate(idx):
        p = probes_ids[i]
        ids[r, t - len(p) :] = torch.tensor(p)
        pos[r, t - len(p) :] = context_len + torch.arange(len(p))
    return ids.to(device), pos.to(device), (pos != INVALID_POS).to(device)


@torch.no_grad()
def collect_queries(model, doc_contexts: list, context_len: int, probes_ids: list[list[int]],
                    prefix_contexts: list | None = None, serve_contexts: list | None = None,
                    batch_size: int = 8, progress: bool = True, index_offset: int = 0,
                    store_dtype: torch.dtype = torch.float32) -> QuerySet:
    """Forward every probe (teacher-forced, batched with left padding) and record all layers.

    The outputs are allocated once at their final size (N = every probe token) and filled batch by
    batch: gathering per-batch pieces and concatenating them held about twice the final size, and
    the freed pieces stayed in the process (a 30K-token probe set: 11.7 GB resident for 4.1 GB of
    data). `probe_index` counts from `index_offset`; q and o are stored in `store_dtype`.
    """
    cfg = model.config
    none = [None] * len(doc_contexts)
    wrappers = [RecordingContext(p, c, s) for p, c, s in zip(prefix_contexts or none, doc_contexts, serve_contexts or none)]
    dev = model.embed_tokens.weight.device
    n_rows = sum(len(p) for p in probes_ids)
    g = cfg.group_size
    shapes = ((cfg.num_kv_heads, g, cfg.head_dim),) * 2 + ((cfg.num_kv_heads, g),) * 2  # q, o, lse, lse_loc
    dtypes = (store_dtype, store_dtype, torch.float32, torch.float32)
    per_layer = [[torch.empty(n_rows, *sh, device=dev, dtype=dt) for sh, dt in zip(shapes, dtypes)]
                 for _ in range(cfg.num_layers)]
    overflow = torch.zeros((), dtype=torch.bool, device=dev)
    probe_idx = torch.empty(n_rows, dtype=torch.long)
    positions = torch.empty(n_rows, dtype=torch.long)
    order = sorted(range(len(probes_ids)), key=lambda i: len(probes_ids[i]))
    bar = tqdm(total=len(order), desc="collect queries", unit="probe", disable=not progress)
    row = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, pos, valid_dev = left_padded(probes_ids, idx, context_len, dev)
        t, valid = ids.shape[1], valid_dev.cpu()
        for w in wrappers:
            w.records.clear()
        cache = model.new_cache(len(idx), t, wrappers, context_len)
        model(ids, pos, cache, last_only=True)
        nv = int(valid.sum())
        for layer, (w, lc) in enumerate(zip(wrappers, cache.layers)):
            q, o, lse, lse_p = (torch.cat(x, dim=3) for x in zip(*w.records))  # chunks of one forward
            lk, lv, lpos = lc.local.view()
            _, lse_loc = attention_with_lse(q, lk.float(), lv.float(), cfg.scale, visibility(pos, lpos, cfg.layer_windows[layer]))
            lse_loc = torch.logaddexp(lse_loc, lse_p)  # the rest: local tokens + exact prefix
            for store, x in zip(per_layer[layer], (q, o, lse, lse_loc)):
                store[row : row + nv] = _stored(_rows(x, valid_dev), store.dtype, overflow)
        probe_idx[row : row + nv] = (index_offset + torch.tensor(idx))[:, None].expand(-1, t)[valid]
        positions[row : row + nv] = pos[valid_dev].cpu()
        row += nv
        bar.update(len(idx))
    bar.close()
    for w in wrappers:
        w.records.clear()
    if overflow:
        raise _overflow_error()
    return QuerySet(
        q=[x[0] for x in per_layer], o=[x[1] for x in per_layer], lse=[x[2] for x in per_layer],
        lse_loc=[x[3] for x in per_layer], probe_index=probe_idx, positions=positions,
    )
