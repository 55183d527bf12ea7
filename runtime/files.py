"""Output files of the CLI (`--json`, `--plot`): checked before the long work, written atomically.

A results file is either the old one or the complete new one, never half written: the text goes to
a temp file beside it (same filesystem), then `os.replace`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import NectarError


def check_writable_parent(out: Path, what: str) -> None:
    """The nearest existing ancestor of `out` must be a writable directory."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NectarError(f"{out}: {parent} is not a directory; pass another path for the {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise NectarError(f"{out}: cannot write in {parent} (permission denied); pass another path for the {what}")
    try:  # os.access says yes to root everywhere, also on read-only or pseudo filesystems: try it
        fd, probe = tempfile.mkstemp(prefix=".nectar-write-check.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NectarError(f"{out}: cannot write in {parent} ({e.strerror}); pass another path for the {what}") from None


def check_output_file(path: str | Path, what: str) -> Path:
    """One line if `path` cannot become a file: a directory, or a parent that is a file or unwritable."""
    p = Path(path)
    if p.is_dir():
        raise NectarError(f"{p}: is a directory; pass a file path for the {what}")
    check_writable_parent(p, what)
    return p


def write_text_atomic(path: str | Path, text: str, what: str) -> None:
    """Write `text` to `path` through a temp file and a rename; one line on failure."""
    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600: give the permissions a plain write would
        os.replace(tmp, p)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise NectarError(f"{p}: could not write the {what} ({e.strerror or e})") from None
