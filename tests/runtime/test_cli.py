"""The `nectar` command end to end: --help everywhere, the first-run answer, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def nectar(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nectar_runtime.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nectar: "), r.stderr
    for n in needles:
        assert n in lines[0]


def test_help_on_every_subcommand():
    from nectar_runtime.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"pull", "generate"} <= set(sub.choices)
    for name in sub.choices:
        r = nectar(name, "--help")
        assert r.returncode == 0 and "usage: nectar " + name in r.stdout


def test_unknown_model_name():
    assert_one_line_error(nectar("generate", "--model", "no-such-model", "hi"), "unknown model 'no-such-model'")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model")
    assert_one_line_error(nectar("generate", "--model", str(bad), "hi"), str(bad))


@pytest.mark.real
def test_truncated_gguf(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    for cut in (1_000_000, len(data) - 100_000):  # in the header/vocabulary, and in the tensor data
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        assert_one_line_error(nectar("generate", "--model", str(p), "hi"), str(p), "truncated")


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    p = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_token_merges([])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(nectar("generate", "--model", str(p), "hi"), "unsupported architecture 'mamba'")


@pytest.mark.real
def test_prompt_longer_than_window(smollm2_gguf):
    r = nectar("generate", "--model", str(smollm2_gguf), "word " * 9000)
    assert_one_line_error(r, "does not fit", "8192")


def test_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(nectar("generate", "--device", "cuda", "hi"), "no CUDA GPU")


def test_device_auto_takes_the_gpu_when_torch_sees_one(monkeypatch):
    import torch

    from nectar_runtime.backends.torch_backend import resolve_device

    for seen, want in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: seen)
        assert resolve_device("auto") == want
    assert_one_line_error(nectar("generate", "--device", "tpu", "hi"), "'tpu'", "auto, cpu or cuda")


def test_system_with_an_artifact_is_refused_not_ignored(tmp_path):
    r = nectar("generate", "--artifact", str(tmp_path), "--system", "Answer in French.", "question")
    assert_one_line_error(r, "--system", "--artifact")


def test_bundle_manifest_lacking_keys_is_one_line(tmp_path):
    import json

    from nectar_runtime.bundle import BUNDLE_FORMAT_VERSION

    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "nectar-bundle", "format_version": BUNDLE_FORMAT_VERSION,
                                                         "files": {"x": {}}}))
    r = nectar("run", str(tmp_path), "--chat", "hi")
    assert_one_line_error(r, "manifest lacks", "re-export")


@pytest.mark.parametrize("files, graph, expect", [
    ({"model.onnx": {"sha256": "0" * 64}}, "model.onnx", "invalid file entry 'model.onnx'"),  # no bytes
    ({"../escape.onnx": {"bytes": 1, "sha256": "0" * 64}}, "../escape.onnx", "invalid file entry"),
    ({"model.onnx": {"bytes": 1, "sha256": "0" * 64}}, "/etc/other.onnx", "graph file '/etc/other.onnx' is not among"),
])
def test_bundle_manifest_file_entries_are_checked(tmp_path, files, graph, expect):
    import json

    from nectar_runtime.bundle import BUNDLE_FORMAT_VERSION

    (tmp_path / "model.onnx").write_bytes(b"x")
    (tmp_path / "manifest.json").write_text(json.dumps({
        "kind": "nectar-bundle", "format_version": BUNDLE_FORMAT_VERSION, "graph": {"file": graph}, "model": {},
        "document": {}, "context_len": 1, "max_local_len": 8, "method": "nectar", "files": files}))
    assert_one_line_error(nectar("run", str(tmp_path), "--chat", "hi"), expect, "re-export")


def test_bad_sampling_values():
    assert_one_line_error(nectar("generate", "--top-p", "1.5", "hi"), "--top-p")


@pytest.mark.real
def test_first_run_answers_paris(smollm2_gguf):
    r = nectar("generate", "--model", str(smollm2_gguf), "--chat", "What is the capital of France?", "--max-new-tokens", "16")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_runtime_and_cli_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import nectar_runtime.cli, nectar_runtime.generate, nectar_runtime.sampling, nectar_runtime.chat_session\n"
        "import nectar_runtime.tokenizer, nectar_runtime.hub, nectar_runtime.backends.base\n"
        "nectar_runtime.cli.build_parser()\n"
        "print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("pieces,empty", [([], True), (["\n", "  "], True), (["The ", "answer."], False)])
def test_an_empty_answer_is_said_not_printed_blank(pieces, empty, capsys):
    from nectar_runtime.cli import print_stream

    print_stream(iter(pieces))
    out, err = capsys.readouterr()
    assert out == "".join(pieces) + "\n"
    assert ("ended its answer without any text" in err) == empty
