"""`--exec-haproxy`: HAProxy as our child, in master-worker mode, started after the first good render."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class HAProxyChild:
    """Starts HAProxy once, tells `on_exit` when it dies, stops it (SIGTERM, then SIGKILL) on request."""

    def __init__(self, binary: str, master_socket: str, on_exit: Callable[[], None]) -> None:
        self._binary = binary
        self._master_socket = master_socket
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    async def start(self, config: Path) -> None:
        cmd = [self._binary, "-W", "-S", f"{self._master_socket},mode,600", "-f", str(config)]
        self._process = await asyncio.create_subprocess_exec(*cmd)
        log.info("started HAProxy (pid %d): %s", self._process.pid, " ".join(cmd))
        asyncio.get_running_loop().create_task(self._wait())

    async def _wait(self) -> None:
        assert self._process is not None
        await self._process.wait()
        self._on_exit()

    async def stop(self, timeout: float = 4.0) -> int | None:
        if self._process is None:
            return None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), timeout)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        return self._process.returncode
