"""Output files: checked before work starts, written whole, never overwritten silently."""

import pytest

from mlxq.errors import MlxqError
from mlxq.output_files import check_output_file, replacing, write_text_file


def test_check_output_file(tmp_path):
    target = tmp_path / "new" / "deeper" / "r.json"
    assert check_output_file(target, force=False) == target  # missing folders are fine
    assert not (tmp_path / "new").exists()                    # ...and not created yet
    with pytest.raises(MlxqError, match="is a folder"):
        check_output_file(tmp_path, force=True)
    existing = tmp_path / "r.json"
    existing.write_text("old")
    with pytest.raises(MlxqError, match="already exists; use --force"):
        check_output_file(existing, force=False)
    assert check_output_file(existing, force=True) == existing
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MlxqError, match="not a folder"):
        check_output_file(blocker / "r.json", force=False)


def test_write_replaces_whole_and_failure_leaves_old_file(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # the temporary is gone
    write_text_file(target, "new")
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert target.stat().st_mode & 0o777 == 0o644
    write_text_file(tmp_path / "a" / "b.json", "x")  # creates missing folders on write
    assert (tmp_path / "a" / "b.json").read_text() == "x"
