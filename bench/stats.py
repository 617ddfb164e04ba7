"""The bench's statistics: every attempted change counts, cold apart from hot, a timeout never vanishes.

A sample is the seconds from the Consul call to the change seen through HAProxy, or None when it
was not seen within the deadline (a timeout, including a removal of an instance the probe never
saw: there is nothing to time it from). NaN is taken as a timeout too, never dropped and never 0.
Percentiles rank timeouts after every measured change, so a percentile that falls on one is
reported as None ("TO" in the tables), not as the slowest measured change. No sample at all gives
None everywhere, never 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum


class Kind(StrEnum):
    ADD = "add"
    CHECK_FAIL = "check_fail"
    CHECK_PASS = "check_pass"
    REMOVE = "remove"

    @property
    def appears(self) -> bool:
        """Timed to the instance's first response (else to its last)."""
        return self in (Kind.ADD, Kind.CHECK_PASS)


def measured(sample: float | None) -> bool:
    return sample is not None and not math.isnan(sample)


@dataclass
class Stats:
    """Over `count` attempted changes, `timeouts` of them not seen in time; times in ms."""

    count: int
    timeouts: int
    median_ms: float | None
    p95_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, samples_s: list[float | None]) -> Stats:
        ms = sorted(round(s * 1000, 1) for s in samples_s if s is not None and not math.isnan(s))
        timeouts = len(samples_s) - len(ms)
        ranked: list[float | None] = [*ms, *([None] * timeouts)]
        if not ranked:
            return cls(0, 0, None, None, None)
        return cls(len(ranked), timeouts, _median(ranked), _rank(ranked, 0.95), _rank(ranked, 1.0))

    def cell(self) -> str:
        """median/p95/max for a table: "-" without a sample, "TO" where a timeout falls."""
        if not self.count:
            return "-"
        return "/".join(ms_cell(v, self.count) for v in (self.median_ms, self.p95_ms, self.max_ms))


def ms_cell(value: float | None, count: int) -> str:
    """One figure for a table: "-" when nothing was attempted, "TO" where a timeout falls."""
    if not count:
        return "-"
    return "TO" if value is None else f"{value:.0f}"


def _rank(ranked: list[float | None], q: float) -> float | None:
    return ranked[min(len(ranked) - 1, round(q * (len(ranked) - 1)))]


def _median(ranked: list[float | None]) -> float | None:
    """None when either middle sample is a timeout: the median is then not known."""
    low, high = ranked[(len(ranked) - 1) // 2], ranked[len(ranked) // 2]
    return None if low is None or high is None else round((low + high) / 2, 1)


@dataclass
class Split:
    """One set of changes, cold (the service's first change in the run) apart from hot."""

    cold: Stats
    hot: Stats

    def side(self, cold: bool) -> Stats:
        return self.cold if cold else self.hot


@dataclass(frozen=True)
class Change:
    service: str
    kind: Kind
    cold: bool
    seconds: float | None  # None or NaN: not seen within the deadline
    at: float = 0.0  # wall clock (Unix time) when its Consul call returned: to find it in the renderer's log


@dataclass
class Ledger:
    """Every measured change in order; a change is cold when its service was not changed before
    in the run (the very first change after start is always cold), hot otherwise."""

    changes: list[Change] = field(default_factory=list)
    _touched: set[str] = field(default_factory=set)

    def record(self, service: str, kind: Kind, seconds: float | None, at: float = 0.0) -> Change:
        change = Change(service, kind, service not in self._touched, seconds, at)
        self._touched.add(service)
        self.changes.append(change)
        return change

    def samples(self, kind: Kind | None = None, cold: bool | None = None) -> list[float | None]:
        return [
            c.seconds for c in self.changes if (kind is None or c.kind == kind) and (cold is None or c.cold == cold)
        ]

    def split(self, kind: Kind | None = None) -> Split:
        return Split(Stats.of(self.samples(kind, cold=True)), Stats.of(self.samples(kind, cold=False)))

    def first(self) -> Stats:
        """The first change after the renderer started (count 0 when there was none)."""
        return Stats.of([c.seconds for c in self.changes[:1]])

    @property
    def timeouts(self) -> int:
        return sum(1 for c in self.changes if not measured(c.seconds))


def finite(value: object) -> object:
    """`value` for JSON: NaN and infinities become null (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
