"""`nectar export ART --format trt`: the TensorRT engine, built from the graph of trt_graph.py
with the `nectar::NectarAttention` plugin (kernels/trt_plugin.py).

    --format trt-onnx   writes the plugin graph only (model.onnx + data; no TensorRT needed)
    --format trt        also builds engine.plan (needs TensorRT >= 10.6, torch and triton, and the
                        GPU it will run on: Jetson with JetPack 7, or a datacenter GPU) — NOT RUN in
                        this repository's CI

The engine's optimization profile covers batch 1, up to max_local_len local tokens, up to CHUNK new
tokens a call.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from nectar_runtime import __version__
from nectar_runtime.bundle import BUNDLE_FORMAT_VERSION, BUNDLE_KIND
from nectar_runtime.errors import NectarError

from ..outdir import replace_dir, temp_dir_beside
from .bundle import DTYPES, GRAPH_FILE, ExportConfig, _save, graph_io, write_manifest, write_runtime_files

ENGINE_FILE = "engine.plan"
MIN_TRT = (10, 6)  # tensorrt.plugin (the Python plugin API of kernels/trt_plugin.py)
CHUNK = 64  # most new tokens one engine call takes (TrtBackend splits longer prompts)


def require_tensorrt():
    """The tensorrt module (>= 10.6), or a one-line error saying how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise NectarError(
            "--format trt needs TensorRT >= 10.6 (JetPack 7 on Jetson, or `pip install tensorrt` from NVIDIA's "
            "index on a GPU machine); it is not installed here. `--format trt-onnx` writes the plugin graph alone"
        ) from None
    version = tuple(int(x) for x in tensorrt.__version__.split(".")[:2])
    if version < MIN_TRT:
        raise NectarError(f"--format trt needs TensorRT >= 10.6 (its Python plugin API), found {tensorrt.__version__} "
                          "(JetPack 6 ships 10.3); upgrade TensorRT or use --format onnx")
    return tensorrt


def import_plugin():
    """Register nectar::NectarAttention with TensorRT (before parsing or deserializing)."""
    import importlib.util

    missing = [m for m in ("torch", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        raise NectarError(f"the TensorRT NectarAttention plugin runs a Triton kernel: install {' and '.join(missing)} with CUDA")
    import nectar_kernels.trt_plugin  # noqa: F401


def build_engine(proto, work: Path, max_local_len: int) -> Path:
    """Parse the plugin graph and build a serialized engine into `work/engine.plan`.

    The network is strongly typed: every tensor keeps the dtype the ONNX graph gives it (fp16
    bundles: fp16 weights and KV, fp32 attention math, as in ONNX Runtime), so no precision flags."""
    trt = require_tensorrt()
    import_plugin()

    graph = work / "trt_build.onnx"
    _save(proto, graph)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):  # reads the external weights next to the graph
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NectarError(f"TensorRT could not parse the Nectar graph: {errs[:300]}")
    config = builder.create_builder_config()
    # one profile, batch 1: T new tokens (<= CHUNK), P past tokens, S = P + T mask slots; opt = a
    # decode step halfway through a session (consistent shapes, T = 1); max: each dimension's bound
    m, half = max_local_len, max_local_len // 2
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        if inp.name in ("input_ids", "position_ids"):
            profile.set_shape(inp.name, (1, 1), (1, 1), (1, min(m, CHUNK)))
        elif inp.name == "attention_mask":
            profile.set_shape(inp.name, (1, 1), (1, half + 1), (1, m))
        else:  # past_key_values.*: [1, Hkv, P, D]
            h, d = inp.shape[1], inp.shape[3]
            profile.set_shape(inp.name, (1, h, 0, d), (1, h, half, d), (1, h, m, d))
    if config.add_optimization_profile(profile) < 0:
        raise NectarError("TensorRT refused the optimization profile (see its log above)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise NectarError("TensorRT failed to build the engine (see its log above)")
    out = work / ENGINE_FILE
    out.write_bytes(bytes(plan))
    graph.unlink()
    (work / (graph.name + ".data")).unlink(missing_ok=True)
    return out


def export_trt_bundle(art, out, cfg: ExportConfig, model: str | None = None, log=print, engine: bool = True) -> Path:
    """Write a TensorRT bundle (engine + plugin graph), or with engine=False the plugin graph only."""
    from nectar_export.pipeline import open_artifact

    from .trt_graph import build_trt_proto

    if cfg.method != "nectar":
        raise NectarError("--format trt exports Nectar bundles; for --method full use --format onnx (TensorRT's ONNX parser takes it as is)")
    if cfg.quantize:
        raise NectarError("--quantize is for ONNX Runtime bundles; TensorRT engines here are fp32/fp16")
    if engine:  # fail before any work
        require_tensorrt()
        import_plugin()
    t0 = time.perf_counter()
    out = Path(out)
    oa = open_artifact(art, model=model)
    proto = build_trt_proto(oa, DTYPES[cfg.dtype])
    plugin = sum(n.op_type == "NectarAttention" for n in proto.graph.node)
    retained = sum(n.op_type == "NectarRetainedAttention" for n in proto.graph.node)
    custom_ops = ["nectar::NectarAttention"] + (["nectar::NectarRetainedAttention"] if retained else [])
    log(f"[nectar export] TensorRT plugin graph: {plugin} NectarAttention + {retained} NectarRetainedAttention nodes, "
        f"{oa.base.config.num_layers - plugin - retained} layers in standard ops (sliding windows)")
    tmp = temp_dir_beside(out)
    try:
        _save(proto, tmp / GRAPH_FILE)
        if engine:
            log("[nectar export] building the TensorRT engine …")
            build_engine(proto, tmp, min(cfg.max_local_len, oa.base.config.max_position - oa.ctx.n))
        write_runtime_files(tmp, oa)
        mcfg = oa.base.config
        manifest = {
            "kind": BUNDLE_KIND, "format": "trt" if engine else "trt-onnx", "format_version": BUNDLE_FORMAT_VERSION,
            "tool_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": "nectar", "dtype": cfg.dtype, "quantize": None, "opset": proto.opset_import[0].version,
            "graph": {"file": ENGINE_FILE if engine else GRAPH_FILE, "onnx": GRAPH_FILE, **graph_io(proto),
                      "custom_ops": custom_ops, "node_names": "docs/onnx.md#node-names"},
            "context_len": oa.ctx.n, "max_local_len": min(cfg.max_local_len, mcfg.max_position - oa.ctx.n),
            "batch": 1,
            "model": {"family": mcfg.family, "num_layers": mcfg.num_layers, "num_kv_heads": mcfg.num_kv_heads,
                      "head_dim": mcfg.head_dim, "vocab_size": mcfg.vocab_size, "max_position": mcfg.max_position},
            "base_model": oa.manifest["base_model"], "document": oa.manifest["document"],
        }
        write_manifest(tmp, manifest)
        replace_dir(tmp, out, "bundle")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"[nectar export] wrote {out} in {time.perf_counter() - t0:.1f} s")
    return out
