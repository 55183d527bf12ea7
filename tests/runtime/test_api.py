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

