import os

import pytest

from pipeline import atomic


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "run.json"
    target.write_text("old")
    atomic.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("complete")
    with pytest.raises(OSError, match="disk full"), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_the_temporary_sits_beside_the_target_with_the_writers_suffix(tmp_path):
    target = tmp_path / "model.weights.h5"
    with atomic.atomic_path(target, suffix=".weights.h5", fsync=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".weights.h5")
        assert tmp.name.startswith(".") and str(os.getpid()) in tmp.name
        assert not target.exists()  # nothing at the target until the block succeeds
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights"


def test_copy_file_is_whole(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 1000)
    atomic.copy_file(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_bytes() == b"x" * 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
