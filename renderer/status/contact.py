"""Is the renderer still hearing from Consul? Its contact with the agent, and the stale-data watchdog.

The data is current while every watched key's query is answered or held open by Consul (a held
blocking query is Consul's way of saying "nothing new"). Its age is 0 then; while any key's query
fails, the time since that outage began; before the first answer, the time since the start. Past
`max_data_age` the data is stale: the Consul check turns warning, and critical past twice that.
The last good file keeps serving all along. A network that drops packets silently is noticed when
a held query times out (its wait plus 1/16 plus 5 s: about 69 s with the default 60 s wait over
HTTP/1.1), or over HTTP/2 (10-minute waits) when a connection's PING goes unanswered (within 25 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Freshness(StrEnum):
    FRESH = "fresh"
    WARNING = "warning"  # no answer for max_data_age
    CRITICAL = "critical"  # no answer for twice max_data_age
    OFF = "off"  # max_data_age = 0: no watchdog

    @classmethod
    def of(cls, age_s: float, max_age_s: float) -> Freshness:
        if max_age_s <= 0:
            return cls.OFF
        return cls.CRITICAL if age_s >= 2 * max_age_s else cls.WARNING if age_s >= max_age_s else cls.FRESH


class KeyView(Protocol):
    @property
    def index(self) -> int: ...

    @property
    def has_data(self) -> bool: ...

    @property
    def updated_at(self) -> float: ...


class StoreView(Protocol):
    """What the contact reads of the watcher's Store (renderer/source/store.py)."""

    @property
    def keys(self) -> Mapping[str, KeyView]: ...

    @property
    def last_error(self) -> str | None: ...

    def failing(self) -> int: ...


class WatcherView(Protocol):
    """What the contact reads of the Watcher (renderer/source/watch.py)."""

    @property
    def watched(self) -> int: ...

    @property
    def budgeted(self) -> bool: ...


@dataclass(frozen=True)
class ConsulContact:
    """The renderer's contact with Consul at one moment."""

    address: str
    watched: int  # keys the templates use
    failing: int  # of them, those whose last query failed
    budgeted: bool  # past the connection budget: services followed through catalog-wide triggers
    max_connections: int
    index: int  # the highest Consul index seen
    last_data_at: float | None  # wall-clock time of the last new data
    failing_since: float | None  # wall-clock start of the current outage
    last_error: str | None
    data_age_s: float
    max_data_age_s: float

    @property
    def freshness(self) -> Freshness:
        return Freshness.of(self.data_age_s, self.max_data_age_s)

    def describe(self) -> str:
        """The stale-data line of the check and the page's banner."""
        failing = f"{self.failing} of {self.watched} watched keys get no answer" if self.failing else "no answer yet"
        error = f"; last error: {self.last_error}" if self.last_error else ""
        return (
            f"no answer from Consul at {self.address} for {self.data_age_s:.0f}s (max_data_age "
            f"{self.max_data_age_s:.0f}s; {failing}): the last good config keeps serving{error}"
        )

    def budget(self) -> str:
        """How the watched keys use the connection budget."""
        if self.budgeted:
            return (
                f"{self.watched} keys on a budget of {self.max_connections} connections: services followed through "
                "catalog-wide triggers and sweeps (past the budget, now or lately)"
            )
        return f"{self.watched} blocking queries (one per key) within a budget of {self.max_connections} connections"

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget(),
            "address": self.address, "watched": self.watched, "failing": self.failing, "budgeted": self.budgeted,
            "max_connections": self.max_connections, "index": self.index, "last_data_at": self.last_data_at,
            "failing_since": self.failing_since, "last_error": self.last_error,
            "data_age_s": round(self.data_age_s, 1), "max_data_age_s": self.max_data_age_s,
            "freshness": self.freshness, "stale": self.describe() if self.freshness in STALE else None,
        }  # fmt: skip


STALE = (Freshness.WARNING, Freshness.CRITICAL)


def _wall(monotonic: float, now_mono: float, now_wall: float) -> float:
    return now_wall - (now_mono - monotonic)


@dataclass
class ContactReader:
    """Reads the contact from the watcher's own bookkeeping, at the moment it is asked."""

    address: str
    store: StoreView
    watcher: WatcherView
    max_connections: int
    max_data_age_s: float
    outage_since: Callable[[], float | None]  # monotonic start of the outage (the runner's report)
    started: float = field(default_factory=time.monotonic)

    def read(self) -> ConsulContact:
        now, wall = time.monotonic(), time.time()
        failing = self.store.failing()
        keys = list(self.store.keys.values())
        has_data = any(key.has_data for key in keys)
        since = self.outage_since() if failing else None
        if not has_data:
            age = now - self.started
        elif failing:
            age = now - since if since is not None else 0.0
        else:
            age = 0.0
        updated = max((key.updated_at for key in keys if key.has_data), default=None)
        return ConsulContact(
            address=self.address,
            watched=self.watcher.watched,
            failing=failing,
            budgeted=self.watcher.budgeted,
            max_connections=self.max_connections,
            index=max((key.index for key in keys), default=0),
            last_data_at=_wall(updated, now, wall) if updated is not None else None,
            failing_since=_wall(since, now, wall) if since is not None else None,
            last_error=self.store.last_error if failing else None,
            data_age_s=max(age, 0.0),
            max_data_age_s=self.max_data_age_s,
        )
