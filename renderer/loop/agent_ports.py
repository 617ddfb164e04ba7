"""The ports the local Consul agent listens on, read once from `/v1/agent/self`, so that no catalog
listener takes one of them while the agent restarts (see `Config.reserved_ports`).

`Config.reserved_ports` knows Consul's default ports and the one the renderer talks to; an agent on
other ports kept its Serf, DNS, gRPC and server ports open to a registration asking for them, and a
listener bound there during a restart kept the agent from starting (helper-144, /tmp/rev90). The
agent says its ports in `DebugConfig` (Consul 1.8 and later), which needs `agent:read`: without it
only those two kinds are reserved, said once (at INFO: an agent in a container of its own, as in
the compose stack, has no port on the load balancer's host). Asked again every RETRY_S until the
agent answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from renderer.errors import ConsulError
from renderer.source.client import ConsulRequestError, QueryResult

log = logging.getLogger(__name__)

# `DebugConfig`'s listening ports (-1: off). Not the Connect sidecar and expose ranges: proxies'.
PORT_KEYS = ("HTTPPort", "HTTPSPort", "GRPCPort", "DNSPort", "SerfPortLAN", "SerfPortWAN", "ServerPort")
RETRY_S = 5.0


class AgentReader(Protocol):
    async def get(self, path: str) -> QueryResult: ...


def ports_of(answer: Any) -> frozenset[int]:
    """The listening ports in an `/v1/agent/self` answer (none for an answer of another shape)."""
    debug = answer.get("DebugConfig") if isinstance(answer, Mapping) else None
    if not isinstance(debug, Mapping):
        return frozenset()
    ports = (debug.get(key) for key in PORT_KEYS)
    return frozenset(p for p in ports if isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536)


async def read_agent_ports(client: AgentReader, found: Callable[[frozenset[int]], None]) -> None:
    """Ask the agent for its ports until it answers, then `found(ports)` once. A refusal (403: no
    `agent:read`) ends it with one warning; any other failure (the agent down) is asked again."""
    while True:
        try:
            result = await client.get("/v1/agent/self")
            ports = ports_of(result.decoded())
        except ConsulRequestError as err:
            if err.status in (401, 403):
                log.info(
                    "cannot read the local agent's ports (%s): only Consul's default ports and the one the renderer "
                    "talks to are kept from catalog listeners; give the token agent:read, or keep the agent's "
                    "other ports out of tcp_ports", err,
                )  # fmt: skip
                return
            log.debug("the agent's ports not read yet: %s", err)
        except (ConsulError, ValueError, RecursionError) as err:
            log.debug("the agent's ports not read yet: %s", err)
        else:
            if ports:
                log.info("the local agent's ports, kept from catalog listeners: %s", sorted(ports))
                found(ports)
                return
            log.debug("the agent's answer named no port: asking again")
        await asyncio.sleep(RETRY_S)
