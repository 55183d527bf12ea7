"""A document from several files or directories (read_documents): order, labels, what is skipped, errors."""

from __future__ import annotations

import hashlib
import os

import pytest

from nectar_runtime.document import describe_sources, read_document, read_documents
from nectar_runtime.errors import NectarError


@pytest.fixture
def corpus(tmp_path):
    """tmp/corpus/{b.txt, a.md (BOM, CRLF), sub/c.txt, .git/x, .hidden} and tmp/one.txt."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.txt").write_text("Beta text\n")
    (d / "a.md").write_bytes("\ufeff\r\n   Alpha, indented\r\nline two\r\n\r\n".encode())
    (d / "sub" / "c.txt").write_text("Gamma")
    (d / ".git" / "x").write_bytes(b"\x00binary")
    (d / ".hidden").write_text("not part of it")
    (tmp_path / "one.txt").write_bytes(b"One\r\n")
    return tmp_path


def test_one_file_is_the_document_unchanged(corpus):
    text, sources = read_documents([corpus / "one.txt"])
    assert text == read_document(corpus / "one.txt") == "One\r\n"  # no heading, CRLF kept: sha256 as before
    assert [s.label for s in sources] == ["one.txt"] and describe_sources(sources) == "one.txt"
    assert sources[0].sha256 == hashlib.sha256(b"One\r\n").hexdigest()


def test_a_directory_joins_its_files_sorted_under_headings(corpus):
    text, sources = read_documents([corpus / "corpus"])
    assert [s.label for s in sources] == ["corpus/a.md", "corpus/b.txt", "corpus/sub/c.txt"]  # hidden ones skipped
    assert text == ("# corpus/a.md\n\n   Alpha, indented\r\nline two\n\n"  # BOM and blank ends dropped, indent kept
                    "# corpus/b.txt\n\nBeta text\n\n# corpus/sub/c.txt\n\nGamma\n")
    assert sources[0].sha256 == hashlib.sha256(read_document(corpus / "corpus" / "a.md").encode()).hexdigest()
    assert describe_sources(sources) == "3 files (corpus/a.md, corpus/b.txt, corpus/sub/c.txt)"


def test_files_and_directories_in_the_order_given_each_file_once(corpus):
    text, sources = read_documents([corpus / "one.txt", corpus / "corpus" / "b.txt", corpus / "corpus"])
    assert [s.label for s in sources] == ["one.txt", "b.txt", "corpus/a.md", "corpus/sub/c.txt"]
    assert text.startswith("# one.txt\n\nOne\n\n# b.txt\n\nBeta text\n\n# corpus/a.md")
    assert describe_sources(sources) == "4 files (one.txt, b.txt, corpus/a.md, …)"


def test_colliding_names_keep_the_path_given(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "README").write_text(f"about {d}")
    _, sources = read_documents([tmp_path / "x" / "README", tmp_path / "y" / "README"])
    assert [s.label for s in sources] == [(tmp_path / "x" / "README").as_posix(), (tmp_path / "y" / "README").as_posix()]


def test_the_artifact_being_written_is_not_part_of_the_document(corpus):
    text, sources = read_documents([corpus / "corpus"], exclude=corpus / "corpus" / "sub")
    assert [s.label for s in sources] == ["corpus/a.md", "corpus/b.txt"] and "Gamma" not in text


@pytest.mark.parametrize("make,needle", [
    (lambda p: (p / "empty").mkdir(), "holds no files"),
    (lambda p: None, "no such document file or directory"),
    (lambda p: os.mkfifo(p / "empty"), "not a regular file"),  # never opened: reading a pipe would block
])
def test_missing_or_empty_sources_get_one_line(tmp_path, make, needle):
    make(tmp_path)
    with pytest.raises(NectarError, match=needle) as e:
        read_documents([tmp_path / "empty"])
    assert "\n" not in str(e.value)


def test_a_bad_file_inside_a_directory_is_named(corpus):
    (corpus / "corpus" / "manual.pdf").write_bytes(b"%PDF-1.7\n\x00\x9c binary stream")
    with pytest.raises(NectarError, match=r"manual\.pdf: looks like a binary file"):
        read_documents([corpus / "corpus"])


def test_an_unreadable_file_is_named(corpus, monkeypatch):
    def denied(self):  # chmod 000 does not stop root, who runs CI here; the OS error is the same
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(corpus), "read_bytes", denied)
    with pytest.raises(NectarError, match=r"one\.txt: cannot be read \(Permission denied\); check its permissions"):
        read_documents([corpus / "one.txt"])


def test_artifacts_and_bundles_inside_a_document_directory_are_skipped(corpus):
    """Fitting a directory into an artifact inside it, then fitting the directory again, must not read
    the first artifact (or any bundle) as part of the document."""
    import json

    for name, manifest in (("old.nectar", {"heads_sha256": "0" * 64}), ("old.int4", {"kind": "nectar-bundle"})):
        d = corpus / "corpus" / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(manifest))
        (d / "heads.safetensors").write_bytes(b"\x00\x01weights")
        (d / "document.txt").write_text("Beta text\n")
    (corpus / "corpus" / "notes").mkdir()
    (corpus / "corpus" / "notes" / "manifest.json").write_text('{"name": "my own JSON"}')  # not Nectar's: a source
    _, sources = read_documents([corpus / "corpus"])
    assert [s.label for s in sources] == ["corpus/a.md", "corpus/b.txt", "corpus/notes/manifest.json", "corpus/sub/c.txt"]
