"""`nectar fit / ask / eval` on the real SmolLM2: a small end-to-end run and the bad-input paths."""

from __future__ import annotations

import json
import math

import pytest

from tests.runtime.test_cli import assert_one_line_error, nectar

@pytest.mark.real
def test_fit_writes_a_complete_artifact(small_artifact):
    art, m = small_artifact
    assert sorted(p.name for p in art.iterdir()) == ["document.txt", "heads.safetensors", "manifest.json"]
    assert (art / "document.txt").read_bytes() == (art.parent / "doc.txt").read_bytes()  # CRLF kept byte for byte
    man = json.loads((art / "manifest.json").read_text())
    assert man["document"]["n_tokens"] > 500 and man["artifact_bytes"] < man["kv_bytes"] * 0.25
    assert len(man["metrics"]["heldout"]["o_rel_error"]) == 30
    # the real model's queries went through fp16 storage (the default) and gave finite held-out errors
    assert man["fit_config"]["query_dtype"] == "float16"
    assert all(math.isfinite(e) for e in man["metrics"]["heldout"]["o_rel_error"] + man["metrics"]["heldout"]["lse_abs_error"])
    assert set(man["timings_s"]) >= {"prefill document", "build probes", "collect queries", "fit heads", "distill heads"}
    dist = man["metrics"]["distill"]  # the end-to-end stage ran on the real model, scored on held-out probes
    assert dist["steps"] == 2 and [c["step"] for c in dist["curve"]] == [0, 1, 2]
    assert dist["heldout_after"]["kl_topk"] == min(c["kl_topk"] for c in dist["curve"]) > 0
    assert 0 < dist["heldout_after"]["agreement"] <= 1 and dist["heldout_after"]["tokens"] > 0


@pytest.mark.real
def test_ask_and_eval_from_the_artifact(small_artifact, tmp_path):
    art, _ = small_artifact
    r = nectar("ask", str(art), "What does sed do?", "--max-new-tokens", "12")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    import nectar_runtime as nr  # the Python API gives the CLI's greedy answer

    assert nr.open_artifact(str(art)).ask("What does sed do?", nr.GenerationConfig(max_new_tokens=12)) == r.stdout[:-1]
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"id": f"q{i}", "question": t, "answer": "sed"}) for i, t in
                           enumerate(["What is sed?", "How do I print only matching lines?"])))
    out = tmp_path / "eval.json"
    r = nectar("eval", str(art), "--questions", str(q), "--json", str(out), "--max-answer-tokens", "12", "--no-semantic")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"full", "nectar", "none", "streaming"}
    for m in res["methods"].values():
        assert {"agreement", "kl", "exact_match", "rouge_l", "semantic_similarity", "qa_accuracy"} <= set(m)
    assert res["methods"]["full"]["agreement"] == 1.0 and res["artifact_bytes"] > 0 and res["kv_bytes"] > 0


@pytest.mark.real
def test_artifact_refuses_a_different_base_model(small_artifact, tmp_path, gemma3_gguf):
    art, _ = small_artifact
    r = nectar("ask", str(art), "hi", "--model", str(gemma3_gguf))
    assert_one_line_error(r, "sha256")


@pytest.mark.parametrize("content,needle", [(b"", "empty"), (b"\x00\x01binary", "binary"), (b"caf\xe9 au lait", "UTF-8"),
                                            ("A manual.\n".encode("utf-16"), "UTF-16"), (b"\xef\xbb\xbf \n", "empty")])
def test_fit_refuses_bad_documents(tmp_path, content, needle, smollm2_gguf):
    doc = tmp_path / "doc.txt"
    doc.write_bytes(content)
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(tmp_path / "art"))
    assert_one_line_error(r, needle)
    assert not (tmp_path / "art").exists()


def test_a_utf8_byte_order_mark_is_not_part_of_the_document(tmp_path):
    from nectar_runtime.document import read_document

    doc = tmp_path / "doc.txt"
    doc.write_bytes("\ufeffTitle\r\nBody\n".encode("utf-8"))
    assert read_document(doc) == "Title\r\nBody\n"  # only the mark goes; CRLF stays byte for byte


def test_fit_refuses_a_bad_probe_scale_before_loading_the_model(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short manual.\n")
    r = nectar("fit", str(doc), "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "art"), "--probe-scale", "0")
    assert_one_line_error(r, "--probe-scale", "got 0")
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("flag,value", [("--distill-steps", "-1"), ("--distill-lr", "0"), ("--budget-fraction", "0"),
                                        ("--steps", "0"), ("--batch", "0"), ("--lr", "-1"), ("--budget-mb", "-2")])
def test_fit_names_the_flag_of_a_bad_setting_before_loading_the_model(tmp_path, flag, value):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short manual.\n")
    r = nectar("fit", str(doc), "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "art"), flag, value)
    assert_one_line_error(r, flag)
    assert not (tmp_path / "art").exists()


def test_fit_refuses_a_document_beyond_the_window(tmp_path, smollm2_gguf):
    doc = tmp_path / "big.txt"
    doc.write_text("word " * 9000)
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(tmp_path / "art"))
    assert_one_line_error(r, "9", "8192")
    assert not (tmp_path / "art").exists()


def test_fit_refuses_a_budget_mb_below_the_smallest_heads(tmp_path, smollm2_gguf):
    doc = tmp_path / "short.txt"
    doc.write_text("The widget has two buttons. Press the red one to start and the blue one to stop.\n")
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(tmp_path / "art"), "--budget-mb", "0.5")
    assert_one_line_error(r, "short.txt", "smallest Nectar heads", "--budget-mb")
    assert not (tmp_path / "art").exists()


@pytest.mark.real
def test_fit_raises_the_default_budget_of_a_short_document(tmp_path, smollm2_gguf):
    """A document whose default budget (0.24 of its KV) cannot hold the smallest heads is fitted at
    the smallest heads' budget, with a note; the manifest records the budget used."""
    doc = tmp_path / "short.txt"
    doc.write_text("The widget has two buttons. Press the red one to start and the blue one to stop.\n")
    art = tmp_path / "art"
    r = nectar("fit", str(doc), "--model", str(smollm2_gguf), "--out", str(art), "--steps", "2", "--probe-scale", "0.05")
    assert r.returncode == 0, r.stderr
    assert "cannot hold the smallest Nectar heads; the budget, a ceiling, is raised to" in r.stderr
    assert "plain context costs less memory" in r.stderr  # the heads outweigh this document's KV
    man = json.loads((art / "manifest.json").read_text())
    assert man["fit_config"]["budget_mb"] * 1e6 >= man["artifact_bytes"] > 0.24 * man["kv_bytes"]
    r = nectar("ask", str(art), "What does the red button do?", "--max-new-tokens", "6")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


@pytest.mark.parametrize("case", ["file", "foreign_dir"])
def test_fit_refuses_an_out_it_would_destroy_before_loading_the_model(tmp_path, case):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short manual.\n")
    out = tmp_path / "target"
    if case == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "main.py").write_text("print('mine')")
    r = nectar("fit", str(doc), "--model", "no-such-model-is-loaded", "--out", str(out))
    assert_one_line_error(r, str(out))
    assert ("not a directory" in r.stderr) if case == "file" else ("not empty" in r.stderr)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["doc.txt", "target"]  # nothing replaced, no temp dirs
    assert (out.read_text() == "precious") if case == "file" else ((out / "main.py").read_text() == "print('mine')")


def test_eval_refuses_an_unwritable_json_before_evaluating(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "What?", "answer": "x"}))
    r = nectar("eval", str(tmp_path / "no_artifact_needed"), "--questions", str(q), "--json", str(tmp_path))
    assert_one_line_error(r, "is a directory")


def test_eval_and_ask_refuse_a_non_artifact(tmp_path):
    assert_one_line_error(nectar("ask", str(tmp_path), "hi"), "not a Nectar artifact")
    assert_one_line_error(nectar("eval", str(tmp_path / "nope"), "--questions", "x.jsonl"), "no such")


def test_fit_names_a_bad_file_inside_a_document_directory_before_loading_the_model(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "guide.txt").write_text("How to use the widget.\n")
    (corpus / "scan.pdf").write_bytes(b"%PDF-1.7\n\xff\xfe\x00\x00 stream")
    r = nectar("fit", str(corpus), "--model", "no-such-model-is-loaded", "--out", str(tmp_path / "art"))
    assert_one_line_error(r, "scan.pdf", "binary")
    assert not (tmp_path / "art").exists()


@pytest.mark.real
def test_fit_a_directory_and_files_as_one_document(tmp_path, smollm2_gguf):
    """Several files (here a directory and a file) make one document, each under a `# name` heading; the
    manifest lists every source with its sha256; refitting into an artifact inside the directory leaves
    the artifact's own files out of the document."""
    corpus = tmp_path / "corpus"
    (corpus / "parts").mkdir(parents=True)
    (corpus / "parts" / "start.txt").write_text("To start the widget, press the red button once.\n")
    (corpus / "parts" / "stop.txt").write_text("To stop the widget, hold the blue button for two seconds.\n")
    (tmp_path / "safety.txt").write_text("Never open the widget while it runs.\n")
    art = corpus / "widget.nectar"
    for _ in range(2):  # the second run replaces the first artifact, which sits inside the document's directory
        r = nectar("fit", str(corpus), str(tmp_path / "safety.txt"), "--model", str(smollm2_gguf), "--out", str(art),
                   "--steps", "2", "--probe-scale", "0.05")
        assert r.returncode == 0, r.stderr
    man = json.loads((art / "manifest.json").read_text())
    labels = ["corpus/parts/start.txt", "corpus/parts/stop.txt", "safety.txt"]
    assert [s["label"] for s in man["document"]["sources"]] == labels
    assert man["document"]["source"] == "3 files (corpus/parts/start.txt, corpus/parts/stop.txt, safety.txt)"
    text = (art / "document.txt").read_text()
    assert text == ("# corpus/parts/start.txt\n\nTo start the widget, press the red button once.\n\n"
                    "# corpus/parts/stop.txt\n\nTo stop the widget, hold the blue button for two seconds.\n\n"
                    "# safety.txt\n\nNever open the widget while it runs.\n")
    r = nectar("ask", str(art), "How do I stop the widget?", "--max-new-tokens", "6")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
