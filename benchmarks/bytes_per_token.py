"""Bytes and multiply-accumulates of a decode step, bundle by bundle, against llama.cpp's: why the CPU speed
ratios are what they are.

Per bundle: the initializer bytes a decode step reads (every initializer except those only looked up by
Gather / GatherBlockQuantized, of which one row is read), grouped as model weights, LM head, Nectar heads
(target network, score network), retained document KV, the baked document KV of `--method full` bundles,
the template prefix's KV, the int4 block sums and the rest; and the multiply-accumulates (MACs) of the
matmuls over those initializers for one token: K × N per model weight, G × K × N for the Nectar heads and
the retained, baked and prefix KV (each KV head's weights serve its G query heads: G = 3 on SmolLM2;
"heads: target network" holds the shared input matmul `wa`, which also feeds the score network's first
layer and the linear skip). For llama.cpp: the GGUF's tensor bytes (a tied embedding is its output
matrix, read in full) plus its fp16 KV cache at the document's length, and MACs = its weights'
parameters + the attention's Hq × D × 2 per cached token and layer. The implied speed ratios are
llama.cpp's count over the bundle's; `--record` adds the measured paired ratios of a budget_decode_cpu.py
record of the same bundles. On 2 cores the quantized kernels are not memory-bound (an int8 bundle reads
40% more bytes than int4 and decodes as fast), so the MAC ratio is the one to compare with the measured
one. Local-token attention, norms and activations are left out of both counts, and llama.cpp's attention
is counted over all n tokens in every layer (sliding-window layers, as Gemma 3's, are not modelled).

    python benchmarks/bytes_per_token.py --bundles DIR1,DIR2 [--gguf FILE] [--record benchmarks/results/budget_decode_cpu_NAME.json]

Writes benchmarks/results/bytes_per_token.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOKUP_OPS = {"Gather", "GatherBlockQuantized"}
# stored per KV head and applied to its G query heads' rows: G × K × N multiply-accumulates a token
PER_KV_HEAD = {"heads: score network", "heads: target network", "retained KV", "document KV (full)", "prefix KV"}


def _group(name: str) -> str:
    if ".nectar_heads." in name:
        return "heads: score network" if "_lse" in name else "heads: target network"
    if ".retained." in name:
        return "retained KV"
    if ".context.document." in name:
        return "document KV (full)"
    if ".context.prefix." in name:
        return "prefix KV"
    if name.startswith("/quantize/const/block_sums"):
        return "block sums"
    if name.startswith("model.embed_tokens.") or "lm_head" in name:
        return "LM head"
    if name.startswith("model.layers.") and ".weight" in name:
        return "model weights"
    return "other"


def bundle_counts(bundle: Path, group_size: int) -> tuple[dict, dict]:
    """({group: bytes}, {group: MACs}) of one decode step of a bundle's graph (initializer sizes, external
    data included; `group_size` G = query heads per KV head)."""
    import numpy as np
    import onnx

    m = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    users: dict[str, set[str]] = {}
    for node in m.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    nbytes: dict[str, int] = {}
    for t in m.graph.initializer:
        if users.get(t.name) and users[t.name] <= LOOKUP_OPS:
            continue  # one row per token
        size = next((int(e.value) for e in t.external_data if e.key == "length"), 0) or len(t.raw_data)
        nbytes[_group(t.name)] = nbytes.get(_group(t.name), 0) + size
    macs: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            weight, count = node.input[1], attrs["K"] * attrs["N"]
        elif node.op_type in ("MatMul", "FusedMatMul") and any(i in inits for i in node.input):
            weight = next(i for i in node.input if i in inits)
            count = int(np.prod(inits[weight].dims))
        else:
            continue
        group = _group(weight)
        rows = group_size if group in PER_KV_HEAD else 1
        macs[group] = macs.get(group, 0) + rows * count
    return nbytes, macs


def llama_cpp_shape(gguf: Path) -> dict:
    """What llama.cpp's decode step reads and computes, from the GGUF's header (read once; the project's
    own table reader, no tensor data): tensor bytes, weight parameters, layers, heads, KV heads, head size."""
    from nectar_runtime.gguf_metadata import read_gguf_tensor_table

    meta, table = read_gguf_tensor_table(gguf)

    def field(suffix):
        return int(next(v for k, v in meta.items() if k.endswith(suffix)))

    heads = field(".attention.head_count")
    try:
        head_dim = field(".attention.key_length")  # Gemma 3: 256, not embedding_length / heads
    except StopIteration:
        head_dim = field(".embedding_length") // heads
    untied = any(t.name == "output.weight" for t in table)  # then token_embd is only looked up, one row a token
    params = sum(math.prod(t.dims) for t in table
                 if len(t.dims) == 2 and not (untied and t.name == "token_embd.weight"))
    return {"tensor_bytes": sum(t.n_bytes for t in table), "params": params, "layers": field(".block_count"),
            "heads": heads, "kv_heads": field(".attention.head_count_kv"), "head_dim": head_dim}


def llama_cpp_counts(shape: dict, n: int) -> tuple[dict, dict]:
    """({'GGUF tensors', 'KV cache (fp16)'} bytes, {'weights', 'attention'} MACs) of llama.cpp's decode
    step after n tokens (`shape`: llama_cpp_shape)."""
    kv = shape["layers"] * shape["kv_heads"] * shape["head_dim"] * 2 * 2 * n
    return ({"GGUF tensors": shape["tensor_bytes"], "KV cache (fp16)": kv},
            {"weights": shape["params"], "attention": shape["layers"] * shape["heads"] * shape["head_dim"] * 2 * n})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", required=True)
    ap.add_argument("--gguf", default=None, help="the base GGUF (default: the pulled SmolLM2)")
    ap.add_argument("--record", default=None, help="a budget_decode_cpu.py record of the same bundles (measured ratios)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bytes_per_token.json"))
    a = ap.parse_args(argv)
    from nectar_runtime.bundle import read_bundle
    from nectar_runtime.hub import resolve_model

    paths = [Path(p) for p in a.bundles.split(",")]
    gguf = Path(a.gguf) if a.gguf else resolve_model(None, pull_missing=False)
    measured = [None] * len(paths)
    if a.record:  # the record's bundles in the order given here, or by unique name
        rec = json.loads(Path(a.record).read_text())["bundles"]
        names = [r["bundle"] for r in rec]
        if names == [p.name for p in paths]:
            measured = rec
        elif len(set(names)) == len(names):
            measured = [next((r for r in rec if r["bundle"] == p.name), None) for p in paths]
        else:
            raise SystemExit(f"{a.record}: bundle names repeat; give --bundles in the record's order")
    shape = llama_cpp_shape(gguf)
    group_size = shape["heads"] // shape["kv_heads"]
    rows = []
    for p, meas in zip(paths, measured):
        m = read_bundle(p, verify=False).manifest
        n = m["context_len"]
        lbytes, lmacs = llama_cpp_counts(shape, n)
        nbytes, macs = bundle_counts(p, group_size)
        r = {"bundle": p.name, "path": str(p), "n": n, "quantize": m.get("quantize") or "fp32",
             "artifact_mb": m["artifact"]["artifact_bytes"] / 1e6 if m.get("artifact") else None,
             "bytes": nbytes, "total_bytes": sum(nbytes.values()), "macs": macs, "total_macs": sum(macs.values()),
             "llama_cpp_bytes": lbytes, "llama_cpp_macs": lmacs}
        r["bytes_ratio_to_llama_cpp"] = sum(lbytes.values()) / r["total_bytes"]
        r["macs_ratio_to_llama_cpp"] = sum(lmacs.values()) / r["total_macs"]
        if meas is not None and (meas["n"], meas["quantize"]) != (n, r["quantize"]):
            raise SystemExit(f"{a.record}: {p.name} is n = {meas['n']}, {meas['quantize']} there, n = {n}, {r['quantize']} here")
        if meas is not None:
            r["measured_paired_ratio_to_llama_cpp"] = meas.get("paired_ratio_to_llama_cpp")
            r["measured_ms_per_token"] = meas.get("ms_per_token_median")
        rows.append(r)
    out = {"command": "python benchmarks/bytes_per_token.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "gguf": gguf.name, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    groups = sorted({g for r in rows for g in r["macs"]})
    print("MACs per token (millions) by part, and llama.cpp's (weights + attention):")
    print("| bundle | n | " + " | ".join(groups) + " | total M MACs | llama.cpp M MACs | MB read | llama.cpp MB "
          "(GGUF + fp16 KV) | implied ratio: MACs / bytes | measured paired ratio |")
    print("|---|---:|" + "---:|" * (len(groups) + 6))
    for r in rows:
        cells = " | ".join(f"{r['macs'].get(g, 0) / 1e6:.1f}" for g in groups)
        meas = r.get("measured_paired_ratio_to_llama_cpp")
        lb, lm = r["llama_cpp_bytes"], r["llama_cpp_macs"]
        print(f"| {r['bundle']} | {r['n']} | {cells} | {r['total_macs'] / 1e6:.1f} | {lm['weights'] / 1e6:.1f} + "
              f"{lm['attention'] / 1e6:.1f} | {r['total_bytes'] / 1e6:.1f} | {lb['GGUF tensors'] / 1e6:.1f} + "
              f"{lb['KV cache (fp16)'] / 1e6:.1f} | {r['macs_ratio_to_llama_cpp']:.2f}× / {r['bytes_ratio_to_llama_cpp']:.2f}× | "
              f"{'' if meas is None else f'{meas:.2f}×'} |")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
