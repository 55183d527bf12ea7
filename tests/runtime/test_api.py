"""The package's public embedding API (docs/deploy.md, "Python API"): lazy, torch-free names."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_public_names_resolve_and_import_lazily():
    code = (
        "import sys, nectar_runtime as nr\n"
        "heavy = [m for m in ('tokenizers', 'onnxruntime', 'torch', 'jinja2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"  # the package import itself pulls none of them
        "from nectar_runtime.bundle_session import open_bundle_session\n"
        "from nectar_runtime.chat_session import ChatSession\n"
        "assert nr.open_bundle is open_bundle_session and nr.ChatSession is ChatSession\n"
        "assert all(getattr(nr, n) is not None for n in nr.__all__)\n"
        "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules\n"  # backends load at open time
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_unknown_name_is_an_attribute_error():
    import nectar_runtime

    with pytest.raises(AttributeError, match="no attribute 'open_bundle_session'"):
        nectar_runtime.open_bundle_session  # noqa: B018  (the public name is open_bundle)



@pytest.mark.parametrize("manifest,version,ok", [
    ({"quantize": "int4"}, "1.23.2", True),
    ({"quantize": "int8"}, "1.22.1", False),  # 8-bit GatherBlockQuantized arrived in 1.23 (benchmarks/ort_versions.py)
    ({"quantize": None, "dtype": "fp32"}, "1.16.0", True),
    ({"quantize": None, "dtype": "fp16"}, "1.15.1", False),
    ({"quantize": "int4", "min_onnxruntime": "1.30"}, "1.28.0", False),  # the manifest's own field wins
    ({"quantize": "int4"}, "1.24.0.dev20251001", True),
])
def test_an_onnxruntime_too_old_for_the_bundle_is_refused_in_one_line(manifest, version, ok):
    from nectar_runtime.backends.ort_backend import check_onnxruntime
    from nectar_runtime.errors import NectarError

    if ok:
        check_onnxruntime(manifest, "b", version)
        return
    with pytest.raises(NectarError) as e:
        check_onnxruntime(manifest, "b", version)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("b: ") and f"this one is {version}" in msg and "upgrade" in msg
    assert ("--dtype fp32" in msg) == bool(manifest.get("quantize"))  # the way out for quantized bundles


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_open_bundle_refuses_bad_threads_as_the_cli_does(threads):
    import nectar_runtime as nr

    with pytest.raises(nr.NectarError, match=r"threads \(--threads\) must be a whole number >= 1"):
        nr.open_bundle("no_bundle_needed", threads=threads)
