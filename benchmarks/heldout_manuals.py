"""Render held-out man-page excerpts, never used in development, the way ../shared/data/manuals were made.

    python benchmarks/heldout_manuals.py tar find ssh xargs --out benchmarks/heldout

Each page is rendered with `MANWIDTH=80 man -P cat NAME | col -bx` in the C.UTF-8 locale,
normalised (trailing whitespace stripped, runs of more than 2 blank lines collapsed, one final
newline) and cut like the development set: from the header through a section or paragraph
boundary, so that the excerpt holds 12,000 to 20,000 characters; a shorter page is kept whole.
Writes NAME.txt and a manifest.json (chars, sha256, line range, Debian package and version).
The question files (NAME.questions.jsonl) are written by hand afterwards, in the development
set's format; the manifest records their sha256 when they exist.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

MIN_CHARS, MAX_CHARS = 12_000, 20_000


def render_page(name: str) -> str:
    """The page as plain text, normalised as the development set's README says."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", LANG="C.UTF-8")
    page = subprocess.run(["man", "-P", "cat", name], env=env, capture_output=True, text=True).stdout
    raw = subprocess.run(["col", "-bx"], input=page, env=env, check=True, capture_output=True, text=True).stdout
    if not raw.strip():
        raise SystemExit(f"heldout_manuals: `man {name}` rendered nothing; is its man page installed?")
    lines = [ln.rstrip() for ln in raw.splitlines()]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")
    return text + "\n"


def _is_section(line: str) -> bool:
    return bool(line) and not line[0].isspace() and line.upper() == line and any(c.isalpha() for c in line)


def cut_excerpt(text: str) -> tuple[str, str]:
    """(excerpt, description): the longest prefix ending at a section or paragraph boundary
    within [MIN_CHARS, MAX_CHARS]; a section boundary is preferred."""
    if len(text) <= MAX_CHARS:
        return text, "whole page"
    lines = text.split("\n")
    best_section = best_para = None
    chars = 0
    for i, line in enumerate(lines):
        # `chars` = length of lines[:i] joined with newlines, i.e. the excerpt that stops before line i.
        if MIN_CHARS <= chars <= MAX_CHARS:
            if _is_section(line):
                best_section = i
            elif line == "" and i + 1 < len(lines) and lines[i + 1].strip():
                best_para = i
        if chars > MAX_CHARS:
            break
        chars += len(line) + 1
    stop = best_section if best_section is not None else best_para
    if stop is None:
        raise SystemExit("heldout_manuals: no section or paragraph boundary within 12,000-20,000 characters")
    excerpt = "\n".join(lines[:stop]).rstrip("\n") + "\n"
    kind = "section" if stop == best_section else "paragraph"
    after = next((ln for ln in lines[stop:] if ln.strip()), "")
    return excerpt, f"lines 1-{stop} of {len(lines)} (cut at a {kind} boundary before: {after.strip()[:60]!r})"


def package_of(name: str) -> tuple[str, str, list[str]]:
    """(Debian package, version, the licences its copyright file names) of a man page."""
    path = subprocess.run(["man", "-w", name], capture_output=True, text=True).stdout.strip()
    owner = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True).stdout.split(":")[0]
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", owner], capture_output=True, text=True).stdout
    copyright = Path("/usr/share/doc") / owner / "copyright"
    lines = copyright.read_text(errors="replace").splitlines() if copyright.is_file() else []
    licences = list(dict.fromkeys(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("License:")))
    return owner, version, licences


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="+")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/heldout"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    docs = []
    for name in args.pages:
        text, what = cut_excerpt(render_page(name))
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        package, version, licences = package_of(name)
        entry = {"name": name, "file": f"{name}.txt", "chars": len(text), "bytes": len(text.encode()),
                 "sha256": hashlib.sha256(text.encode()).hexdigest(), "excerpt": what,
                 "whole_page": what == "whole page", "package": package, "package_version": version,
                 "licenses_in_package": licences}
        qfile = args.out / f"{name}.questions.jsonl"
        if qfile.exists():
            entry["questions_file"] = qfile.name
            entry["questions_sha256"] = hashlib.sha256(qfile.read_bytes()).hexdigest()
        docs.append(entry)
        print(f"{name}: {entry['chars']} chars, {what}", file=sys.stderr)
    manifest = {"set": "heldout", "render_command": "MANWIDTH=80 man -P cat NAME | col -bx",
                "description": "Man-page excerpts never used while developing Nectar (held-out check of the defaults).",
                "documents": docs}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
