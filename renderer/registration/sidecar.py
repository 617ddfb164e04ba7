"""The renderer in the Consul catalog: service `consul-renderer` with a TTL check that says how it is.

Registered with the local agent (again after an agent restart); the check follows `Status.check()`
within a second when its state or the gist of its output changes, else every TTL/2. The stale-data
watchdog shows here too: warning once Consul has not answered for `max_data_age`, critical at twice
it (an agent that is down cannot take the update: its TTL then turns the check critical).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import traceback
from typing import Any, Protocol
from urllib.parse import quote

from renderer.errors import ConsulError
from renderer.status import Status

log = logging.getLogger(__name__)

SERVICE_NAME = "consul-renderer"
CHECK_TTL_S = 30.0
# An unchanged check is pushed again this often: 4 requests a minute to the agent (its share of the
# renderer's idle cost), and a push may come 15 s late before the check turns critical. (TTL/3, before,
# cost 6 a minute for a margin a push to the local agent never needs.)
CHECK_REPUSH_S = CHECK_TTL_S / 2
STATUS_POLL_S = 1.0  # how soon a change of the check's status reaches Consul
FAILURE_RELOG_S = 60.0  # the same failure of ours is logged with its traceback once a minute at most
# Each of our PUTs is answered by the local agent itself (it syncs the catalog later): given up after
# this, so that a push that hangs at its 15 s turn, and the re-registration that follows it, still
# leave a third try (at 27 s) before the TTL runs out (with the other PUTs' 10 s, one hang left ~4 s).
PUT_TIMEOUT_S = 5.0
CHECK_NOTES = (
    "passing: every template rendered and applied (output: what is served). warning: a render or validation "
    "failed, an instance is left out, not ready yet, or no answer from Consul for max_data_age. critical: HAProxy "
    "unreachable or refusing reloads, or no answer from Consul for twice max_data_age. The page: Meta page_url."
)


def _gist(check: tuple[str, str]) -> tuple[str, str]:
    """A check without its numbers (counts, timings, clock, addresses): what changed in it, not by how much."""
    return check[0], re.sub(r"0x[0-9a-fA-F]+|\d+", "#", check[1])


class AgentWriter(Protocol):
    """What self-registration asks of the agent: `ConsulClient` is the real one."""

    async def put(self, path: str, body: object | None, timeout_s: float = ...) -> None: ...


class SelfRegistration:
    """Registers `consul-renderer` with a TTL check and keeps the check current."""

    def __init__(self, client: AgentWriter, status: Status, status_addr: tuple[str, int] | None) -> None:
        self._client = client
        self._status = status
        self._status_addr = status_addr
        self.service_id = f"{SERVICE_NAME}-{socket.gethostname()}"
        self.check_id = f"service:{self.service_id}"
        self._registered = False
        self._last: tuple[str, str] | None = None

    async def run(self) -> None:
        """Register (again after an agent restart) and update the check: within a second when its
        status or the gist of its output changes, else every CHECK_REPUSH_S. Never raises but Cancelled.

        A failure of ours (a status view that raised) is said in the check (warning) and logged with
        its traceback once a minute at most: an attacker's review found a check that kept raising
        logged a traceback every second and, having marked the renderer unregistered, skipped its
        deregistration at stop."""
        pushed_at = -CHECK_TTL_S
        logged: tuple[str, float] | None = None  # the last failure of ours logged whole, and when
        while True:
            now = time.monotonic()
            try:
                state = self._status.check()
            except Exception as err:  # a bug of ours: the check says so, the renderer goes on
                state = ("warning", f"consul-renderer could not work out its check ({type(err).__name__}); see its log")
                logged = _log_failure(err, logged, now)
            try:
                moved = self._last is None or _gist(state) != _gist(self._last)
                if moved or now - pushed_at >= CHECK_REPUSH_S:
                    await self.update(state)
                    pushed_at = now
            except ConsulError as err:
                self._registered = False
                log.debug("self-registration: %s", err)
            except Exception as err:  # a bug of ours: tried again next round
                logged = _log_failure(err, logged, now)
            await asyncio.sleep(STATUS_POLL_S)

    async def update(self, state: tuple[str, str] | None = None) -> None:
        """Push the check (`state`, or the status's own), registering first where needed."""
        if not self._registered:
            await self._register()
        state = self._status.check() if state is None else state
        status, output = state
        await self._client.put(
            f"/v1/agent/check/update/{quote(self.check_id, safe=':')}",
            {"Status": status, "Output": output},
            PUT_TIMEOUT_S,
        )
        if state != self._last:
            log.info("Consul check %s: %s (%s)", self.check_id, status, output)
            self._last = state

    async def _register(self) -> None:
        body: dict[str, Any] = {
            "Name": SERVICE_NAME,
            "ID": self.service_id,
            "Tags": ["sidecar"],
            "Check": {
                "CheckID": self.check_id, "TTL": f"{int(CHECK_TTL_S)}s", "DeregisterCriticalServiceAfter": "10m",
                "Notes": CHECK_NOTES,
            },
        }  # fmt: skip
        if self._status_addr:
            host = self._status_addr[0]
            base = f"http://{f'[{host}]' if ':' in host else host}:{self._status_addr[1]}"
            body["Meta"] = {"status_url": f"{base}/status", "page_url": f"{base}/"}
        await self._client.put("/v1/agent/service/register", body, PUT_TIMEOUT_S)
        self._registered = True
        log.info("registered %s in Consul with a TTL check", self.service_id)

    async def deregister(self) -> None:
        if self._registered:
            try:
                await self._client.put(
                    f"/v1/agent/service/deregister/{quote(self.service_id, safe='')}", None, PUT_TIMEOUT_S
                )
            except ConsulError as err:
                log.warning("could not deregister %s: %s", self.service_id, err)


def _log_failure(err: Exception, logged: tuple[str, float] | None, now: float) -> tuple[str, float]:
    """Log a failure of ours with its traceback when it is new or FAILURE_RELOG_S after the last
    time it was; the same failure in between only at debug level. Returns what was last logged
    whole. The same failure: the same type raised at the same place (a review: its text may carry
    an object's address, new each time, and a traceback was logged every second)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    failure = f"{type(err).__name__} at {where}"
    if logged is not None and logged[0] == failure and now - logged[1] < FAILURE_RELOG_S:
        log.debug("self-registration: still failing: %s", failure)
        return logged
    log.error("self-registration: updating the Consul check failed unexpectedly; trying again", exc_info=err)
    return failure, now
