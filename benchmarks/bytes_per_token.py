"""Bytes a decode step reads, bundle by bundle, against llama.cpp's: why the CPU speed ratios are what they are.

A 2-core CPU decoding a 135M-parameter model is bound by memory traffic: every weight matmul reads all of its
weights for one token, and full attention reads the whole KV cache. This counts, per bundle, the initializer
bytes a decode step reads (every initializer except those only looked up by Gather / GatherBlockQuantized, of
which one row is read), grouped as model weights, LM head, Nectar heads (target network, score network),
retained document KV and the rest; and for llama.cpp the GGUF's tensor bytes (the tied embedding is its output
matrix, read in full) plus its fp16 KV cache at the document's length. The implied speed ratio is llama.cpp's
bytes over the bundle's; `--record` adds the measured paired ratios of a budget_decode_cpu.py record of the same
bundles. The counts are a lower bound on traffic: ONNX Runtime repacks MatMulNBits weights at session start
(with per-block sums for its int8 kernel), activations and the local KV add a little.

    python benchmarks/bytes_per_token.py --bundles DIR1,DIR2 [--gguf FILE] [--record benchmarks/results/budget_decode_cpu_NAME.json]

Writes benchmarks/results/bytes_per_token.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOOKUP_OPS = {"Gather", "GatherBlockQuantized"}


def _group(name: str) -> str:
    if ".nectar_heads." in name:
        return "heads: score network" if "_lse" in name else "heads: target network"
    if ".retained." in name:
        return "retained KV"
    if name.startswith("model.embed_tokens.") or "lm_head" in name:
        return "LM head"
    if name.startswith("model.layers.") and ".weight" in name:
        return "model weights"
    return "other"


def bundle_bytes(bundle: Path) -> dict:
    """{group: bytes read per decode step} of a bundle's graph (initializer sizes, external data included)."""
    import onnx

    m = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in m.graph.node:
        for i in node.input:
            users.setdefault(i, set()).add(node.op_type)
    out: dict[str, int] = {}
    for t in m.graph.initializer:
        if users.get(t.name) and users[t.name] <= LOOKUP_OPS:
            continue  # one row per token
        size = next((int(e.value) for e in t.external_data if e.key == "length"), 0) or len(t.raw_data)
        out[_group(t.name)] = out.get(_group(t.name), 0) + size
    return out


def llama_cpp_bytes(gguf: Path, n: int) -> dict:
    """{'GGUF tensors', 'KV cache (fp16)'}: what llama.cpp reads per decode token after n tokens."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    tensors = sum(int(t.n_bytes) for t in r.tensors)
    f = {k: r.fields[k] for k in r.fields}

    def field(suffix):
        key = next(k for k in f if k.endswith(suffix))
        return int(f[key].parts[f[key].data[0]][0])

    layers, heads = field(".block_count"), field(".attention.head_count_kv")
    head_dim = field(".embedding_length") // field(".attention.head_count")
    return {"GGUF tensors": tensors, "KV cache (fp16)": layers * heads * head_dim * 2 * 2 * n}


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
    if a.record:  # the record's bundles in the order given here (bundle names alone may repeat)
        rec = json.loads(Path(a.record).read_text())["bundles"]
        by_name = {r["bundle"]: r for r in rec}
        aligned = [r["bundle"] for r in rec] == [p.name for p in paths]
        measured = rec if aligned else [by_name.get(p.name) for p in paths]
    rows = []
    for p, meas in zip(paths, measured):
        m = read_bundle(p, verify=False).manifest
        groups = bundle_bytes(p)
        n = m["context_len"]
        llama = llama_cpp_bytes(gguf, n)
        total, ltotal = sum(groups.values()), sum(llama.values())
        r = {"bundle": p.name, "path": str(p), "n": n, "quantize": m.get("quantize") or "fp32",
             "artifact_mb": m["artifact"]["artifact_bytes"] / 1e6 if m.get("artifact") else None,
             "bytes": groups, "total_bytes": total, "llama_cpp_bytes": llama, "llama_cpp_total_bytes": ltotal,
             "implied_ratio_to_llama_cpp": ltotal / total}
        if meas is not None:
            r["measured_paired_ratio_to_llama_cpp"] = meas.get("paired_ratio_to_llama_cpp")
            r["measured_ms_per_token"] = meas.get("ms_per_token_median")
        rows.append(r)
    out = {"command": "python benchmarks/bytes_per_token.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d"), "gguf": gguf.name, "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    groups = sorted({g for r in rows for g in r["bytes"]})
    print("| bundle | n | " + " | ".join(groups) + " | total MB | llama.cpp MB (GGUF + fp16 KV) | implied ratio | measured paired ratio |")
    print("|---|---:|" + "---:|" * (len(groups) + 4))
    for r in rows:
        cells = " | ".join(f"{r['bytes'].get(g, 0) / 1e6:.1f}" for g in groups)
        meas = r.get("measured_paired_ratio_to_llama_cpp")
        lb = r["llama_cpp_bytes"]
        print(f"| {r['bundle']} | {r['n']} | {cells} | {r['total_bytes'] / 1e6:.1f} | {lb['GGUF tensors'] / 1e6:.1f} + "
              f"{lb['KV cache (fp16)'] / 1e6:.1f} | {r['implied_ratio_to_llama_cpp']:.2f}× | "
              f"{'' if meas is None else f'{meas:.2f}×'} |")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
