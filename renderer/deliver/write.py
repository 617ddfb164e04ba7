"""Writing a rendered file without ever exposing a bad or half-written one.

`write_atomically` reads as its steps: compare with the live bytes → stage a temp file in the
destination directory and fsync it → validate the staged file → carry over mode and owner →
optional .bak → os.replace → fsync the directory. Any failure leaves the live file as it was.
`StagedFile` offers the same steps one by one, for callers that do work between them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from renderer.commands import run_command
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
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise WriteError(f"cannot read {path}: {err.strerror}") from err


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
    def create(cls, dest: Path, content: str, live: bytes | None = None) -> StagedFile | None:
        """Stage `content`; None when the live file (`live`, read here if not given) holds these bytes."""
        data = content.encode()
        if (live if live is not None else live_bytes(dest)) == data:
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


def _stage(dest: Path, data: bytes) -> Path:
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err
    staged = Path(name)
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
    try:
        current = dest.stat()
    except FileNotFoundError:
        current = None
    mode = perms if perms is not None else (current.st_mode & 0o7777 if current else DEFAULT_MODE)
    try:
        os.chmod(staged, mode)
        if current is not None and os.geteuid() == 0:
            os.chown(staged, current.st_uid, current.st_gid)
    except OSError as err:
        raise WriteError(_describe(err, dest)) from err


def _backup(dest: Path) -> Path | None:
    if not dest.exists():
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


def command_validator(command: str, timeout: float = 30.0) -> Validator:
    """A check command run on the staged file; `{path}` in it is replaced (appended when absent)."""

    def validate(staged: Path) -> None:
        quoted = shlex.quote(str(staged))
        line = command.replace("{path}", quoted) if "{path}" in command else f"{command} {quoted}"
        done = run_command(line, timeout, ValidationError, f"check command `{line}`")
        if not done.ok:
            raise ValidationError(f"check command `{line}` failed ({done.returncode}):\n{done.output}")

    return validate


class DestinationLock:
    """An exclusive lock on DEST.lock, so two renderers never write the same destination."""

    def __init__(self, dest: Path) -> None:
        self.path = dest.with_name(f".{dest.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open_and_lock()
            try:  # the previous holder may have unlinked the file between our open and our lock
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
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
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise WriteError(
                f"cannot create lock {self.path}: {_reason(err)}; the live file was left as it was"
            ) from err
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
