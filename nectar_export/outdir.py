"""Output directories of `nectar fit` and `nectar export`: checked before any work, written atomically.

An `--out` may be a new path, an empty directory, or an earlier Nectar artifact or bundle (which is
replaced only once the new one is complete). Anything else — a file, a directory holding other
things, a parent that cannot be written — is refused with one line before the model is loaded, so
a typo never costs a fit and never deletes a user's files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from nectar_runtime.bundle import is_bundle_manifest
from nectar_runtime.errors import NectarError
from nectar_runtime.files import check_writable_parent


def nectar_output_kind(d: Path) -> str | None:
    """"artifact" or "bundle" when directory `d` holds one (its manifest says so), else None."""
    try:
        m = json.loads((d / "manifest.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    if is_bundle_manifest(m):
        return "bundle"
    return "artifact" if "spec" in m and "base_model" in m else None


def check_out_dir(out: str | Path, what: str = "artifact") -> Path:
    """Refuse an `--out` that cannot be written or would destroy something that is not an earlier
    output of the same kind (`what`: "artifact" or "bundle"): a fit never replaces a bundle, an
    export never replaces an artifact (its own input included)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise NectarError(f"{out}: exists and is not a directory; pass a new directory path for the {what}")
        kind = nectar_output_kind(out)
        if kind is not None and kind != what:
            raise NectarError(f"{out}: holds a Nectar {kind}, which a new {what} would replace; pass another --out")
        if kind is None and any(out.iterdir()):
            raise NectarError(f"{out}: directory is not empty and holds no Nectar {what}; refusing to "
                              f"replace it: pass a new or empty directory for the {what}")
    check_writable_parent(out, what)
    return out


def temp_dir_beside(out: Path) -> Path:
    """A fresh temp directory next to `out` (same filesystem, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise NectarError(f"{out}: cannot create the output directory ({e.strerror}); pass another path") from None


def _share_like_umask(d: Path) -> None:
    """mkdtemp makes 0700 and tempfile-written files may be 0600: give the result the permissions
    an ordinary `mkdir` / file write would have under the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for f in d.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, out: Path, what: str = "artifact") -> None:
    """Move the finished directory `tmp` to `out`, replacing an earlier Nectar output only now. If
    the final move fails, the earlier output is put back where it was."""
    check_out_dir(out, what)  # again: the target may have changed while we worked
    _share_like_umask(tmp)
    old = out.with_name(f".{out.name}.old")
    moved_old = False
    try:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            moved_old = True
        os.replace(tmp, out)
    except OSError as e:
        if moved_old:
            try:
                os.replace(old, out)
            except OSError:
                raise NectarError(f"{out}: could not move the new {what} into place ({e.strerror}); the earlier one "
                                  f"is kept as {old}") from None
        raise NectarError(f"{out}: could not move the new {what} into place ({e.strerror})") from None
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
