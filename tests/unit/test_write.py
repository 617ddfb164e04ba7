from __future__ import annotations

import os
from pathlib import Path

import pytest

from renderer.deliver.write import DestinationLock, command_validator, write_atomically
from renderer.errors import LockError, ValidationError


def test_equal_bytes_write_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "f.cfg"
    assert write_atomically(dest, "a\n").changed
    mtime = dest.stat().st_mtime_ns
    assert not write_atomically(dest, "a\n").changed
    assert dest.stat().st_mtime_ns == mtime


def test_failed_validation_keeps_live_file_and_leaves_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "f.cfg"
    dest.write_text("good\n")
    with pytest.raises(ValidationError, match="exit 3"):
        write_atomically(dest, "bad\n", command_validator("sh -c 'echo exit 3; exit 3' --"))
    assert dest.read_text() == "good\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.cfg"]


def test_keeps_mode_and_backs_up(tmp_path: Path) -> None:
    dest = tmp_path / "f.cfg"
    dest.write_text("old\n")
    os.chmod(dest, 0o640)
    result = write_atomically(dest, "new\n", backup=True)
    assert dest.stat().st_mode & 0o777 == 0o640
    assert result.backup is not None and result.backup.read_text() == "old\n"
    write_atomically(dest, "newer\n", perms=0o600)
    assert dest.stat().st_mode & 0o777 == 0o600


def test_check_command_gets_the_staged_path(tmp_path: Path) -> None:
    dest = tmp_path / "f.cfg"
    write_atomically(dest, "content\n", command_validator("grep -q content {path}"))
    assert dest.read_text() == "content\n"


def test_lock_is_exclusive(tmp_path: Path) -> None:
    dest = tmp_path / "haproxy.cfg"
    first = DestinationLock(dest)
    first.acquire()
    with pytest.raises(LockError, match=f"pid {os.getpid()}.*already writes haproxy.cfg"):
        DestinationLock(dest).acquire()
    first.release()
    DestinationLock(dest).acquire()


def test_lock_file_is_removed_on_release_and_a_dead_holders_lock_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import subprocess

    dest = tmp_path / "haproxy.cfg"
    lock = DestinationLock(dest)
    lock.acquire()
    assert lock.path.read_text() == str(os.getpid())
    lock.release()
    assert not lock.path.exists()  # no lock file naming a pid once stopped

    proc = subprocess.Popen(["true"])  # a pid that no longer runs
    proc.wait()
    lock.path.write_text(str(proc.pid))  # left by a renderer that was killed
    with caplog.at_level(logging.INFO, logger="renderer.deliver.write"):
        lock.acquire()
    assert f"left by pid {proc.pid}, which no longer runs" in caplog.text
    lock.release()
