"""An exported bundle directory, as the runtime reads it (no torch, no onnx package needed).

    BUNDLE/
      manifest.json          format_version, method (nectar|full), graph io, dtypes, opset,
                             max_local_len, context_len, hashes of the base model / document,
                             sha256 + bytes of every other file
      model.onnx             the decoder graph (ONNX; or engine.plan for --format trt)
      model.onnx.data        its weights (ONNX external data)
      tokenizer.json, tokenizer_config.json, chat_template.jinja
      document.txt           the document (the chat template renders the question after it)

Everything listed in the manifest is checked (presence, then sha256) before anything is loaded;
any problem is one line naming the bundle, what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import NectarError

BUNDLE_FORMAT_VERSION = 1
BUNDLE_KIND = "nectar-bundle"  # manifest "kind" of every bundle (onnx, trt, trt-onnx)


def is_bundle_manifest(m) -> bool:
    """Whether a parsed manifest is a bundle's (artifacts have no "kind")."""
    return isinstance(m, dict) and m.get("kind") == BUNDLE_KIND
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def graph_path(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def context_len(self) -> int:
        return int(self.manifest["context_len"])

    @property
    def max_local_len(self) -> int:
        return int(self.manifest["max_local_len"])

    @property
    def format(self) -> str:
        return self.manifest.get("format", "onnx")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# manifest keys the runtime reads, with their JSON types
REQUIRED = {"graph": dict, "model": dict, "document": dict, "context_len": int, "max_local_len": int, "method": str}


def read_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open and check a bundle directory; `verify` hashes every file against the manifest."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file, not a bundle directory" if p.exists() else "no such bundle directory"
        raise NectarError(f"{p}: {what} (make one with `nectar export ART --format onnx --out BUNDLE`)")
    mf = p / MANIFEST
    if not mf.is_file():
        raise NectarError(f"{p}: not a Nectar bundle (no {MANIFEST}); pass the directory `nectar export` wrote")
    try:
        m = json.loads(mf.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NectarError(f"{mf}: corrupt manifest ({e}); re-export the bundle") from None
    if isinstance(m, dict) and "heads_sha256" in m and "kind" not in m:  # an artifact's manifest (nectar fit)
        raise NectarError(f"{p}: is a Nectar artifact (from `nectar fit`), not a bundle; ask it with `nectar ask {p} "
                          f"QUESTION`, or export it first: `nectar export {p} --out BUNDLE`")
    if not is_bundle_manifest(m):
        raise NectarError(f"{mf}: not a Nectar bundle manifest; pass the directory `nectar export` wrote")
    if m.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise NectarError(
            f"{mf}: unsupported bundle format_version {m.get('format_version')!r} (this runtime reads "
            f"{BUNDLE_FORMAT_VERSION}); re-export with this version or upgrade nectar"
        )
    lacking = [k for k, t in REQUIRED.items() if not isinstance(m.get(k), t)]
    if lacking:
        raise NectarError(f"{mf}: manifest lacks {', '.join(lacking)}; the bundle is corrupt: re-export it")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise NectarError(f"{mf}: the manifest lists no files; re-export the bundle")
    bad = [n for n, meta in files.items() if not isinstance(meta, dict) or not isinstance(meta.get("bytes"), int)
           or not isinstance(meta.get("sha256"), str) or Path(n).is_absolute() or ".." in Path(n).parts]
    if bad:
        raise NectarError(f"{mf}: invalid file entry {bad[0]!r} (needs bytes and sha256, a path inside the bundle); re-export the bundle")
    if m["graph"].get("file") not in files:
        raise NectarError(f"{mf}: the graph file {m['graph'].get('file')!r} is not among the manifest's files; re-export the bundle")
    for name in files:
        if not (p / name).is_file():
            raise NectarError(f"{p}: bundle is incomplete ({name} missing); copy the whole directory or re-export")
    if verify:
        for name, meta in files.items():
            f = p / name
            if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                raise NectarError(f"{f}: contents do not match the manifest's sha256 (corrupt or modified); re-export the bundle")
    return Bundle(p, m)
