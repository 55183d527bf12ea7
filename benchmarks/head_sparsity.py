"""How query-dependent is each head's attention over the document? (diagnosis for issue 3)

For every (layer, KV head) of SmolLM2 on one document, over the self-study probes of `nectar fit`
(split by probe into train and held-out as the fit does):
  * entropy of the attention over the document (nats; exp(entropy) = effective number of keys);
  * top-m selection error: exact attention restricted to the m document tokens that receive the
    most attention mass on the TRAIN probes, evaluated on HELD-OUT probes — the relative error of
    its output (weighted by the document's share of the merged output, as the fit's held-out
    error is) and how much log-normalizer it misses. A head that attends to a fixed set of tokens
    is served well by a fixed subset of its KV (quadrature nodes); a head whose tokens change
    with the query (a lookup over the whole document) is not, and is hard for a small MLP too.

    python benchmarks/head_sparsity.py ../shared/data/manuals/sed.txt [--layers 18,20,23] [--cache qs.pt]

`--cache` reuses (or writes) the collected queries. Writes benchmarks/results/head_sparsity_<doc>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MS = (32, 128, 512)


def collect(doc: str, seed: int = 0) -> dict:
    from nectar_export.collect import collect_queries
    from nectar_export.pipeline import document_context, load_base, split_prefix
    from nectar_export.probes import ProbeConfig, build_probes, split_probes

    torch.manual_seed(seed)
    base = load_base(None, "cpu")
    ctx = document_context(base, doc)
    full = base.model.prefill_document(torch.tensor([ctx.context_ids])).contexts()
    prefix, docpart = split_prefix(full, ctx.prefix_len)
    probe_cfg = ProbeConfig(seed=seed)
    probes = build_probes(base.model, base.tokenizer, ctx, full, probe_cfg)
    train, held = split_probes(probes, probe_cfg.holdout_frac, probe_cfg.seed)
    qs = collect_queries(base.model, docpart, ctx.n, [p.ids for p in train] + [p.ids for p in held], prefix_contexts=prefix)
    is_held = qs.probe_index >= len(train)
    return {"train": qs.select(~is_held), "held": qs.select(is_held), "n": ctx.n, "doc_kv": [(c.k, c.v) for c in docpart],
            "scale": base.config.scale}


@torch.no_grad()
def head_report(d: dict, layer: int, head: int, samples: int = 4000, seed: int = 0) -> dict:
    """Entropy and top-m selection errors of one (layer, KV head); queries [N, Hkv, G, D]."""
    tr, he = d["train"], d["held"]
    scale = d.get("scale", 1 / math.sqrt(tr.q[layer].shape[-1]))
    g = torch.Generator().manual_seed(seed)
    itr = torch.randperm(tr.n, generator=g)[:samples]
    ihe = torch.randperm(he.n, generator=g)[:samples]
    k, v = (x[0, head].float() for x in d["doc_kv"][layer])  # [n, D]
    qt = tr.q[layer][itr, head].reshape(-1, k.shape[-1])
    mass = torch.softmax(qt @ k.T * scale, -1).sum(0)  # [n] attention mass on train probes
    qh = he.q[layer][ihe, head].reshape(-1, k.shape[-1])
    s = qh @ k.T * scale
    p = torch.softmax(s, -1)
    o, lse = p @ v, torch.logsumexp(s, -1)
    share = torch.sigmoid(he.lse[layer][ihe, head].reshape(-1) - he.lse_loc[layer][ihe, head].reshape(-1))[:, None]
    ent = float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())
    out = {"layer": layer, "head": head, "entropy": ent, "effective_keys": math.exp(ent)}
    for m in MS:
        sel = mass.topk(min(m, k.shape[0])).indices
        ss = s[:, sel]
        om = torch.softmax(ss, -1) @ v[sel]
        rel = math.sqrt(float((share.square() * (om - o).square()).sum() / (share.square() * o.square()).sum()))
        out[f"top{m}_rel_error"] = rel
        out[f"top{m}_missing_lse"] = float((lse - torch.logsumexp(ss, -1)).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("document")
    ap.add_argument("--layers", default=None, help="comma separated (default: all)")
    a = ap.parse_args(argv)
    d = collect(a.document)  # no on-disk cache: it would have to be a pickle
    layers = [int(x) for x in a.layers.split(",")] if a.layers else list(range(len(d["doc_kv"])))
    rows = [head_report(d, l, j) for l in layers for j in range(d["doc_kv"][l][0].shape[1])]
    print("layer head | entropy eff.keys | " + " | ".join(f"top{m}: rel  lse-miss" for m in MS))
    for r in rows:
        print(f"{r['layer']:5d} {r['head']:4d} | {r['entropy']:6.2f} {r['effective_keys']:8.1f} | "
              + " | ".join(f"{r[f'top{m}_rel_error']:.3f} {r[f'top{m}_missing_lse']:.2f}" for m in MS))
    out = REPO / "benchmarks" / "results" / f"head_sparsity_{Path(a.document).stem}.json"
    out.write_text(json.dumps({"document": Path(a.document).name, "n": d["n"], "command": "python benchmarks/head_sparsity.py "
                               + " ".join(argv if argv is not None else sys.argv[1:]), "heads": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
