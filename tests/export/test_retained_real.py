"""Retained heads on the real SmolLM2: `nectar fit --retain-heads` end to end (CLI), then ask, ONNX
export (checked against torch) and `nectar run` from the bundle."""

from __future__ import annotations

import json

import pytest

from tests.conftest import manual_path
from tests.runtime.test_cli import assert_one_line_error, nectar


@pytest.fixture(scope="module")
def retained_artifact(tmp_path_factory, smollm2_gguf):
    """A quick fit (as conftest's small_artifact: tiny probe set, few steps) with the default
    `--retain-heads auto` (18 heads on SmolLM2) of 256 document tokens each (a token budget below the
    excerpt's ~700 tokens)."""
    import torch

    from nectar_export.config import FitConfig
    from nectar_export.pipeline import fit_document, load_base
    from nectar_export.probes import ProbeConfig

    d = tmp_path_factory.mktemp("retained")
    doc = d / "doc.txt"
    doc.write_text(open(manual_path()).read()[:3000], "utf-8")
    torch.manual_seed(0)
    probe_cfg = ProbeConfig(templated_questions=4, model_questions=2, excerpts=2, chains=1,
                            max_answer_tokens=16, min_position_span=64, batch_size=8)
    lines = []
    fit_document(load_base(str(smollm2_gguf)), doc, d / "art", FitConfig(steps=20, probe_steps=5, retain_tokens=256),
                 probe_cfg, progress=False, log=lines.append)
    return d / "art", "\n".join(lines)


@pytest.mark.real
def test_fit_cli_refuses_bad_retain_heads(retained_artifact, smollm2_gguf, tmp_path):
    doc = retained_artifact[0] / "document.txt"
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(tmp_path / "a"), "--retain-heads", "91")
    assert_one_line_error(r, "--retain-heads 91", "90 KV heads")
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(tmp_path / "b"), "--retain-heads", "2",
               "--variant", "quadrature")
    assert_one_line_error(r, "--retain-heads needs the mlp variant")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.real
def test_fit_with_retained_heads_writes_them_within_the_budget(retained_artifact):
    art, out = retained_artifact
    assert sorted(p.name for p in art.iterdir()) == ["document.txt", "heads.safetensors", "manifest.json", "retained.safetensors"]
    m = json.loads((art / "manifest.json").read_text())
    ret = m["retained"]
    assert len(ret["modules"]) == 18 and ret["dtype"] == "int8" and m["fit_config"]["retain_heads"] == 18
    assert len({tuple(x) for x in ret["modules"]}) == 18 and all(0 <= l < 30 and 0 <= j < 3 for l, j in ret["modules"])
    n_doc = m["document"]["n_tokens"] - m["document"]["prefix_tokens"]
    assert n_doc > 256 and ret["tokens"] == 256 and m["fit_config"]["retain_tokens"] == 256
    # int8 keys and values + an fp16 scale per token and head, and the kept tokens' int32 indices
    assert ret["bytes"] == 18 * 256 * (2 * (64 + 2) + 4)
    assert 0 < ret["heldout_error"]["o"] < 1 and ret["heldout_error"]["lse"] >= 0
    files = (art / "heads.safetensors").stat().st_size + (art / "retained.safetensors").stat().st_size
    assert m["artifact_bytes"] == files <= 0.25 * m["kv_bytes"]  # the retained KV counts in the default budget
    assert 0 < ret["heldout_error_mass_share"] <= 1
    assert "18 KV heads retained (int8 document KV" in out and f"256 of {n_doc} document tokens each" in out


@pytest.mark.real
def test_retained_artifact_answers_and_exports_to_a_matching_onnx_bundle(retained_artifact, tmp_path):
    art, _ = retained_artifact
    r = nectar("ask", str(art), "What does sed do?", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    b = tmp_path / "bundle"
    r = nectar("export", str(art), "--format", "onnx", "--out", str(b))
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((b / "manifest.json").read_text())["export_check"]
    assert check["max_abs_logit_diff"] <= 1e-3 and check["top1_agreement"] == 1.0, check
    r = nectar("run", str(b), "--chat", "What does sed do?", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    # int4: the retained heads' int8 KV as MatMulNBits columns (checked against torch fp32 at export)
    q = tmp_path / "bundle_int4"
    r = nectar("export", str(art), "--format", "onnx", "--quantize", "int4", "--out", str(q))
    assert r.returncode == 0, r.stderr[-2000:]
    check = json.loads((q / "manifest.json").read_text())["export_check"]
    assert check["top1_agreement"] >= 0.8 and check["mean_kl"] <= 0.05, check
    import onnx

    ops = [n.name for n in onnx.load(str(q / "model.onnx"), load_external_data=False).graph.node]
    assert sum(n.endswith("/scores/MatMulNBits8") and "/retained/" in n for n in ops) == 18
    r = nectar("run", str(q), "--chat", "What does sed do?", "--max-new-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.real
def test_retained_artifact_plugin_graph_matches_torch(retained_artifact, tmp_path):
    """`nectar export --format trt-onnx` of the real artifact with retained heads: one plugin node per layer
    (NectarRetainedAttention where heads are retained, their int8 KV decoded), and the graph, run with the
    plugins' references, matches the torch backend over the export check's prompt."""
    import onnx

    from nectar_export.export.bundle import CHECK_QUESTION, compare_backends
    from nectar_export.pipeline import open_artifact
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.document import local_ids
    from tests.export.test_trt_graph import PluginGraphBackend

    art, _ = retained_artifact
    r = nectar("export", str(art), "--format", "trt-onnx", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr[-2000:]
    proto = onnx.load(str(tmp_path / "g" / "model.onnx"))
    m = json.loads((art / "manifest.json").read_text())
    retained_layers = {l for l, _ in m["retained"]["modules"]}
    ops = {n.name.split("/")[2]: n.op_type for n in proto.graph.node if n.op_type.startswith("Nectar")}
    assert len(ops) == 30 and {int(k.split(".")[1]) for k, v in ops.items() if v == "NectarRetainedAttention"} == retained_layers
    assert "nectar::NectarRetainedAttention" in json.loads((tmp_path / "g" / "manifest.json").read_text())["graph"]["custom_ops"]

    oa = open_artifact(art)
    prompt = local_ids(oa.ctx, oa.base.tokenizer, [{"role": "user", "content": CHECK_QUESTION}])
    check = compare_backends(TorchBackend(oa.base.model, oa.contexts(), oa.ctx.n), PluginGraphBackend(proto), prompt,
                             oa.ctx.n, 3)
    assert check["max_abs_logit_diff"] <= 1e-3 and check["top1_agreement"] == 1.0, check
