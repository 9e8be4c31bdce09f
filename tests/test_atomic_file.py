"""scripts.atomic_file: a file holds its old content or the complete new one, never a partial one."""

import pytest

from scripts.atomic_file import atomic_write


def test_atomic_write_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "model.ts"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_write(str(path)) as stream:
            stream.write(b"partial")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "nested" / "model.ts"
    with atomic_write(str(path)) as stream:
        stream.write(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["model.ts"]
