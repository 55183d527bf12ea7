"""Longer documents for the fidelity check: two man-page excerpts joined into one ~7K-token document.

The manuals are 2.8K-4.5K tokens; SmolLM2's window is 8,192. A user's document may fill most of it,
where the networks must stand for twice as many keys, probes reach fewer positions past the document
and the local window left for the question and answer is short. Each pair here is one document (A's
text, a blank line, B's text) whose questions are A's then B's (ids prefixed with the manual's name),
so `benchmarks/nectar_quality.py run --manuals OUT` scores it like any manual.

    python benchmarks/long_documents.py --out /tmp/long      # writes PAIR.txt, PAIR.questions.jsonl, manifest.json

Pairs (fixed, chosen by length only: as long as fits with >= 600 local tokens): jq + sed and curl + make
(development manuals), journalctl + tar (held-out manuals, benchmarks/heldout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("jq", "sed"), ("journalctl", "tar"), ("curl", "make"))


def join_pair(dirs: list[Path], a: str, b: str, out: Path) -> dict:
    """Write `{a}_{b}.txt` and its questions into `out`; returns the manifest entry."""
    def find(name: str, suffix: str) -> Path:
        for d in dirs:
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
        raise SystemExit(f"{name}{suffix}: not found in {', '.join(map(str, dirs))}")

    text = find(a, ".txt").read_text("utf-8").rstrip("\n") + "\n\n" + find(b, ".txt").read_text("utf-8")
    name = f"{a}_{b}"
    (out / f"{name}.txt").write_text(text, "utf-8")
    lines = []
    for m in (a, b):
        for line in find(m, ".questions.jsonl").read_text("utf-8").splitlines():
            if line.strip():
                q = json.loads(line)
                lines.append(json.dumps({**q, "id": f"{m}:{q.get('id', len(lines))}"}))
    (out / f"{name}.questions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    return {"name": name, "file": f"{name}.txt", "parts": [a, b], "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "questions": len(lines)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--manuals", default=str(ROOT.parent / "shared" / "data" / "manuals"))
    ap.add_argument("--heldout", default=str(ROOT / "benchmarks" / "heldout"))
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = [join_pair([Path(a.manuals), Path(a.heldout)], x, y, out) for x, y in PAIRS]
    (out / "manifest.json").write_text(json.dumps({"set": "long", "description": __doc__.split("\n")[0],
                                                   "documents": docs}, indent=2) + "\n")
    for d in docs:
        print(f"{d['file']}: {d['chars']} chars, {d['questions']} questions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
