"""Atomic writes leave nothing half-written and give outputs the permissions of an ordinary new file."""

import os
import stat

import pytest

from leafkd.atomic import atomic_dir, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640  # not mkstemp's 0600
    assert _mode(tmp_path / "folder") == 0o750  # not mkdtemp's 0700


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder"):
            raise RuntimeError("killed")
    from leafkd.atomic import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
