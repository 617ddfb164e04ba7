"""README promise (deliver/write.py): "temp file in the destination directory, fsync, validation,
mode and owner carried over, optional .bak, os.replace, fsync of the directory"."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from renderer.deliver.write import write_atomically

Event = tuple[str, str]  # (what happened, to what)


def recording(monkeypatch: pytest.MonkeyPatch, dest: Path) -> list[Event]:
    """Every fsync (of the staged file or of the destination's directory) and every os.replace, in order."""
    events: list[Event] = []
    real_fsync, real_replace = os.fsync, os.replace
    directory = os.stat(dest.parent).st_ino

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            events.append(("fsync", "directory" if info.st_ino == directory else f"other directory {info.st_ino}"))
        else:
            held = Path(f"/proc/self/fd/{fd}").read_bytes()  # the fd is write-only: read the file anew
            events.append(("fsync", f"file {info.st_ino} holding {held!r}"))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", f"{Path(src).parent == dest.parent} -> {Path(dst)}"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def validator(events: list[Event]) -> Callable[[Path], None]:
    def validate(staged: Path) -> None:
        events.append(("validate", staged.read_text()))

    return validate


def test_the_staged_file_is_fsynced_before_its_check_and_the_directory_after_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("old\n")
    events = recording(monkeypatch, dest)
    assert write_atomically(dest, "new\n", validator(events)).changed
    new_inode = dest.stat().st_ino  # the staged file became the live one
    assert events == [
        ("fsync", f"file {new_inode} holding b'new\\n'"),
        ("validate", "new\n"),
        ("replace", f"True -> {dest}"),  # from a file in the destination's own directory
        ("fsync", "directory"),
    ]


def test_equal_bytes_fsync_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("same\n")
    events = recording(monkeypatch, dest)
    assert not write_atomically(dest, "same\n", validator(events)).changed
    assert events == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner (CI runs as root)")
def test_the_new_file_keeps_the_owner_and_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    dest = tmp_path / "haproxy.cfg"
    dest.write_text("old\n")
    os.chown(dest, 4321, 8765)
    os.chmod(dest, 0o640)
    write_atomically(dest, "new\n")
    info = dest.stat()
    assert dest.read_text() == "new\n"
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (4321, 8765, 0o640)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner (CI runs as root)")
def test_a_first_file_is_owned_by_the_renderer_with_mode_0644(tmp_path: Path) -> None:
    dest = tmp_path / "haproxy.cfg"
    write_atomically(dest, "new\n")
    info = dest.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), os.getegid(), 0o644)
