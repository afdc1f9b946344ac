"""Files written whole or not at all (mist_fed.files)."""

import pytest

from mist_fed.files import atomic_path, write_bytes_atomic


def test_a_clean_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    # Prepare
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    # Execute
    write_bytes_atomic(path, b"new")
    # Assert
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    # Prepare
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    # Execute: the writer dies half way
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"ha")
        raise RuntimeError("killed mid-write")
    # Assert
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_named_temp_is_used(tmp_path):
    # Prepare
    named = tmp_path / "key.arrow.123.tmp"
    # Execute
    with atomic_path(tmp_path / "key.arrow", named) as tmp:
        assert tmp == named
        tmp.write_text("x")
        assert named.exists()
    # Assert
    assert not named.exists() and (tmp_path / "key.arrow").read_text() == "x"
