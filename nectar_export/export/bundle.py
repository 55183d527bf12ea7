"""`nectar export ART --format onnx`: artifact (+ its base model) -> a bundle directory.

The bundle is written into a temp dir beside `out` and renamed into place only when complete and
(unless `ExportConfig.check` is off: `--no-check`) checked: its graph is run on ONNX Runtime against the
torch backend on a probe question, the result (max |Δlogit|, top-1 agreement, mean KL) is recorded in the
manifest, and a warning is printed when the answers depart (`check_warning`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nectar_runtime import __version__
from nectar_runtime.backends.ort_backend import min_onnxruntime
from nectar_runtime.bundle import BUNDLE_FORMAT_VERSION, BUNDLE_KIND, MANIFEST, sha256_file
from nectar_runtime.errors import NectarError

from ..outdir import replace_dir, temp_dir_beside

METHODS = ("nectar", "full")
# A Nectar heads weight below this many fp32 bytes stays fp32 in quantized bundles: there one
# batched fp32 MatMul is faster than Split + one 8-bit MatMulNBits per KV head + Concat (on a 2-core
# AVX2 EPYC, 30 layers' [3, K, K] weights: 8-bit took 1.46x the fp32 time at 197 KB and 0.77x at
# 442 KB; `python benchmarks/heads_matmul_rate.py --break-even`, benchmarks/results/heads_break_even.json).
# With the 8-bit heads in blocks of 128 (HEADS_BLOCK below) the floor stays between the same two sizes:
# 1.16x at 197 KB, 0.58x at 442 KB (`… --break-even --heads-block 128`, heads_break_even_block128.json).
HEADS_MIN_BYTES = 256 * 1024
# Bits of those heads weights per --quantize kind. 8 in every kind: 4-bit heads (ExportConfig(heads_bits=4))
# cut an int4 bundle's decode time by 4-9% on a 2-core CPU but raised its KL to the fp32 bundle 2.2-4.5x
# (n = 7,000: 18.17 -> 16.57 ms per token, KL 0.0028 -> 0.0127), as large as the heads' own KL after
# retention (docs/benchmarks.md, "4-bit heads").
HEADS_BITS = {"int8": 8, "int4": 8, "int4-rtn": 8}
# Inputs per block of those 8-bit heads weights (at most the largest power of two <= K). A KV head's
# matmul has G = 3 query rows, and ORT's int8 kernel for 3 rows ran 1.5x faster with blocks of 64 or 128
# than of 32 (chains of 30 640-wide matmuls, 2-core AVX2 EPYC, benchmarks/nbits_block_rate.py). A whole
# n = 7,000 default int4 bundle, with retained values in blocks of 64 too, decoded 0.65 ms (4.6%) faster
# per token at equal KL to the fp32 bundle (docs/benchmarks.md, "Larger blocks for the 8-bit heads").
HEADS_BLOCK = 128
DTYPES = {"fp32": np.float32, "fp16": np.float16}
QUANTIZE = ("int8", "int4", "int4-rtn")
GRAPH_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


@dataclass(frozen=True)
class ExportConfig:
    method: str = "nectar"
    dtype: str = "fp32"
    quantize: str | None = None
    max_local_len: int = 4096
    # with `quantize`: the Nectar heads' weights at 8 bits too (quantize.py); False keeps them fp32.
    # Python API only (`nectar export` always quantizes them): benchmarks/default_heads_cpu.py measures both.
    quantize_heads: bool = True
    # ... those weights of at least this many fp32 bytes (HEADS_MIN_BYTES above)
    heads_min_bytes: int = HEADS_MIN_BYTES
    # ... at this many bits (4 or 8; Python API only); None: HEADS_BITS of the --quantize kind
    heads_bits: int | None = None
    # ... in blocks of this many inputs (HEADS_BLOCK; Python API only)
    heads_block: int = HEADS_BLOCK
    # ... the score networks' middle and output weights (`w2_lse`, `w3_lse`) too; False keeps them fp32: the
    # output column at 8 bits carried most of Gemma 3 270M's int4/int8 KL to the fp32 bundle (0.057 -> 0.012
    # over 512 answer tokens). Python API only, for A/B runs (docs/benchmarks.md, "The score network").
    quantize_lse: bool = False
    # with `quantize`: ONNX Runtime's fused RotaryEmbedding / SkipSimplifiedLayerNormalization
    # (decoder_graph.py, `ort_fused`); the quantized graph is ORT-only anyway. Python API only, for A/B runs.
    ort_fused: bool = True
    # with `quantize` and a GGUF base model: keep each weight on the GGUF's own quantization grid where
    # the kind allows (quantize.weight_form; int4: exact Q4_0/Q4_1/Q4_K at 4 bits, Q5_0/Q6_K/Q8_0 at 8).
    # False rounds the dequantized weights instead. Python API only, for A/B runs.
    source_grids: bool = True
    # with `quantize`: MatMulNBits' accuracy_level (4: ORT's CPU kernels round activations to int8 per block
    # and use integer dot products; 0: fp32 activations, far slower on CPUs). Python API only, for A/B runs.
    accuracy_level: int = 4
    check: bool = True  # run the exported graph against the torch backend before renaming it into place

    def __post_init__(self):
        if self.method not in METHODS:
            raise NectarError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise NectarError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.quantize not in (None, *QUANTIZE):
            raise NectarError(f"--quantize {self.quantize!r}: use one of {', '.join(QUANTIZE)}")
        if self.quantize and self.dtype != "fp32":
            raise NectarError("--quantize applies to fp32 bundles (activations stay fp32); drop --dtype fp16")
        if self.heads_block not in (16, 32, 64, 128, 256):
            raise NectarError(f"ExportConfig.heads_block = {self.heads_block}: use a power of two from 16 to 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise NectarError(f"ExportConfig.accuracy_level = {self.accuracy_level}: use 0 to 4 (MatMulNBits)")
        if self.heads_bits not in (None, 4, 8):
            raise NectarError(f"ExportConfig.heads_bits = {self.heads_bits}: use 4, 8 or None (the --quantize kind's default)")
        if self.max_local_len < 16:
            raise NectarError("--max-local-len must be at least 16")


def torch_document_contexts(oa, method: str) -> list:
    """What stands for the document in the torch model, per layer: its exact KV (prefilled once,
    then shared by the graph and the export check) or the artifact's prefix + heads."""
    if method == "full":
        import torch

        ids = torch.tensor([list(oa.ctx.context_ids)], device=oa.base.model.embed_tokens.weight.device)
        return oa.base.model.prefill_document(ids).contexts()
    return oa.contexts()


def graph_form(cfg: ExportConfig, attention_op=None) -> dict:
    """The manifest keys that say how a bundle's graph was written from its artifact (beyond
    method/dtype/quantize): benchmarks compare them to re-export bundles of another form."""
    heads = bool(cfg.quantize) and cfg.quantize_heads
    return {"ort_fused": uses_ort_fused(cfg, attention_op),
            "heads_min_bytes": cfg.heads_min_bytes if heads else None,
            "heads_bits": heads_bits(cfg) if heads else None,
            "heads_block": cfg.heads_block if heads else None,
            # the score network's weights, as configured: those whose target-network twin (`w2`, `w3`) is
            # under heads_min_bytes stay fp32 whatever this says
            "lse_bits": (heads_bits(cfg) if cfg.quantize_lse else 32) if heads else None,
            # MLP heads in ONNX graphs: the score network in its own matmuls beside the target network's
            # (since 2026-11-25; before, one block-diagonal middle and output matmul held both)
            "heads_form": "separate_score_network" if cfg.method == "nectar" and attention_op is None else None,
            # how int4 applies a Q4_1 block's float zero point (quantize.py): its residual as 4-bit
            # digits over the input's block sums, inside the weight's own MatMulNBits
            "int4_offsets": "block_sum_digits" if cfg.quantize == "int4" else None,
            "source_grids": cfg.source_grids if cfg.quantize else None,
            "accuracy_level": cfg.accuracy_level if cfg.quantize else None}  # of the weight and heads MatMulNBits


def heads_bits(cfg: ExportConfig) -> int:
    """Bits of the quantized Nectar heads weights in a `cfg.quantize` bundle."""
    return cfg.heads_bits or HEADS_BITS[cfg.quantize]


def uses_ort_fused(cfg: ExportConfig, attention_op=None) -> bool:
    """Whether the graph takes ORT's fused contrib ops (decoder_graph.DecoderGraphWriter `ort_fused`):
    quantized bundles (ORT-only anyway), unless turned off or a custom attention op is used."""
    return bool(cfg.quantize) and cfg.ort_fused and attention_op is None


def build_decoder_proto(oa, cfg: ExportConfig, document_contexts: list, attention_op=None):
    """The decoder ModelProto for an opened artifact (nectar_export.pipeline.OpenArtifact);
    `document_contexts` from `torch_document_contexts` (used by --method full)."""
    from .decoder_graph import DecoderGraphWriter
    from .from_model import decoder_weights, full_contexts, graph_spec, nectar_contexts_for_export

    model = oa.base.model
    if cfg.method == "full":
        contexts = full_contexts(document_contexts)
    else:
        contexts = nectar_contexts_for_export(model, oa.ctx, oa.heads, oa.retained)
    writer = DecoderGraphWriter(graph_spec(model, oa.ctx.n), decoder_weights(model), contexts,
                                DTYPES[cfg.dtype], attention_op=attention_op,
                                ort_fused=uses_ort_fused(cfg, attention_op))
    return writer.build(f"nectar_{cfg.method}_decoder")


def quantize_proto(proto, cfg: ExportConfig, grids: dict | None = None, sources: dict | None = None) -> dict:
    """Weight-only `cfg.quantize` (MatMulNBits) of the 2-D weight matmuls and, with
    `cfg.quantize_heads`, of the Nectar heads weights of at least `cfg.heads_min_bytes` (at
    `heads_bits(cfg)`), in place; returns {MatMul node name: bits}. `grids`: the base GGUF's
    quantization grids under the graph's weight names (`source_grids`), `sources` gets
    {weight name: GGUF type} of the weights kept on them. See quantize.py."""
    from .quantize import quantize_graph

    return quantize_graph(proto, cfg.quantize, accuracy_level=cfg.accuracy_level, heads=cfg.quantize_heads,
                          heads_min_bytes=cfg.heads_min_bytes, heads_bits=heads_bits(cfg), heads_block=cfg.heads_block, heads_lse=cfg.quantize_lse,
                          grids=grids if cfg.source_grids else None, sources=sources)


def base_model_grids(lm) -> dict:
    """{graph weight name: QuantGrid} of a GGUF base model (nectar_models.loading.LoadedModel), {} for others."""
    from nectar_models.loading import read_gguf_weight_grids

    from .from_model import decoder_grids

    if lm.source_format != "gguf":
        return {}
    return decoder_grids(read_gguf_weight_grids(lm.path), lm.model)


def grids_summary(done: dict, sources: dict) -> dict:
    """What the manifest says of the model weights' quantization: how many kept the GGUF's own grid, by type."""
    weights = sum(1 for name in done if "/nectar_heads/" not in name)
    types: dict[str, int] = {}
    for t in sources.values():
        types[t] = types.get(t, 0) + 1
    return {"weights": weights, "on_source_grid": len(sources), "types": dict(sorted(types.items()))}


def write_runtime_files(tmp: Path, oa) -> None:
    """What the runtime reads beside the graph: tokenizer, chat template, the document itself."""
    oa.base.tokenizer.to_json(tmp)
    if oa.base.tokenizer.chat_template:
        (tmp / "chat_template.jinja").write_text(oa.base.tokenizer.chat_template, "utf-8")
    (tmp / "document.txt").write_bytes(oa.ctx.text.encode("utf-8"))  # byte for byte (CRLF kept)


def write_manifest(tmp: Path, manifest: dict) -> None:
    """The manifest, with the size and sha256 of every file written so far (the runtime checks them)."""
    manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                         for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _save(proto, path: Path) -> None:
    """Save with weights as external data (`<file>.data`); `proto` itself is left unchanged."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # save_model moves tensors to external data in place
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def graph_io(proto) -> dict:
    from onnx import TensorProto

    def desc(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": TensorProto.DataType.Name(t.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in proto.graph.input], "outputs": [desc(v) for v in proto.graph.output]}


def export_onnx_bundle(art: str | Path, out: str | Path, cfg: ExportConfig, model: str | None = None,
                       log=print, attention_op=None, extra_manifest: dict | None = None) -> Path:
    """Write the bundle for artifact `art` into `out` (atomically). Returns `out`."""
    from nectar_export.pipeline import open_artifact

    t0 = time.perf_counter()
    out = Path(out)
    oa = open_artifact(art, model=model)
    mcfg = oa.base.config
    max_local = min(cfg.max_local_len, mcfg.max_position - oa.ctx.n)
    if max_local < cfg.max_local_len:
        log(f"[nectar export] local window: {max_local} tokens, not {cfg.max_local_len}: the model's {mcfg.max_position} "
            f"positions minus the document's {oa.ctx.n}")
    log(f"[nectar export] building the {cfg.method} graph ({mcfg.num_layers} layers, document n={oa.ctx.n}) …")
    document_contexts = torch_document_contexts(oa, cfg.method)
    proto = build_decoder_proto(oa, cfg, document_contexts, attention_op)
    heads_quantized, quantized_weights = False, None
    if cfg.quantize:
        log(f"[nectar export] quantizing weights to {cfg.quantize} …")
        sources: dict = {}
        done = quantize_proto(proto, cfg, base_model_grids(oa.base.lm) if cfg.source_grids else None, sources)
        heads_quantized = any("/nectar_heads/" in name for name in done)
        quantized_weights = grids_summary(done, sources)
        if sources:
            rest = quantized_weights["weights"] - len(sources)
            log(f"[nectar export] {len(sources)} of {quantized_weights['weights']} weight matmuls keep the GGUF's own "
                f"codes ({', '.join(f'{t} {c}' for t, c in quantized_weights['types'].items())})"
                + (f"; {rest} are rounded to {cfg.quantize}" if rest else ""))
    tmp = temp_dir_beside(out)
    try:
        log("[nectar export] writing graph and weights …")
        _save(proto, tmp / GRAPH_FILE)
        write_runtime_files(tmp, oa)
        manifest = {
            "kind": BUNDLE_KIND,
            "format": "onnx",
            "format_version": BUNDLE_FORMAT_VERSION,
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "method": cfg.method,
            "dtype": cfg.dtype,
            "quantize": cfg.quantize,
            "quantize_heads": heads_quantized,  # some Nectar MLP heads' weights are 8-bit in this graph
            # model weight matmuls quantized, and how many of them hold the base GGUF's own codes
            "quantized_weights": quantized_weights if cfg.quantize else None,
            **graph_form(cfg, attention_op),  # ort_fused (com.microsoft RoPE / residual norms), heads_min_bytes
            "opset": proto.opset_import[0].version,
            "min_onnxruntime": min_onnxruntime({"quantize": cfg.quantize}),  # measured: benchmarks/ort_versions.py
            "graph": {"file": GRAPH_FILE, "weights": DATA_FILE, **graph_io(proto),
                      "node_names": "docs/onnx.md#node-names"},
            "context_len": oa.ctx.n,
            "max_local_len": max_local,
            "model": {"family": mcfg.family, "num_layers": mcfg.num_layers, "num_kv_heads": mcfg.num_kv_heads,
                      "head_dim": mcfg.head_dim, "hidden_size": mcfg.hidden_size, "vocab_size": mcfg.vocab_size,
                      "max_position": mcfg.max_position},
            "base_model": oa.manifest["base_model"],
            "document": oa.manifest["document"],
            "artifact": {"variant": oa.manifest["variant"], "widths": oa.manifest["widths"],
                         "artifact_bytes": oa.manifest["artifact_bytes"], "kv_bytes": oa.manifest["kv_bytes"]},
            **(extra_manifest or {}),
        }
        if cfg.check:
            log("[nectar export] checking the graph against the torch backend …")
            manifest["export_check"] = check_against_torch(oa, tmp / GRAPH_FILE, document_contexts)
            log(f"[nectar export] check: {manifest['export_check']}")
            if warning := check_warning(manifest["export_check"], cfg):
                log(warning)
        write_manifest(tmp, manifest)
        replace_dir(tmp, out, "bundle")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"[nectar export] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return out


CHECK_QUESTION = "Summarize the first section in one sentence."
# Beyond these the bundle's answers visibly differ from the torch backend's: say so at export. Measured (16 tokens):
# SmolLM2 (Q4_1 GGUF) int4 top-1 0.94-1.00, KL 0.002-0.004; int8 top-1 0.88-0.94, KL 0.002 (a flipped near-tie
# is 0.06 of top-1, so top-1 alone is a poor sign); int4-rtn top-1 0.81, KL 0.18-0.23; Gemma 3 270M (Q4_K_M GGUF)
# int4 rounded from floats top-1 0.50-0.62, KL 0.37-0.79 (on the GGUF's own codes since 2026-11-25: 1.00, 0.005-0.006;
# benchmarks/results/gguf_grids_cpu.json).
CHECK_WARN_TOP1, CHECK_WARN_KL = 0.8, 0.05


def check_warning(check: dict, cfg: ExportConfig) -> str | None:
    """A warning line when the export check shows the bundle's answers departing from the torch backend's."""
    if check["top1_agreement"] >= CHECK_WARN_TOP1 and check["mean_kl"] <= CHECK_WARN_KL:
        return None
    instead = {"int4": "--quantize int8", "int4-rtn": "--quantize int4 or int8", "int8": "no --quantize (fp32)"}.get(
        cfg.quantize or "", "--dtype fp32")
    return (f"[nectar export] warning: this bundle's next tokens differ from the torch backend's (top-1 agreement "
            f"{check['top1_agreement']:.2f}, KL {check['mean_kl']:.3f} over {check['tokens']} tokens; above "
            f"{CHECK_WARN_TOP1} and below {CHECK_WARN_KL} is usual): its answers will change; {instead} keeps them closer")


def check_against_torch(oa, graph: Path, document_contexts: list, new_tokens: int = 16) -> dict:
    """Greedy decode with the torch backend over `document_contexts`, teacher-force the same
    tokens through the graph: max |Δlogit|, top-1 agreement and KL per step."""
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.document import local_ids

    tb = TorchBackend(oa.base.model, document_contexts, oa.ctx.n)
    ob = OrtBackend.from_graph(graph, oa.ctx.n, oa.base.config.max_position - oa.ctx.n, threads=None)
    prompt = local_ids(oa.ctx, oa.base.tokenizer, [{"role": "user", "content": CHECK_QUESTION}])
    return compare_backends(tb, ob, prompt, oa.ctx.n, new_tokens)


def compare_backends(ref, other, prompt: list[int], context_len: int, new_tokens: int) -> dict:
    """Teacher-forced over `ref`'s greedy tokens: max |Δlogit|, top-1 agreement, mean KL(ref‖other)."""
    ids = np.array([prompt], dtype=np.int64)
    pos = context_len + np.arange(len(prompt), dtype=np.int64)[None]
    ref.reset(1, len(prompt) + new_tokens)
    other.reset(1, len(prompt) + new_tokens)
    diffs, agree, kls = [], [], []
    for _ in range(new_tokens):
        a = np.asarray(ref.step(ids, pos), dtype=np.float64)
        b = np.asarray(other.step(ids, pos), dtype=np.float64)
        diffs.append(float(np.abs(a - b).max()))
        agree.append(bool(a.argmax() == b.argmax()))
        la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
        lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
        kls.append(float((np.exp(la) * (la - lb)).sum()))
        nxt = int(a[0].argmax())
        pos = pos[:, -1:] + 1
        ids = np.array([[nxt]], dtype=np.int64)
    return {"tokens": new_tokens, "max_abs_logit_diff": max(diffs), "top1_agreement": float(np.mean(agree)),
            "mean_kl": float(np.mean(kls))}
