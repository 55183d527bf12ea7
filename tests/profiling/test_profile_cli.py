"""`nectar profile` on CPU at a tiny shape, and its bad-input errors (one line, exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nectar_runtime.cli import main

KEYS = {"method", "backend", "device", "dtype", "shape", "batch", "n", "local_len", "latency_ms_median",
        "latency_ms_p90", "tokens_per_s", "peak_mem_bytes", "floor_ms"}


def test_profile_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "--shape", "tiny", "--device", "cpu", "--n", "64,256", "--batch", "1,2", "--steps", "100",
               "--warmup", "2", "--local-len", "8", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    recs = data["records"]
    assert len(recs) == 2 * 2 * 2
    assert {(r["method"], r["batch"], r["n"]) for r in recs} == {(m, b, n) for m in ("nectar", "full") for b in (1, 2) for n in (64, 256)}
    for r in recs:
        assert KEYS <= r.keys()
        assert 0 < r["latency_ms_median"] <= r["latency_ms_p90"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["latency_ms_median"], rel=1e-2, abs=0.06)
        assert r["floor_ms"] > 0 and r["peak_mem_bytes"] > 0 and r["local_len"] == 8
    # the full-attention floor grows with n (the document KV is read every step); Nectar's does not
    floor = {(r["method"], r["n"]): r["floor_ms"] for r in recs if r["batch"] == 1}
    assert floor[("full", 256)] > floor[("full", 64)] and floor[("nectar", 256)] == floor[("nectar", 64)]
    assert "random weights" in data["meta"]["notes"]
    assert "random weights" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [
    (["--shape", "nope"], "known shapes"),
    (["--n", "1k"], "comma-separated positive integers"),
    (["--n", "0"], "comma-separated positive integers"),
    (["--batch", "-1"], "comma-separated positive integers"),
    (["--dtype", "int8"], "--dtype"),
    (["--steps", "10"], "at least 100"),
    (["--backend", "ort"], "--bundle"),  # ort profiles exported bundles only
    (["--backend", "tensorrt"], "use one of"),
    (["--model", "x.gguf", "--shape", "tiny"], "not both"),
    (["--methods", "sparse"], "--methods"),
    (["--backend", "ort", "--bundle", "b", "--dtype", "fp16"], "--dtype is for the torch backend"),
    (["--plot", "p.txt"], "is not an image format"),  # refused before any measuring, not after
])
def test_profile_bad_input(tmp_path, capsys, args, msg):
    rc = main(["profile", "--shape", "tiny", *args, "--json", str(tmp_path / "p.json")] if "--shape" not in args
              else ["profile", *args, "--json", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2
    assert msg in err and err.count("\n") == 1 and err.startswith("nectar: ")
    assert not (tmp_path / "p.json").exists()


def test_runtime_cli_imports_without_torch():
    """nectar_runtime (and the profile command's definition) load with torch unavailable."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
            "import nectar_runtime, nectar_runtime.cli, nectar_profiling.cli\n"
            "nectar_runtime.cli.build_parser().parse_args(['profile', '--json', 'x.json'])\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_profile_cuda_without_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc = main(["profile", "--shape", "tiny", "--device", "cuda", "--json", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "no CUDA GPU" in err and err.count("\n") == 1


def test_plot_draws_each_bundle_as_its_own_series(tmp_path):
    """Bundles of different models and dtypes are separate series named by bundle, model and dtype (not
    one line joined across them), and a one-point series still shows its bandwidth floor."""
    pytest.importorskip("matplotlib")
    from nectar_profiling.profile import plot_records, series_key, series_label

    base = {"method": "nectar", "batch": 1, "latency_ms_median": 10.0, "floor_ms": 4.0}
    recs = [dict(base, bundle="/x/gemma.int4", shape="gemma3-270m", dtype="int4", n=459),
            dict(base, bundle="/x/grep.fp16", shape="smollm2-135m-instruct", dtype="fp16", n=530, latency_ms_median=20.0)]
    assert len({series_key(r) for r in recs}) == 2
    assert series_label(recs[0]) == "gemma.int4: gemma3-270m, int4, nectar, batch 1"
    plot_records(recs, tmp_path / "p.png", title="cpu")
    assert (tmp_path / "p.png").stat().st_size > 1000
