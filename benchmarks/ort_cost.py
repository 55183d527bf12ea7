"""Where a bundle's decode step goes on this CPU: the weight-matmul floor against the rest.

For each bundle (default: the n=512 bundles benchmarks/ort_decode.py leaves in its work folder):
  * total: ms per greedy decode token, timed like ort_decode.py (round-robin, median of runs);
  * weight floor: the same bundle's model weight matmuls alone — every MatMulNBits node and every
    MatMul with a 2-D weight of ≥ 64K elements, outside the Nectar heads, with the bundle's own
    weights, fed random activations of one token, nothing else in the graph;
  * rest = total − floor: attention, Nectar heads, norms, RoPE, the exact-Q4_1 offsets (int4);
  * nodes: the graph's node count after ORT's optimizations, and the cost of one trivial node
    (a chain of 1,000 Adds on [1, 1, 576]), so the rest can be compared with node overhead.

    python benchmarks/ort_cost.py [--bundles DIR ...] [--repeats 3]

Writes benchmarks/results/ort_cost.json and the docs/benchmarks.md section between
`<!-- ort_cost:begin -->` and `<!-- ort_cost:end -->`. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_decode  # noqa: E402
from decode_cpu import machine_info, write_docs  # noqa: E402

BEGIN, END = "<!-- ort_cost:begin -->", "<!-- ort_cost:end -->"
WORK = REPO / "benchmarks" / "work" / "ort_decode"
DEFAULT = ["nectar_fp32_512_fixed", "nectar_int8_512_fixed", "nectar_int4_512_fixed", "nectar_int4-rtn_512_fixed"]
BIG = 1 << 16  # weights with at least this many elements count as "weight matmuls"


def _time_session(sess, feed: dict, runs: int = 100) -> float:
    for _ in range(10):
        sess.run(None, feed)
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def weight_floor_ms(graph: Path, threads: int) -> tuple[float, int, float]:
    """(ms for the bundle's weight matmuls alone, how many, their weight MB)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from nectar_runtime.backends.ort_backend import session_options

    m = onnx.load(str(graph))
    inits = {t.name: t for t in m.graph.initializer}
    nodes, used, feeds, inputs, outputs = [], set(), {}, [], []
    rng = np.random.default_rng(0)
    for node in m.graph.node:
        # the model's weight matmuls only: the Nectar heads (3-D weights, or per-head 8-bit since
        # 2026-11-24) count in the rest in every bundle, so fp32 and quantized floors compare alike
        if node.op_type == "MatMulNBits" and "/nectar_heads/" not in node.name:
            k = next(a.i for a in node.attribute if a.name == "K")
        elif node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 \
                and np.prod(inits[node.input[1]].dims) >= BIG:
            k = inits[node.input[1]].dims[0]
        else:
            continue
        x = f"x{len(nodes)}"
        feeds[x] = rng.standard_normal((1, 1, k)).astype(np.float32)
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 1, k]))
        n = helper.make_node(node.op_type, [x] + list(node.input[1:]), [f"y{len(nodes)}"], domain=node.domain or None,
                             name=node.name)
        n.attribute.extend(node.attribute)
        nodes.append(n)
        outputs.append(helper.make_tensor_value_info(f"y{len(nodes) - 1}", TensorProto.FLOAT, None))
        used.update(i for i in node.input[1:] if i in inits)
    w = [inits[u] for u in sorted(used)]
    mb = sum(numpy_helper.to_array(t).nbytes for t in w) / 1e6
    sub = helper.make_model(helper.make_graph(nodes, "weight_floor", inputs, outputs, w), opset_imports=m.opset_import)
    sub.ir_version = m.ir_version
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "floor.onnx"
        onnx.save(sub, str(p), save_as_external_data=True, location="floor.data")
        sess = ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
        return _time_session(sess, feeds), len(nodes), mb


def int8_kernel_floors_ms(graph: Path, threads: int) -> dict[str, float]:
    """The fp32 bundle's weight matmuls at 8 bits through each int8 kernel ORT offers on this CPU, with
    one token of random activations: MatMulNBits (8 bits, blocks of 32 and 64, accuracy level 4: int8
    activations, integer dot products) and the standard-op pattern DynamicQuantizeLinear → MatMulInteger
    → Cast → Mul (per-column symmetric int8 weights; ORT fuses it into its dynamic-quantization matmul).
    Tells whether another int8 kernel would make the int8 bundle faster."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from nectar_export.export.graph_builder import portable_model

    from nectar_export.export.quantize import quantize_blockwise
    from nectar_runtime.backends.ort_backend import session_options

    m = onnx.load(str(graph))
    weights = [numpy_helper.to_array(t) for t in m.graph.initializer if len(t.dims) == 2 and np.prod(t.dims) >= BIG
               and any(n.op_type == "MatMul" and n.input[1] == t.name for n in m.graph.node)]
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("MatMulNBits-8 block 32", "MatMulNBits-8 block 64", "MatMulInteger per-column"):
        nodes, inits, inputs, outputs, feeds = [], [], [], [], {}
        for i, w in enumerate(weights):
            (k, n), x, y = w.shape, f"x{i}", f"y{i}"
            feeds[x] = rng.standard_normal((1, k)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, k]))
            outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, None))
            if kind.startswith("MatMulNBits"):
                block = int(kind.rsplit(" ", 1)[1])
                packed, scales, zeros = quantize_blockwise(w.astype(np.float32), 8, block)
                inits += [numpy_helper.from_array(a, f"{nm}{i}") for a, nm in ((packed, "w"), (scales, "s"), (zeros, "z"))]
                nodes.append(helper.make_node("MatMulNBits", [x, f"w{i}", f"s{i}", f"z{i}"], [y], domain="com.microsoft",
                                              K=k, N=n, bits=8, block_size=block, accuracy_level=4))
            else:
                scale = (np.abs(w).max(0) / 127.0).clip(1e-12).astype(np.float32)
                q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
                inits += [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(scale, f"s{i}"),
                          numpy_helper.from_array(np.zeros(n, np.int8), f"z{i}")]
                nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"xq{i}", f"xs{i}", f"xz{i}"]),
                          helper.make_node("MatMulInteger", [f"xq{i}", f"w{i}", f"xz{i}", f"z{i}"], [f"acc{i}"]),
                          helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                          helper.make_node("Mul", [f"xs{i}", f"s{i}"], [f"sc{i}"]),
                          helper.make_node("Mul", [f"accf{i}", f"sc{i}"], [y])]
        sub = portable_model(helper.make_graph(nodes, "int8", inputs, outputs, inits),
                                [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "int8.onnx"
            onnx.save(sub, str(p), save_as_external_data=True, location="int8.data")
            sess = ort.InferenceSession(str(p), session_options(threads), providers=["CPUExecutionProvider"])
            out[kind] = _time_session(sess, feeds)
    return out


def optimized_node_count(graph: Path, threads: int) -> int:
    import onnx
    import onnxruntime as ort

    from nectar_runtime.backends.ort_backend import session_options

    with tempfile.TemporaryDirectory() as d:
        so = session_options(threads)
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
        ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(str(Path(d) / "opt.onnx"), load_external_data=False).graph.node)


def trivial_node_us(threads: int, count: int = 1000, profiled: bool = False) -> float:
    """µs per Add node in a chain; `profiled`: the kernel time ORT's profiler reports for one."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from nectar_export.export.graph_builder import portable_model

    from nectar_runtime.backends.ort_backend import session_options

    shape = [1, 1, 576]
    nodes, x = [], "x"
    for i in range(count):
        nodes.append(helper.make_node("Add", [x, "x"], [f"a{i}"]))
        x = f"a{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)])
    so = session_options(threads)
    with tempfile.TemporaryDirectory() as d:
        if profiled:
            so.enable_profiling, so.profile_file_prefix = True, str(Path(d) / "chain")
        sess = ort.InferenceSession(portable_model(g, [helper.make_opsetid("", 17)]).SerializeToString(),
                                    so, providers=["CPUExecutionProvider"])
        wall = 1000 * _time_session(sess, {"x": np.ones(shape, np.float32)}, runs=200) / count
        if not profiled:
            return wall
        ev = json.loads(Path(sess.end_profiling()).read_text())
        return statistics.median(e["dur"] for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))


def docs_section(rep: dict) -> str:
    lines = [BEGIN, "### Where the quantized bundles' decode time goes (CPU)", "",
             f"Command: `python benchmarks/ort_cost.py{rep['argv']}` — {rep['machine']['cpu_model']}, {rep['threads']} threads, "
             f"onnxruntime {rep['onnxruntime']}, {rep['date']}, n = 512, fixed 4 MB Nectar artifact. *Weight floor*: the "
             "bundle's weight matmuls alone (its own weights, one token of random activations); *rest* = total − floor.",
             "", "| bundle | tok/s | ms/token | weight floor ms (MB of weights) | rest ms | nodes after ORT optimization | ratio to fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    fp32 = next((r for r in rep["bundles"] if r["quantize"] == "fp32"), None)
    for r in rep["bundles"]:
        ratio = f"{r['tokens_per_s'] / fp32['tokens_per_s']:.2f}×" if fp32 else ""
        lines.append(f"| {r['quantize']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {r['weight_floor_ms']:.2f} "
                     f"({r['weight_mb']:.0f}) | {r['rest_ms']:.2f} | {r['nodes_optimized']} | {ratio} |")
    by = {r["quantize"]: r for r in rep["bundles"]}
    lines += ["", "Reading it:", "",
              f"- One trivial ORT node (a chain of 1,000 Adds on [1, 1, 576]) costs {rep['trivial_node_us']:.2f} µs, a lower "
              f"bound: the graph's small nodes (tiny matmuls, splits, concats) cost more each, so the "
              f"{min(r['nodes_optimized'] for r in rep['bundles'])}–{max(r['nodes_optimized'] for r in rep['bundles'])} "
              "nodes are a large part of the rest, beside their own work (attention over the prefix and local tokens, the "
              "Nectar heads, norms, RoPE). `benchmarks/graph_form_ab.py` measures what removing nodes saves.",
              f"- ORT's profiler reports {rep['trivial_node_profiled_us']:.1f} µs of kernel time for that same trivial node, "
              "so per-op profiles (as in the section above) overstate small ops by about that much per node."]
    if "int4" in by and "int4-rtn" in by:
        lines.append(f"- The exact Q4_1 offsets (int4 vs int4-rtn rest) cost {by['int4']['rest_ms'] - by['int4-rtn']['rest_ms']:.2f} ms.")
    if fp32:
        need = fp32["ms_per_token"] / 2
        lines.append(f"- ≥ 2× fp32 needs ≤ {need:.2f} ms per token, i.e. a rest ≤ {need:.2f} ms − the weight floor: "
                     + ", ".join(f"{q} ≤ {need - r['weight_floor_ms']:.2f} ms (measured {r['rest_ms']:.2f})"
                                 for q, r in by.items() if q != "fp32") + ".")
    alt = rep.get("int8_kernel_floors_ms")
    if alt and fp32:
        room = fp32["ms_per_token"] / 2 - min(alt.values())  # the rest an int8 step may have with the fastest kernel
        lines.append("- Other 8-bit kernels for the fp32 bundle's weight matmuls: "
                     + ", ".join(f"{v:.2f} ms with {k}" for k, v in alt.items())
                     + f" (same run, one token). With the fastest, the weight matmuls alone take "
                     f"{min(alt.values()) / fp32['ms_per_token']:.0%} of an fp32 token, so 2× allows the rest of the int8 "
                     f"step (attention, heads, norms, RoPE) {room:.2f} ms"
                     + (f" (measured {by['int8']['rest_ms']:.2f})." if "int8" in by else "."))
    lines += ["", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundles", nargs="*", default=[str(WORK / b) for b in DEFAULT])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ort_cost.json"))
    ap.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    a = ap.parse_args(argv)
    paths = [Path(b) for b in a.bundles]
    missing = [str(p) for p in paths if not (p / "manifest.json").is_file()]
    if missing:
        print(f"error: no bundle at {', '.join(missing)}; run benchmarks/ort_decode.py first (it writes them)", file=sys.stderr)
        return 2
    threads = ort_decode.THREADS
    timed = ort_decode.time_bundles(paths, a.steps, a.repeats, log=print)
    rows = []
    for p, t in zip(paths, timed):
        floor, count, mb = weight_floor_ms(next(p.glob("*.onnx")), threads)
        rows.append({"bundle": p.name, "quantize": t["quantize"], "tokens_per_s": t["tokens_per_s"],
                     "ms_per_token": t["ms_per_token_median"], "weight_floor_ms": floor, "weight_matmuls": count,
                     "weight_mb": mb, "rest_ms": t["ms_per_token_median"] - floor,
                     "nodes_optimized": optimized_node_count(next(p.glob("*.onnx")), threads)})
        print(f"{p.name}: {t['ms_per_token_median']:.2f} ms/token, weight floor {floor:.2f} ms ({count} matmuls, {mb:.0f} MB)")
    rep = {"argv": (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(), "date": time.strftime("%Y-%m-%d"),
           "machine": machine_info(threads), "threads": threads, "onnxruntime": onnxruntime.__version__,
           "trivial_node_us": trivial_node_us(threads), "trivial_node_profiled_us": trivial_node_us(threads, profiled=True),
           "bundles": rows}
    fp32_path = next((p for p, r in zip(paths, rows) if r["quantize"] == "fp32"), None)
    if fp32_path is not None:
        rep["int8_kernel_floors_ms"] = int8_kernel_floors_ms(next(fp32_path.glob("*.onnx")), threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rep, indent=1))
    write_docs(Path(a.docs), docs_section(rep), BEGIN, END)
    print(docs_section(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
