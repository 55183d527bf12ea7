"""Output directories: refused before any work when writing would destroy something; atomic replace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nectar_export.outdir import check_out_dir, nectar_output_kind, replace_dir, temp_dir_beside
from nectar_runtime.errors import NectarError


def _finished(tmp_path, name="new"):
    d = temp_dir_beside(tmp_path / name)
    (d / "manifest.json").write_text(json.dumps({"spec": {}, "base_model": {}}))  # an artifact's manifest
    return d


def test_fit_never_replaces_a_bundle_and_export_never_an_artifact(tmp_path):
    art, bundle = tmp_path / "a.nectar", tmp_path / "b.int4"
    for d, m in ((art, {"spec": {}, "base_model": {}}), (bundle, {"kind": "nectar-bundle"})):
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(m))
    check_out_dir(art, "artifact")
    check_out_dir(bundle, "bundle")
    with pytest.raises(NectarError, match="holds a Nectar bundle, which a new artifact would replace"):
        check_out_dir(bundle, "artifact")
    with pytest.raises(NectarError, match="holds a Nectar artifact, which a new bundle would replace"):
        check_out_dir(art, "bundle")  # e.g. `nectar export A --out A`: the input itself


def test_new_path_empty_dir_and_earlier_output_are_accepted(tmp_path):
    assert check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # parents are made later
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"spec": {}, "base_model": {}}))  # an artifact
    assert nectar_output_kind(old) == "artifact"
    check_out_dir(old)


@pytest.mark.parametrize("what", ["file", "foreign", "not_json", "parent_is_file"])
def test_refuses_what_it_would_destroy(tmp_path, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("precious")
    elif what in ("foreign", "not_json"):
        out.mkdir()
        (out / ("src.py" if what == "foreign" else "manifest.json")).write_text("not ours")
    else:
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "out"
    with pytest.raises(NectarError, match=str(out)):
        check_out_dir(out)


def test_replace_dir_swaps_an_earlier_output_and_keeps_foreign_ones(tmp_path):
    out = tmp_path / "out"
    replace_dir(_finished(tmp_path, "out"), out)
    (out / "stale.txt").write_text("from the previous export")
    replace_dir(_finished(tmp_path, "out"), out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    tmp = _finished(tmp_path, "foreign")
    with pytest.raises(NectarError, match="not empty"):
        replace_dir(tmp, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [tmp.name]  # caller cleans up


def test_result_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        replace_dir(_finished(tmp_path, "out"), tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # mkdtemp alone gives 0700
    assert (tmp_path / "out" / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_failed_final_move_puts_the_earlier_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    replace_dir(_finished(tmp_path, "out"), out)
    (out / "earlier.txt").write_text("the earlier artifact")
    real_replace = os.replace

    def refuse_the_new_one(src, dst):
        if Path(src).name.startswith(".out.") and not Path(src).name.endswith(".old"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(NectarError, match="could not move the new artifact into place"):
        replace_dir(_finished(tmp_path, "out"), out)
    assert (out / "earlier.txt").read_text() == "the earlier artifact"
    assert not (tmp_path / ".out.old").exists()


def test_results_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from nectar_runtime.files import check_output_file, write_text_atomic

    p = tmp_path / "sub" / "r.json"
    write_text_atomic(p, '{"a": 1}', "--json results")
    assert p.read_text() == '{"a": 1}'
    with pytest.raises(NectarError, match="is a directory"):
        check_output_file(tmp_path, "--json results")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(NectarError, match="could not write the --json results"):
        write_text_atomic(p, '{"a": 2}', "--json results")
    assert p.read_text() == '{"a": 1}'
    assert [f.name for f in p.parent.iterdir()] == ["r.json"]  # no temp file left behind
