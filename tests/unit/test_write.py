from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from renderer.deliver import write
from renderer.deliver.write import DestinationLock, command_validator, live_bytes, write_atomically
from renderer.errors import LockError, ValidationError, WriteError

REFUSED = "is a symlink; consul-renderer refuses to follow it: replace the symlink with a regular file"


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


def test_a_symlink_at_the_live_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not ours\n")
    dest = tmp_path / "haproxy.cfg"
    dest.symlink_to(target)
    with pytest.raises(WriteError, match=re.escape(f"{dest} {REFUSED}")):
        live_bytes(dest)
    with pytest.raises(WriteError, match=re.escape(f"{dest} {REFUSED}")):
        write_atomically(dest, "new\n")
    assert target.read_text() == "not ours\n" and dest.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "haproxy.cfg"]  # no temp left behind
    dest.unlink()
    dest.symlink_to(tmp_path / "missing")  # a dangling link is refused too, not created through
    with pytest.raises(WriteError, match=REFUSED):
        live_bytes(dest)
    assert not (tmp_path / "missing").exists()


def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    dest = tmp_path / "haproxy.cfg"
    lock = DestinationLock(dest)
    lock.path.symlink_to(target)
    with pytest.raises(WriteError, match=re.escape(f"{lock.path} {REFUSED}")):
        lock.acquire()
    assert target.read_text() == "precious\n"
    lock.path.unlink()
    lock.path.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(WriteError, match=REFUSED):
        lock.acquire()
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_symlink_at_the_staged_path_is_refused_and_its_target_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    dest = tmp_path / "haproxy.cfg"
    staged = tmp_path / ".haproxy.cfg.planted.tmp"
    staged.symlink_to(target)
    monkeypatch.setattr(write, "_staged_path", lambda _dest: staged)
    with pytest.raises(WriteError, match=re.escape(f"{staged} {REFUSED}")):
        write_atomically(dest, "new\n")
    assert target.read_text() == "precious\n" and not dest.exists()


def test_a_symlink_at_the_backup_path_is_replaced_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    dest = tmp_path / "f.cfg"
    dest.write_text("old\n")
    (tmp_path / "f.cfg.bak").symlink_to(target)
    result = write_atomically(dest, "new\n", backup=True)
    assert result.backup is not None and not result.backup.is_symlink() and result.backup.read_text() == "old\n"
    assert target.read_text() == "precious\n"


def test_a_symlinked_directory_above_the_destination_is_followed(tmp_path: Path) -> None:
    """O_NOFOLLOW concerns the last component only: /etc/haproxy → /srv/haproxy keeps working."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    dest = tmp_path / "link" / "haproxy.cfg"
    lock = DestinationLock(dest)
    lock.acquire()
    assert write_atomically(dest, "a\n", backup=True).changed
    assert write_atomically(dest, "b\n", backup=True).changed
    lock.release()
    assert (real / "haproxy.cfg").read_text() == "b\n" and (real / "haproxy.cfg.bak").read_text() == "a\n"


def test_a_fifo_at_the_live_path_is_refused_without_blocking(tmp_path: Path) -> None:
    dest = tmp_path / "haproxy.cfg"
    os.mkfifo(dest)
    with pytest.raises(WriteError, match="is not a regular file"):
        live_bytes(dest)


def test_a_directory_at_a_read_path_is_a_write_error_not_a_crash(tmp_path: Path) -> None:
    """fdopen refused a directory with IsADirectoryError before the regular-file test, so a directory
    at a memory's path (`.haproxy.cfg.port-holds.json`, `.haproxy.cfg.memory.json`) raised past the
    readers, which expect WriteError: the destination's port holds could not be created."""
    from renderer.deliver.quarantine import PortHolds

    dest = tmp_path / "haproxy.cfg"
    (tmp_path / "plain").mkdir()
    with pytest.raises(WriteError, match="is not a regular file"):
        live_bytes(tmp_path / "plain")
    dest.with_name(".haproxy.cfg.port-holds.json").mkdir()
    assert PortHolds.for_destination(dest).held == {}
