"""`--exec-haproxy`: HAProxy as our child, in master-worker mode, started after the first good render."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from renderer.children import Child
from renderer.errors import ReloadError

log = logging.getLogger(__name__)


class HAProxyChild:
    """Starts HAProxy once, tells `on_exit` when it dies, stops it (SIGTERM, then SIGKILL) on request."""

    def __init__(self, binary: str, master_socket: str, on_exit: Callable[[], None]) -> None:
        self._binary = binary
        self._master_socket = master_socket
        self._on_exit = on_exit
        self._child: Child | None = None
        self._watch: asyncio.Task[None] | None = None

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
