"""Naming the services behind a move of the catalog index, from the agent's service summaries.

`/v1/catalog/services` moves on every registration change anywhere but says nothing of where.
The agent's summary of every service (`/v1/internal/ui/services`, what its web UI lists: Consul
1.8+, an internal endpoint) carries each service's instance count, the tags of its instances and
its checks per state. Two summaries differ for the services where an instance came or went, or
its tags changed: one request (~50 ms and ~65 ms of the agent's CPU at 1,000 services × 10,
measured) instead of probing a thousand services (~0.2 s and ~0.4 s). An address, port or meta
change leaves the summaries equal: the caller then sweeps. The endpoint is internal, so any
error turns this off for good and sweeps do all the work, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from renderer.source.client import ConsulRequestError
from renderer.source.fetch import Fetcher

log = logging.getLogger(__name__)

SUMMARY_PATH = "/v1/internal/ui/services"

Summary = tuple[int, tuple[str, ...], int, int, int]


def summarise(item: Mapping[str, Any]) -> Summary:
    """What of one service's summary tells a registration change: instances, tags, checks per state."""
    return (
        int(item.get("InstanceCount") or 0),
        tuple(sorted(str(tag) for tag in item.get("Tags") or ())),
        int(item.get("ChecksPassing") or 0),
        int(item.get("ChecksWarning") or 0),
        int(item.get("ChecksCritical") or 0),
    )


@dataclass
class ServiceSummaries:
    """The last summaries seen, and whether the agent answers for them at all."""

    usable: bool = True
    last: dict[str, Summary] | None = field(default=None, repr=False)

    def changed(self, data: Any) -> set[str] | None:
        """Names whose summary differs from the last answer; None for the first (the baseline) or
        for an answer of a shape we do not know (then nothing is named: the caller sweeps)."""
        try:
            current = {str(item["Name"]): summarise(item) for item in data}
        except (TypeError, KeyError, ValueError, OverflowError, AttributeError):  # 1e400: int(inf)
            self.turn_off(f"unexpected answer for {SUMMARY_PATH}")
            return None
        before, self.last = self.last, current
        if before is None:
            return None
        return {name for name in before.keys() | current.keys() if before.get(name) != current.get(name)}

    async def read_changes(self, fetcher: Fetcher) -> set[str] | None:
        """Read the summaries through `fetcher`: the services that changed since the last read, or
        None (the first read, or an agent without the endpoint, which turns them off)."""
        try:
            result = await fetcher.read(SUMMARY_PATH, [])
        except ConsulRequestError as err:
            if err.status is not None and 400 <= err.status < 500:
                self.turn_off(f"Consul answered {err.status}")
            return None
        except Exception as err:  # an accelerator: never the reason a change is missed
            log.exception("reading %s failed unexpectedly", SUMMARY_PATH)
            self.turn_off(repr(err))
            return None
        if result.data is None:  # 404: an agent without the endpoint
            self.turn_off("Consul answered 404")
            return None
        try:
            data = result.decoded()  # ~530 KB at 1,000 services: left for here (client.DECODE_LATER_CHARS)
        except (ValueError, RecursionError):
            return None  # not JSON we can read: nothing named, the caller sweeps
        return self.changed(data)

    def turn_off(self, why: str) -> None:
        if self.usable:
            log.info("service summaries not used (%s): catalog moves are found by sweeps alone", why)
        self.usable, self.last = False, None
