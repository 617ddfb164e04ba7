"""The change history operators read: each apply with its cause, what it changed, how and how fast.

One `Change` per apply that reached HAProxy (or the template's command): the Consul keys whose data
changed since the template's last apply and their index, the servers added, removed or changed,
how it was applied and, for a reload, why the Runtime API could not take it (the first line that
was not a server line), and the time from the Consul change to applied. The deliver stage says
what an apply changed (`AppliedChange`, built by renderer/deliver/report.py); the runner says which
keys each render read; this module only keeps and shows them.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from renderer.errors import ApplyKind

KEEP_CHANGES = 200  # in memory; /status shows the newest SHOW_CHANGES
SHOW_CHANGES = 50
LATENCY_WINDOW_S = 3600.0  # the page's chart: the last hour
KEEP_LATENCIES = 5000
MAX_LISTED = 20  # keys, or servers of one kind, named per change (the totals are always whole)
KEY_CHARS = 200  # of a key a change names: a service name may be 16 KB (an attacker's review: /status at 16 MB)
TIMED = (ApplyKind.RUNTIME, ApplyKind.RELOAD, ApplyKind.COMMAND, ApplyKind.START)


class ReloadWhy(StrEnum):
    """Why a change went by reload rather than through the Runtime API."""

    STRUCTURAL = "structural"  # a line other than a server line changed (`reload_line` names it)
    RUNTIME_REFUSED = "runtime-refused"  # the Runtime API refused a step; the checked file was reloaded
    SERVERS_ONLY = "servers-only"  # only servers changed, yet no runtime plan (see `text`)
    FIRST = "first"  # no earlier file known to compare with

    @property
    def text(self) -> str:
        return {
            ReloadWhy.STRUCTURAL: "a line other than a server line changed",
            ReloadWhy.RUNTIME_REFUSED: "the Runtime API refused a step; the checked file was reloaded instead",
            ReloadWhy.SERVERS_ONLY: "only server lines changed, but not as Runtime API commands (apply = reload, "
            "no master socket, a retried apply, a server keyword outside the runtime grammar, or a backend whose "
            "balance is static, which HAProxy adds no server to: see the log)",
            ReloadWhy.FIRST: "no earlier file to compare with",
        }[self]


@dataclass(frozen=True)
class Servers:
    """Servers of one kind of change: the first MAX_LISTED named, and how many there were."""

    shown: tuple[str, ...] = ()
    total: int = 0

    @classmethod
    def of(cls, items: list[str]) -> Servers:
        return cls(tuple(items[:MAX_LISTED]), len(items))

    def text(self) -> str:
        """`a`, or `3: a, b, c`, or `12: a, b, c, …`."""
        if self.total == 1:
            return self.shown[0]
        return f"{self.total}: {', '.join(self.shown[:3])}{', …' if self.total > 3 else ''}"


@dataclass(frozen=True)
class AppliedChange:
    """What one apply changed, as the deliver stage saw it. Server entries read
    `backend/server address` (changes: `backend/server what before → after`)."""

    added: Servers = Servers()
    removed: Servers = Servers()
    changed: Servers = Servers()
    reload_why: ReloadWhy | None = None
    reload_line: str | None = None  # e.g. "backend web: + balance leastconn"

    def summary(self) -> str:
        """One line: the server changes, then why it was a reload (if it was)."""
        parts = [f"{verb} {servers.text()}" for verb, servers in self.kinds() if servers.total]
        if self.reload_why is not None:
            why = self.reload_why.text + (f": {self.reload_line}" if self.reload_line else "")
            parts.append(f"reload because {why}")
        return "; ".join(parts) or "no server changed"

    def kinds(self) -> tuple[tuple[str, Servers], ...]:
        return ("added", self.added), ("removed", self.removed), ("changed", self.changed)

    def as_dict(self) -> dict[str, Any]:
        listed = {kind: {"shown": list(servers.shown), "total": servers.total} for kind, servers in self.kinds()}
        return {**listed, "reload_why": self.reload_why, "reload_line": self.reload_line}


@dataclass(frozen=True)
class Change:
    """One apply, as the timeline shows it."""

    at: float  # wall-clock time it was applied
    template: str
    kind: ApplyKind
    after_change_ms: float | None  # from the Consul change to applied
    keys: tuple[tuple[str, int], ...]  # (Consul key, index), newest first, at most MAX_LISTED
    keys_total: int
    what: AppliedChange

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "template": self.template, "kind": self.kind, "after_change_ms": self.after_change_ms,
                "keys": [{"key": key, "index": index} for key, index in self.keys], "keys_total": self.keys_total,
                **self.what.as_dict(), "summary": self.what.summary()}  # fmt: skip


def _short(key: str) -> str:
    return key if len(key) <= KEY_CHARS else f"{key[:KEY_CHARS]}… ({len(key)} characters)"


@dataclass
class Timeline:
    """The last applies (newest last) and their change-to-applied latencies over the last hour."""

    changes: collections.deque[Change] = field(default_factory=lambda: collections.deque(maxlen=KEEP_CHANGES))
    latencies: collections.deque[tuple[float, float, ApplyKind]] = field(
        default_factory=lambda: collections.deque(maxlen=KEEP_LATENCIES)
    )
    _read: dict[str, tuple[float, Mapping[str, tuple[int, float]], int | None]] = field(default_factory=dict)
    # per template: when its last applied render began, and the data's generation then
    _since: dict[str, tuple[float, int | None]] = field(default_factory=dict)

    def rendered_from(
        self, template: str, keys: Mapping[str, tuple[int, float]], generation: int | None = None
    ) -> None:
        """The keys a render of `template` read: key → (index, monotonic time its data last changed).
        Those that did not change since the last applied render (`changed_since`) may be left out;
        `generation`: the data's generation (the Store's) when it rendered."""
        self._read[template] = (time.monotonic(), keys, generation)

    def changed_since(self, template: str) -> int | None:
        """The data's generation at `template`'s last applied render (None: unknown, or none yet):
        `rendered_from` needs only the keys changed after it."""
        return self._since.get(template, (0.0, None))[1]

    def baseline(self, template: str) -> None:
        """The file was live already: later changes count from this render on."""
        rendered_at, _, generation = self._read.get(template, (time.monotonic(), {}, None))
        self._since[template] = (rendered_at, generation)

    def record(self, template: str, kind: ApplyKind, after_change_ms: float | None, what: AppliedChange) -> Change:
        """An apply: its keys are those whose data changed since the template's last applied render."""
        rendered_at, keys, generation = self._read.get(template, (time.monotonic(), {}, None))
        since, _ = self._since.get(template, (float("-inf"), None))
        changed = sorted(((index, key) for key, (index, updated) in keys.items() if updated > since), reverse=True)
        self._since[template] = (rendered_at, generation)
        listed = tuple((_short(key), index) for index, key in changed[:MAX_LISTED])  # a 16 KB name is cut
        change = Change(time.time(), template, kind, after_change_ms, listed, len(changed), what)
        self.changes.append(change)
        if kind in TIMED and after_change_ms is not None:
            self.latencies.append((change.at, after_change_ms, kind))
        return change

    def recent(self, limit: int = SHOW_CHANGES) -> list[Change]:
        """The newest `limit` changes, newest first."""
        return list(reversed(self.changes))[:limit]

    def last_hour(self, now: float | None = None) -> dict[str, Any]:
        """The chart: (time, milliseconds, kind) of every timed apply in the last hour, oldest first,
        with their count, median and maximum."""
        end = time.time() if now is None else now
        kept = [(at, ms, kind) for at, ms, kind in self.latencies if at >= end - LATENCY_WINDOW_S]
        points = [{"at": at, "ms": ms, "kind": kind} for at, ms, kind in kept]
        ordered = sorted(ms for _, ms, _ in kept)
        median = ordered[len(ordered) // 2] if ordered else None
        return {"from": end - LATENCY_WINDOW_S, "to": end, "points": points, "count": len(points),
                "median_ms": median, "max_ms": ordered[-1] if ordered else None}  # fmt: skip
