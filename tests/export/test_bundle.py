"""`nectar export --format onnx` on the real SmolLM2 artifact, the bundle on ONNX Runtime against
the torch backend, `nectar run`, and the bundle's bad-input paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import manual_path
from tests.runtime.test_cli import assert_one_line_error, nectar

pytestmark = pytest.mark.real


@pytest.fixture(scope="session")
def bundles(small_artifact, tmp_path_factory):
    from nectar_export.export.bundle import ExportConfig, export_onnx_bundle

    art, _ = small_artifact
    d = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, cfg in {"nectar": ExportConfig(), "full": ExportConfig(method="full"),
                      "int8": ExportConfig(quantize="int8", heads_min_bytes=0), "int4": ExportConfig(quantize="int4")}.items():
        out[name] = export_onnx_bundle(art, d / name, cfg, log=lambda s: None)
    return art, out


def _questions(k=3):
    with open(manual_path().replace(".txt", ".questions.jsonl")) as f:
        return [json.loads(line)["question"] for line in f][:k]


def test_bundle_layout_and_manifest(bundles):
    _, b = bundles
    m = json.loads((b["nectar"] / "manifest.json").read_text())
    assert sorted(p.name for p in b["nectar"].iterdir()) == sorted(
        ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "document.txt"])
    assert m["method"] == "nectar" and m["opset"] >= 17 and m["dtype"] == "fp32"
    assert set(m["files"]) == {p.name for p in b["nectar"].iterdir()} - {"manifest.json"}
    ins = [i["name"] for i in m["graph"]["inputs"]]
    assert ins[:3] == ["input_ids", "position_ids", "attention_mask"] and "past_key_values.29.value" in ins
    assert m["export_check"]["max_abs_logit_diff"] <= 1e-3
    # pinned IR version: onnx >= 1.23 writes IR 14 by default, which ONNX Runtime 1.30 (and JetPack's) refuses
    from nectar_export.export.graph_builder import IR_VERSION

    for kind in ("nectar", "full", "int8", "int4"):
        assert onnx_load(b[kind] / "model.onnx").ir_version == IR_VERSION == 9
        # the oldest onnxruntime that runs it (benchmarks/ort_versions.py), checked by the runtime at load
        want = "1.23" if kind in ("int8", "int4") else "1.16"
        assert json.loads((b[kind] / "manifest.json").read_text())["min_onnxruntime"] == want
    # no document KV anywhere in a Nectar bundle: its weights are the model + heads + 24 prefix tokens
    full_bytes = (b["full"] / "model.onnx.data").stat().st_size
    nectar_bytes = (b["nectar"] / "model.onnx.data").stat().st_size
    doc_kv_fp32 = 2 * 30 * 3 * 64 * 4 * (m["context_len"] - m["document"]["prefix_tokens"])
    assert full_bytes - nectar_bytes > 0.7 * doc_kv_fp32


@pytest.mark.parametrize("method", ["nectar", "full"])
def test_ort_matches_torch_over_64_greedy_tokens(bundles, method):
    from nectar_export.export.bundle import compare_backends
    from nectar_export.pipeline import open_artifact
    from nectar_runtime.backends.ort_backend import OrtBackend
    from nectar_runtime.backends.torch_backend import TorchBackend
    from nectar_runtime.bundle import read_bundle
    from nectar_runtime.document import local_ids
    from nectar_runtime.generate import GenerationConfig, generate_ids

    art, b = bundles
    oa = open_artifact(art)
    model = oa.base.model
    if method == "full":
        import torch

        contexts = model.prefill_document(torch.tensor([list(oa.ctx.context_ids)])).contexts()
    else:
        contexts = oa.contexts()
    ref = TorchBackend(model, contexts, oa.ctx.n)
    ort_b = OrtBackend.from_bundle(read_bundle(b[method]), threads=2)
    for q in _questions():
        prompt = local_ids(oa.ctx, oa.base.tokenizer, [{"role": "user", "content": q}])
        r = compare_backends(ref, ort_b, prompt, oa.ctx.n, 64)
        assert r["max_abs_logit_diff"] <= 1e-3, (q, r)
        cfg = GenerationConfig(max_new_tokens=64)
        eos = set(oa.base.tokenizer.eos_token_ids)
        a = [int(t[0]) for t in generate_ids(ref, [prompt], cfg, eos)]
        c = [int(t[0]) for t in generate_ids(ort_b, [prompt], cfg, eos)]
        assert a == c, q


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_bundles_track_fp32(bundles, kind):
    m = json.loads((bundles[1][kind] / "manifest.json").read_text())
    chk = m["export_check"]
    assert m["quantize"] == kind and chk["top1_agreement"] >= 0.8 and chk["mean_kl"] < 0.05, chk
    assert json.loads((bundles[1]["nectar"] / "manifest.json").read_text())["quantize_heads"] is False
    # int8: every heads weight at 8 bits (heads_min_bytes=0); int4: the exporter's default floor —
    # heads weights under HEADS_MIN_BYTES of fp32 stay fp32, the others are 8-bit per KV head
    from nectar_export.export.bundle import HEADS_MIN_BYTES

    def heads_weights(bundle):
        g = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
        return g, {t.name: 4 * int(np.prod(t.dims)) for t in g.initializer if ".nectar_heads.w" in t.name}

    _, ref = heads_weights(bundles[1]["nectar"])
    g, have = heads_weights(bundles[1][kind])
    floor = 0 if kind == "int8" else HEADS_MIN_BYTES
    # the score networks past the shared input matmul (`w2_lse`, `w3_lse`) stay fp32 in every kind
    small = {n for n, b in ref.items() if b < floor or n.endswith("_lse")}
    assert {n for n in have if ".q8" not in n} == small
    assert {n.split(".head")[0] for n in have if n.endswith(".q8")} == set(ref) - small
    assert m["quantize_heads"] is (len(small) < len(ref)) and m["heads_min_bytes"] == floor
    if kind == "int4":
        assert small, "the small artifact no longer has heads weights below the floor: this test checks nothing there"
    assert {"MatMulNBits", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= {n.op_type for n in g.node}  # ORT-fused form
    assert m["ort_fused"] is True and json.loads((bundles[1]["nectar"] / "manifest.json").read_text())["ort_fused"] is False
    fp32 = (bundles[1]["nectar"] / "model.onnx.data").stat().st_size
    assert (bundles[1][kind] / "model.onnx.data").stat().st_size < 0.6 * fp32
    # the SmolLM2 GGUF's own codes: int4 keeps all (Q4_1 layers, the Q8_0 LM head), int8 the Q8_0 LM head
    qw = m["quantized_weights"]
    assert qw["weights"] == 4 * 30 + 1 and m["source_grids"] is True
    assert qw["types"] == ({"Q4_1": 120, "Q8_0": 1} if kind == "int4" else {"Q8_0": 1}), qw


def test_nectar_run_answers_from_the_full_bundle(bundles):
    r = nectar("run", str(bundles[1]["full"]), "--chat", "What does sed stand for?", "--max-new-tokens", "24", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 5


def test_nectar_chat_multi_turn_and_reset(bundles):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "nectar_runtime.cli", "chat", str(bundles[1]["full"]), "--max-new-tokens", "12",
                        "--threads", "2"], input="What is sed?\nAnd grep?\n/reset\n/rest\n/help\n/etc/sed.conf is what?\n/exit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "(conversation cleared)" in r.stderr and r.stdout.count("> ") >= 6
    assert "unknown command /rest; /reset clears" in r.stderr  # a typo is not sent to the model as a question
    answers = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(answers) == 3  # What is sed?, And grep? and the path question: /rest and /help got no answer


def _copy(src, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def test_bad_bundles_give_one_line_errors(bundles, tmp_path):
    src = bundles[1]["nectar"]
    r = nectar("run", str(tmp_path), "--chat", "hi")
    assert_one_line_error(r, "not a Nectar bundle")
    assert_one_line_error(nectar("run", str(bundles[0]), "--chat", "hi"), "is a Nectar artifact", "nectar export")
    (tmp_path / "notes.txt").write_text("hi")
    assert_one_line_error(nectar("run", str(tmp_path / "notes.txt"), "--chat", "hi"), "is a file, not a bundle directory")

    b = _copy(src, tmp_path)
    (b / "model.onnx.data").unlink()
    assert_one_line_error(nectar("run", str(b), "--chat", "hi"), "model.onnx.data missing")

    shutil.rmtree(b)
    b = _copy(src, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(nectar("run", str(b), "--chat", "hi"), "format_version 99")

    shutil.rmtree(b)
    b = _copy(src, tmp_path)
    with open(b / "model.onnx.data", "r+b") as f:  # flip one weight byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert_one_line_error(nectar("run", str(b), "--chat", "hi"), "model.onnx.data", "sha256")

    assert_one_line_error(nectar("run", str(src), "--chat", "word " * 5000), "does not fit", "at most 4096")


def test_export_refuses_bad_input(small_artifact, tmp_path):
    art, _ = small_artifact
    assert_one_line_error(nectar("export", str(tmp_path), "--out", str(tmp_path / "x")), "artifact")
    assert_one_line_error(nectar("export", str(art), "--out", str(tmp_path / "x"), "--dtype", "fp16", "--quantize", "int4"), "quantize")
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".x.") for p in tmp_path.iterdir())  # no temp dir left behind


def test_failed_export_leaves_nothing(small_artifact, tmp_path, monkeypatch):
    import nectar_export.export.bundle as bundle

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundle, "check_against_torch", boom)
    with pytest.raises(RuntimeError):
        bundle.export_onnx_bundle(small_artifact[0], tmp_path / "out", bundle.ExportConfig(), log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_documented_python_api_runs_without_torch_imports(bundles):
    """docs/deploy.md's Python API snippet, as written (only the bundle path and thread count
    replaced), on the int4 Nectar bundle in a fresh interpreter that never imports torch or onnx."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    snippet = re.search(r"<!-- python-api:begin -->\n```python\n(.*?)```\n<!-- python-api:end -->", doc, re.S).group(1)
    assert 'nr.open_bundle("grep.int4", threads=4)' in snippet
    snippet = snippet.replace('"grep.int4", threads=4', f"{str(bundles[1]['int4'])!r}, threads=2")
    code = snippet + ("\nimport sys\nbad = [m for m in ('torch', 'onnx', 'transformers') if m in sys.modules]\n"
                      "assert not bad, bad\nassert assistant.history == []\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(r.stdout) > 40 and "Traceback" not in r.stderr
    assert lines[-1].startswith("refused: prompt of ") and "local tokens" in lines[-1]  # the window, named
    _ = np  # numpy is the runtime's array type


@pytest.mark.slow
def test_runtime_runs_a_bundle_in_a_venv_without_torch(bundles, tmp_path):
    """A fresh virtual environment with only the runtime's dependencies (no torch, no onnx):
    `nectar run` answers from a bundle, and the exporter's commands say what to install."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    deps = ["numpy", "tokenizers", "jinja2", "onnxruntime", "gguf", "tqdm"]
    r = subprocess.run(pip + deps, capture_output=True, text=True, timeout=900)
    if r.returncode:
        pytest.skip(f"cannot install the runtime's dependencies from PyPI here: {r.stderr.strip()[-200:]}")
    subprocess.run(pip + ["--no-deps", str(repo)], check=True, timeout=900, capture_output=True)
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0  # truly absent
    r = subprocess.run([str(venv / "bin" / "nectar"), "run", str(bundles[1]["full"]), "--chat", "What is sed?",
                        "--max-new-tokens", "16", "--threads", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 5
    r = subprocess.run([str(venv / "bin" / "nectar"), "fit", str(repo / "README.md"), "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "nectar-attention[export]" in r.stderr and "Traceback" not in r.stderr


def test_trt_formats_from_the_cli(small_artifact, tmp_path):
    """trt-onnx writes the plugin graph (checked); trt needs TensorRT and says so when it is absent."""
    import importlib.util

    art, _ = small_artifact
    r = nectar("export", str(art), "--format", "trt-onnx", "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    proto = onnx_load(tmp_path / "g" / "model.onnx")
    # every layer is one plugin node; those with retained heads (the fit's auto default) the retained one
    assert sum(n.op_type in ("NectarAttention", "NectarRetainedAttention") for n in proto.graph.node) == 30
    assert_one_line_error(nectar("run", str(tmp_path / "g"), "--chat", "hi"), "TensorRT plugin graph")
    if importlib.util.find_spec("tensorrt") is None:
        assert_one_line_error(nectar("export", str(art), "--format", "trt", "--out", str(tmp_path / "e")), "TensorRT")
        assert not (tmp_path / "e").exists()


def onnx_load(path):
    import onnx

    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path), str(path.with_name("inferred.onnx")))
    return onnx.load(str(path), load_external_data=False)


def test_nectar_profile_on_ort_bundles(bundles, tmp_path):
    out = tmp_path / "p.json"
    r = nectar("profile", "--backend", "ort", "--bundle", str(bundles[1]["nectar"]), "--bundle", str(bundles[1]["full"]),
               "--bundle", str(bundles[1]["int4"]), "--batch", "1,2", "--steps", "100", "--warmup", "2", "--local-len", "8",
               "--threads", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    recs = json.loads(out.read_text())["records"]
    # two bundles of one method and n (fp32 and int4 Nectar) are two points, each timing its own bundle
    assert sorted((x["method"], x["batch"], x["dtype"], Path(x["bundle"]).name) for x in recs) == sorted(
        (m, b, dt, name) for m, dt, name in (("nectar", "fp32", "nectar"), ("full", "fp32", "full"), ("nectar", "int4", "int4"))
        for b in (1, 2))
    keys = {"method", "backend", "device", "dtype", "shape", "batch", "n", "local_len", "latency_ms_median",
            "latency_ms_p90", "tokens_per_s", "peak_mem_bytes", "floor_ms"}
    assert all(keys <= set(x) and x["backend"] == "ort" and x["latency_ms_p90"] >= x["latency_ms_median"] > 0 for x in recs)
    assert_one_line_error(nectar("profile", "--backend", "ort", "--json", str(out)), "--bundle")


def test_export_warns_when_the_check_shows_changed_answers():
    from nectar_export.export.bundle import ExportConfig, check_warning

    ok = {"tokens": 16, "top1_agreement": 1.0, "mean_kl": 0.002, "max_abs_logit_diff": 0.5}
    assert check_warning(ok, ExportConfig(quantize="int4")) is None
    assert check_warning(dict(ok, top1_agreement=0.875), ExportConfig(quantize="int8")) is None  # two flipped near-ties
    gemma = dict(ok, top1_agreement=0.625, mean_kl=0.367)  # Gemma 3 270M's Q4_K_M weights exported as int4
    w = check_warning(gemma, ExportConfig(quantize="int4"))
    assert "top-1 agreement 0.62" in w and "KL 0.367" in w and "--quantize int8" in w and "\n" not in w
    assert "fp32" in check_warning(dict(ok, mean_kl=0.2), ExportConfig(quantize="int8"))
