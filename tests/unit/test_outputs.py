"""Where a job may write (`asyncopd.outputs`): under the roots, into a new or empty directory it claims."""

from __future__ import annotations

import pytest

from asyncopd.outputs import OWNER_FILE, OutputDirError, claim, owner, resolve


def test_resolve_keeps_jobs_under_their_roots(tmp_path):
    root = tmp_path / "data" / "jobs"
    assert resolve(None, "j-1", [root]) == root.resolve() / "j-1"
    assert resolve("runs/a", "j-1", [root]) == root.resolve() / "runs" / "a"
    assert resolve(str(root / "b"), "j-1", [root]) == root.resolve() / "b"
    other = tmp_path / "scratch"
    assert resolve(str(other / "c"), "j-1", [root, other]) == other.resolve() / "c"
    for bad in ("/", "..", ".", "a/../..", str(root), str(tmp_path / "data" / "weights"), "/etc/x", "a\x00b"):
        with pytest.raises(OutputDirError):
            resolve(bad, "j-1", [root])


def test_resolve_follows_symlinks_before_judging(tmp_path):
    root, outside = tmp_path / "jobs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(OutputDirError, match="outside the output roots"):
        resolve("link/x", "j-1", [root])


def test_a_directory_with_files_is_never_taken(tmp_path):
    root = tmp_path / "jobs"
    (root / "full").mkdir(parents=True)
    (root / "full" / "keep").write_text("x")
    (root / "file").write_text("x")
    with pytest.raises(OutputDirError, match="already holds files"):
        resolve("full", "j-1", [root])
    with pytest.raises(OutputDirError, match="not a directory"):
        resolve("file", "j-1", [root])
    (root / "empty").mkdir()
    assert resolve("empty", "j-1", [root]) == (root / "empty").resolve()


def test_claim_marks_the_directory_once_and_refuses_one_filled_meanwhile(tmp_path):
    out = tmp_path / "jobs" / "j-1"
    claim(out, "j-1")
    assert (out / OWNER_FILE).read_text() == "j-1\n" and owner(out) == "j-1"
    (out / "steps.jsonl").write_text("{}")
    claim(out, "j-1")  # its own: a restarted coordinator claims again
    with pytest.raises(OutputDirError):
        claim(out, "j-2")
    assert owner(tmp_path / "nothing") is None
