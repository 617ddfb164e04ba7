"""A child process we start and must stop: the one supervisor for HAProxy (`--exec-haproxy`) and
for the command `consul-renderer register` runs.

Stopping is always the same: the stop signal, then SIGKILL once `kill_after` has passed. The
async callers (the renderer's loop) wait in a thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess

from renderer.errors import RendererError

log = logging.getLogger(__name__)


class Child:
    """One started process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @classmethod
    def start(cls, cmd: list[str], error: type[RendererError]) -> Child:
        """Start `cmd`; a program that cannot start raises `error` naming it."""
        try:
            return cls(subprocess.Popen(cmd))
        except OSError as err:
            raise error(f"cannot start {cmd[0]!r}: {err.strerror}") from err

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs (and reaps it once it has ended)."""
        return self._popen.poll()

    def send(self, signum: int) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signum)

    def wait(self) -> int:
        return self._popen.wait()

    def stop(self, signum: int = signal.SIGTERM, kill_after: float = 10.0) -> int:
        """`signum`, then SIGKILL if it is still running after `kill_after` seconds; its exit status."""
        self.send(signum)
        try:
            return self._popen.wait(kill_after)
        except subprocess.TimeoutExpired:
            log.warning("child %d ignored signal %d for %.0fs: killing it", self.pid, signum, kill_after)
            self._popen.kill()
            return self._popen.wait()

    async def wait_async(self) -> int:
        return await asyncio.to_thread(self._popen.wait)

    async def stop_async(self, signum: int = signal.SIGTERM, kill_after: float = 10.0) -> int:
        return await asyncio.to_thread(self.stop, signum, kill_after)
