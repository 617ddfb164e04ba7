"""What the operator sees besides the files: the status server and the Consul self-registration.
Neither may stop the renderer: a status port already taken is a warning, not an exit."""

from __future__ import annotations

import asyncio
import logging

from renderer.config import Config, parse_host_port
from renderer.registration.sidecar import SelfRegistration
from renderer.source.client import ConsulClient
from renderer.status import Status, StatusServer

log = logging.getLogger("renderer.runner")


class OperatorTasks:
    """Started after the watches, stopped (and deregistered) on the way out; none under --once or --dry."""

    def __init__(self, config: Config, status: Status) -> None:
        self._config = config
        self._status = status
        self._server: StatusServer | None = None
        self._registration: SelfRegistration | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, client: ConsulClient) -> None:
        config = self._config
        if config.once or config.dry:
            return
        addr = None if config.status_addr == "off" else parse_host_port(config.status_addr, "status_addr")
        if addr is not None:
            server = StatusServer(self._status, *addr, config.status_login, (config.consul.token,))
            try:
                await server.start()
                self._server = server
            except OSError as err:
                log.warning("status server not started on %s:%d: %s", addr[0], addr[1], err.strerror)
                addr = None
        if config.register_self:
            self._registration = SelfRegistration(client, self._status, addr)
            self._task = asyncio.create_task(self._registration.run(), name="self-registration")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._registration is not None:  # first: a status server slow to stop must not hold it off
            await self._registration.deregister()
        if self._server is not None:
            await self._server.stop()
