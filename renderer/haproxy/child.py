"""`--exec-haproxy`: HAProxy as our child, in master-worker mode, started after the first good render."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from renderer.children import Child
from renderer.errors import ReloadError
from renderer.haproxy.control import parse_show_proc, send_command

log = logging.getLogger(__name__)


class HAProxyChild:
    """Starts HAProxy once, tells `on_exit` when it dies, stops it (SIGTERM, then SIGKILL) on request."""

    def __init__(self, binary: str, master_socket: str, on_exit: Callable[[], None]) -> None:
        self._binary = binary
        self._master_socket = master_socket
        self._on_exit = on_exit
        self._child: Child | None = None
        self._watch: asyncio.Task[None] | None = None

    def refuse_a_running_master(self) -> None:
        """ReloadError when an HAProxy master already answers at the master socket: a renderer killed
        before it could stop its HAProxy (SIGKILL, the OOM killer, under a supervisor that leaves
        the rest of its processes) leaves it running on the file it had. A second one started
        beside it shared its ports (SO_REUSEPORT), each serving its own file, the old one never
        reloaded again, and every TCP listener of the new one left out as "in use" (helper-150's F2)."""
        try:
            answer = send_command(self._master_socket, "show proc", timeout=2.0)
        except TimeoutError:  # accepted, never answered: a stopped master (helper-151's C)
            raise ReloadError(
                f"something accepts connections at {self._master_socket} but does not answer `show proc` within "
                "2 s: an HAProxy master stopped (SIGSTOP) or hung? --exec-haproxy starts its own: end it first"
            ) from None
        except OSError:  # nothing there, a stale socket file, or one we may not use
            return
        try:
            pid = parse_show_proc(answer).master_pid
        except ReloadError:  # something else answers there: not HAProxy's master
            return
        raise ReloadError(
            f"an HAProxy master (pid {pid}) already answers at {self._master_socket}: left running by a "
            "renderer that could not stop it? --exec-haproxy starts its own: stop that one (kill -USR1 "
            f"{pid}, then wait until it has exited: its workers finish their connections first) and start "
            "the renderer again, or drive it without --exec-haproxy (--haproxy-master-socket alone reloads it)"
        )

    @property
    def started(self) -> bool:
        return self._child is not None

    @property
    def returncode(self) -> int | None:
        return self._child.returncode if self._child is not None else None

    async def start(self, config: Path) -> None:
        cmd = [self._binary, "-W", "-S", f"{self._master_socket},mode,600", "-f", str(config)]
        self._child = Child.start(cmd, ReloadError)
        log.info("started HAProxy (pid %d): %s", self._child.pid, " ".join(cmd))
        self._watch = asyncio.create_task(self._wait(self._child), name="haproxy child")

    async def _wait(self, child: Child) -> None:
        await child.wait_async()
        self._on_exit()

    async def stop(self, timeout: float = 4.0) -> int | None:
        if self._child is None:
            return None
        return await self._child.stop_async(kill_after=timeout)
