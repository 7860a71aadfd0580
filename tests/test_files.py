"""Outputs are whole or absent, and where they go is checked before any work."""

from __future__ import annotations

import errno
import os

import pytest

from controlkit.errors import OutputError
from controlkit.files import (
    atomic_path,
    check_output_file,
    check_output_folder,
    remove_stale_temporaries,
    write_bytes_atomic,
)


def test_a_failed_write_leaves_nothing_under_the_name_and_is_one_line(tmp_path):
    target = tmp_path / "map.png"
    with pytest.raises(OutputError, match=r"map.png: could not be written \(no space left on the device\)"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "manifest.jsonl"
    target.write_bytes(b"previous")
    with pytest.raises(OutputError):
        with atomic_path(target):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_an_error_that_is_not_the_file_systems_passes_through(tmp_path):
    with pytest.raises(OSError, match="encoder broke") as caught:
        with atomic_path(tmp_path / "x.png"):
            raise OSError("encoder broke")
    assert not isinstance(caught.value, OutputError)


def test_a_path_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"^-o .*file/maps: cannot write there \(a part of the path is a file"):
        check_output_folder(tmp_path / "file" / "maps", "-o")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", "-o")
    with pytest.raises(OutputError, match="could not be written"):
        write_bytes_atomic(tmp_path / "file" / "out.json", b"{}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="cannot write there"):
        check_output_folder(folder, "-o")


def test_output_files_are_checked_for_kind_and_suffix(tmp_path):
    with pytest.raises(OutputError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "-o", suffix=".png")
    with pytest.raises(OutputError, match=r"-o .*a.jpg: the output must be a .png path"):
        check_output_file(tmp_path / "a.jpg", "-o", suffix=".png")
    assert check_output_file(tmp_path / "new" / "a.png", "-o", suffix=".png") == tmp_path / "new" / "a.png"
    assert (tmp_path / "new").is_dir()


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / "sub" / ".ck-photo.999999999.tmp.png"  # no such process
    live = tmp_path / f".ck-photo.{os.getpid()}.tmp.png"
    mine = tmp_path / "photo.tmp.png"  # not ours: no prefix
    for path in (dead, live, mine):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not dead.exists() and live.exists() and mine.exists()
