"""Writing a rendered file without ever exposing a bad or half-written one.

`write_atomically` reads as its steps: compare with the live bytes → stage a temp file in the
destination directory and fsync it → validate the staged file → carry over mode and owner →
optional .bak → os.replace → fsync the directory. Any failure leaves the live file as it was.
`StagedFile` offers the same steps one by one, for callers that do work between them.

Symlinks: the live file, the lock file and the staged file are opened with O_NOFOLLOW, so a
symlink at one of those paths is refused (WriteError, naming the path) instead of followed: a
renderer running as root must not read or write wherever a link planted in the destination
directory points. O_NOFOLLOW concerns the last component only: a destination whose directory
is reached through a symlink (/etc/haproxy → /srv/haproxy) works as before. The .bak is only
ever unlinked and hard-linked, which never follow a link either.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import shlex
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from renderer.commands import Hurry, run_command
from renderer.errors import LockError, ValidationError, WriteError

log = logging.getLogger(__name__)

Validator = Callable[[Path], None]
DEFAULT_MODE = 0o644


@dataclass(frozen=True)
class WriteResult:
    path: Path
    changed: bool
    backup: Path | None = None


def live_bytes(path: Path) -> bytes | None:
    """The live file's bytes, None when there is none; a symlink or a non-regular file there
    (a FIFO would block the loop) is a WriteError."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise WriteError(
            _symlink_refused(path) if _is_link_error(err) else f"cannot read {path}: {err.strerror}"
        ) from err
    try:  # before fdopen, which refuses a directory with its own error (IsADirectoryError)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError as err:
        os.close(fd)
        raise WriteError(f"cannot read {path}: {err.strerror}") from err
    if not regular:
        os.close(fd)
        raise WriteError(f"{path} is not a regular file; replace it with a regular file or remove it")
    with os.fdopen(fd, "rb") as handle:
        try:
            return handle.read()
        except OSError as err:
            raise WriteError(f"cannot read {path}: {err.strerror}") from err


def _is_link_error(err: OSError) -> bool:
    """An open with O_NOFOLLOW refused because the last component is a symlink."""
    return err.errno == errno.ELOOP


def _symlink_refused(path: Path) -> str:
    return (
        f"{path} is a symlink; consul-renderer refuses to follow it: replace the symlink with a regular "
        "file or point the destination at the real path"
    )


def write_atomically(
    dest: Path, content: str, validate: Validator | None = None, perms: int | None = None, backup: bool = False
) -> WriteResult:
    """Install `content` at `dest` if it differs and passes `validate`; equal bytes do nothing."""
    staged = StagedFile.create(dest, content)
    if staged is None:
        return WriteResult(dest, changed=False)
    try:
        staged.validate(validate)
        return staged.commit(perms, backup)
    finally:
        staged.discard()


@dataclass
class StagedFile:
    """A rendered file written and fsynced next to its destination, not yet installed."""

    dest: Path
    path: Path

    @classmethod
    def create(cls, dest: Path, content: str, live: bytes | None = None, always: bool = False) -> StagedFile | None:
        """Stage `content`; None when the live file (`live`, read here if not given) holds these
        bytes, unless `always` (HAProxy is about to start on it: checked all the same)."""
        data = content.encode()
        if not always and (live if live is not None else live_bytes(dest)) == data:
            return None
        return cls(dest, _stage(dest, data))

    def validate(self, validate: Validator | None) -> None:
        if validate is not None:
            validate(self.path)

    def commit(self, perms: int | None = None, backup: bool = False) -> WriteResult:
        """Carry over mode and owner, keep a .bak if asked, replace the live file, fsync the directory."""
        _carry_over_mode(self.path, self.dest, perms)
        saved = _backup(self.dest) if backup else None
        _swap(self.path, self.dest)
        return WriteResult(self.dest, changed=True, backup=saved)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one we may not signal counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(err: OSError) -> str:
    reasons = {
        errno.ENOSPC: "the file system is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOENT: "the directory does not exist",
    }
    return reasons.get(err.errno or 0, err.strerror or str(err))


def _describe(err: OSError, path: Path) -> str:
    return f"cannot write {path}: {_reason(err)}; the live file was left as it was"


def _staged_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")


def _stage(dest: Path, data: bytes) -> Path:
    """A new file beside `dest`, created with O_EXCL|O_NOFOLLOW: never one that was there, nor a link's target."""
    staged = _staged_path(dest)
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError as err:  # O_EXCL: a symlink (even a dangling one) is never followed
        reason = _symlink_refused(staged) if staged.is_symlink() else f"cannot write {staged}: it already exists"
        raise WriteError(f"{reason}; the live file was left as it was") from err
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        staged.unlink(missing_ok=True)
        raise WriteError(_describe(err, dest)) from err
    return staged


def _carry_over_mode(staged: Path, dest: Path, perms: int | None) -> None:
    current = _live_stat(dest)
    mode = perms if perms is not None else (current.st_mode & 0o7777 if current else DEFAULT_MODE)
    try:
        os.chmod(staged, mode)
        if current is not None and os.geteuid() == 0:
            os.chown(staged, current.st_uid, current.st_gid)
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err


def _live_stat(dest: Path) -> os.stat_result | None:
    """The live file's own stat (None when there is none); a symlink there is refused, not followed."""
    try:
        current = os.lstat(dest)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err
    if stat.S_ISLNK(current.st_mode):
        raise WriteError(_symlink_refused(dest))
    return current


def _backup(dest: Path) -> Path | None:
    """DEST.bak as a hard link to the live file; a .bak already there (a symlink too) is unlinked, never followed."""
    if _live_stat(dest) is None:
        return None
    target = dest.with_name(dest.name + ".bak")
    try:
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        os.link(dest, target)
    except OSError as err:
        raise WriteError(_describe(err, target)) from err
    return target


def _swap(staged: Path, dest: Path) -> None:
    try:
        os.replace(staged, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err


def command_validator(command: str, timeout: float = 30.0, background: Hurry | None = None) -> Validator:
    """A check command run on the staged file; `{path}` in it is replaced (appended when absent);
    `background`: at a lower CPU priority (see `run_command`)."""

    def validate(staged: Path) -> None:
        quoted = shlex.quote(str(staged))
        line = command.replace("{path}", quoted) if "{path}" in command else f"{command} {quoted}"
        done = run_command(line, timeout, ValidationError, f"check command `{line}`", background)
        if not done.ok:
            raise ValidationError(f"check command `{line}` failed ({done.returncode}):\n{done.output}")

    return validate


class DestinationLock:
    """An exclusive lock on .DEST.lock, so two renderers never write the same destination.

    A symlink at the lock's path is refused (WriteError), never followed: a link planted there
    must not make a root renderer create or truncate the file it points to."""

    def __init__(self, dest: Path) -> None:
        self.path = dest.with_name(f".{dest.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open_and_lock()
            try:  # the previous holder may have unlinked the file between our open and our lock
                current = os.lstat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if previous.isdigit() and int(previous) != os.getpid() and not process_alive(int(previous)):
            log.info("took over the lock %s left by pid %s, which no longer runs", self.path, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def _open_and_lock(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            reason = (
                _symlink_refused(self.path)
                if _is_link_error(err)
                else f"cannot create lock {self.path}: {_reason(err)}"
            )
            raise WriteError(f"{reason}; the live file was left as it was") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockError(
                f"another consul-renderer (pid {holder}) already writes {self.path.name[1:-5]} "
                f"in {self.path.parent}; stop it or give this one another destination"
            ) from err
        return fd

    def release(self) -> None:
        """Unlock and remove the lock file (removed while still held: no lock names a dead pid)."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class DestinationLocks:
    """The locks of every destination, taken at once (WriteError if another renderer holds one)."""

    def __init__(self, destinations: list[Path]) -> None:
        self._locks: list[DestinationLock] = []
        try:
            for dest in destinations:
                lock = DestinationLock(dest)
                lock.acquire()
                self._locks.append(lock)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks.clear()
