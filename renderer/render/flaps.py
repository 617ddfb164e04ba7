"""A service whose settings keep changing, or that keeps leaving a listing, is held: its flapping
costs HAProxy a reload now and then (`SettingsFlaps`, `PresenceFlaps`).

A setting from meta (`haproxy_balance`, `haproxy_mode`, …) changes a section's structure, and
HAProxy takes that only by reloading. One registrant flipping its own service's settings every
100 ms made a reload storm: `ReloadPace` (deliver/apply.py) then lengthens HAProxy's reload gap,
and every other service waits for it, a brand-new one (a new backend: a reload) ~7 s instead of
~0.2 s (the last note's "storm price"). The cause is one service: the hold is that service's.

Each change of a service's served settings counts, fading with FLAP_MEMORY_S. Past FLAP_BURST
changes lately, the change is served and the settings then hold for FLAP_FIRST_HOLD_S, doubling
with each change past the burst up to FLAP_MAX_HOLD_S; a change meanwhile waits (the last served
settings stay) and the newest is taken when the hold ends. A service flipping its settings every
100 ms has four changes served in its first half second, then one after 10 s, 18 s, 30 s, 42 s,
and about one every 51 s for good (test_flaps): far below `ReloadPace`'s burst, so the reload gap
stays at its floor for everyone else. A deploy's change of settings (one, once every instance
carries it) is never held; an operator's fifth change within a few minutes waits up to 10 s.
A service's presence in a listing is held the same way, by its departures (`PresenceFlaps`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

FLAP_BURST = 3.0  # changes of one service's settings within a few minutes that are never held
FLAP_MEMORY_S = 300.0  # how long a change counts (its weight fades with this time constant)
FLAP_FIRST_HOLD_S = 10.0  # the first hold past the burst, doubling with each change past it
FLAP_MAX_HOLD_S = 300.0  # the longest hold

Settings = TypeVar("Settings")


@dataclass(frozen=True)
class Held:
    """A hold: the changes lately that started it, its length, and seconds left (all stable
    during one hold but the last)."""

    changes: int
    hold_s: float
    left_s: float


@dataclass
class _Counted:
    """Changes lately, each fading with FLAP_MEMORY_S, and the hold that passing FLAP_BURST of
    them starts (FLAP_FIRST_HOLD_S, doubling with each change past it, FLAP_MAX_HOLD_S at most)."""

    level: float = 0.0  # the changes lately, each fading with FLAP_MEMORY_S from `counted_at`
    counted_at: float = 0.0  # monotonic
    held_until: float = 0.0  # monotonic: the hold runs until then
    hold_s: float = 0.0

    def lately(self, now: float) -> float:
        return self.level * math.exp(-max(0.0, now - self.counted_at) / FLAP_MEMORY_S)

    def held(self, now: float) -> Held:
        return Held(math.ceil(self.level), self.hold_s, self.held_until - now)

    def count(self, now: float) -> bool:
        """One change more at `now` (monotonic): True when it passes the burst, and a hold begins."""
        self.level, self.counted_at = self.lately(now) + 1.0, now
        if self.level <= FLAP_BURST:
            return False
        self.hold_s = min(FLAP_MAX_HOLD_S, FLAP_FIRST_HOLD_S * 2 ** max(0.0, self.level - FLAP_BURST - 1.0))
        self.held_until = now + self.hold_s
        return True


@dataclass
class _Served(_Counted, Generic[Settings]):
    settings: Settings = field(kw_only=True)
    backed: bool = True  # what most of the service's registrations carry (see `SettingsFlaps.serve`)


@dataclass
class SettingsFlaps(Generic[Settings]):
    """Per service, the settings served and how often they changed lately (kept across renders)."""

    served: dict[str, _Served[Settings]] = field(default_factory=dict)

    def serve(self, service: str, wanted: Settings, now: float, backed: bool = True) -> tuple[Settings, Held | None]:
        """The settings to serve for `service` at `now` (monotonic), when its instances ask for
        `wanted`, and the hold while one runs (the whole hold, whatever is asked meanwhile: its
        note must not come and go with each flip). The same answer for every call of one render:
        the first one counts the change.

        `backed`: most of the service's registrations carry `wanted` (the settings last agreed on,
        `agreed_settings`). A hold never keeps settings that are not against ones that are: an
        attacker's instance, passing alone while the owners' were down, flipped its own value
        into a hold, and HAProxy kept it up to ~30 s after the owners were back (their servers
        failing its health check), where it ended at once before (an attacker's review,
        /tmp/rev34)."""
        served = self.served.get(service)
        if served is None:  # a service first seen: nothing changed
            self.served[service] = _Served(settings=wanted, backed=backed, counted_at=now)
            return wanted, None
        if wanted == served.settings:
            served.backed = backed
        elif now < served.held_until and backed and not served.backed:
            served.settings, served.backed = wanted, True  # the hold goes on, on the owners' settings
        if now < served.held_until:
            return served.settings, served.held(now)
        if wanted == served.settings:
            return wanted, None
        served.settings, served.backed = wanted, backed
        return wanted, served.held(now) if served.count(now) else None

    def forget_all_but(self, services: set[str]) -> None:
        """Drop the services no longer read (a deregistered service's record never outlives it)."""
        for gone in set(self.served) - services:
            del self.served[gone]


MAX_DEPARTURES = 4096  # services whose departures are remembered: a churn of new names cannot grow it
TRIM_EVERY_S = 10.0  # how often the faded ones are looked for (4,096 of them cost ~3 ms a build)
MAX_KEPT_LISTINGS = 64  # listings remembered (a tag read from KV cannot grow it without end)

Item = TypeVar("Item")


@dataclass
class _Departures(_Counted):
    """A service's departures from one listing; its hold keeps it listed."""

    kept: bool = False  # listed by the hold alone (it left and has not come back)
    returned: bool = False  # came back while the hold ran: still coming and going


@dataclass
class PresenceFlaps(Generic[Item]):
    """A service that keeps leaving a listing and coming back is kept listed a while after it leaves.

    A service's section (its backend, its TCP listener) comes and goes with it, and HAProxy takes
    that only by reloading: one registrant toggling its `lb` tag (or deregistering and registering
    again) every 100 ms made a reload each time, HAProxy's reload gap grew to 8 s and a brand-new
    service waited ~5 s (an attacker's review, /tmp/rev38); the settings hold never saw it, since a
    service that leaves is forgotten. Past FLAP_BURST departures lately, the next is not served:
    the service stays listed (with its last tags) for FLAP_FIRST_HOLD_S, doubling up to
    FLAP_MAX_HOLD_S, so its coming and going costs nothing meanwhile; when the hold ends it leaves
    if it stayed gone since it left, and is held again, longer, if it came and went meanwhile. A
    coming back is never held: a redeploy that deregisters every instance first is served again at
    once, whatever its history."""

    served: dict[object, dict[str, Item]] = field(default_factory=dict)  # per listing: name → item last served
    departures: dict[tuple[object, str], _Departures] = field(default_factory=dict)
    _trimmed_at: float = field(default=-math.inf, repr=False)

    def serve(
        self, listing: object, items: dict[str, Item], now: float, may_keep: Callable[[str], bool] = lambda _: True
    ) -> tuple[dict[str, Item], dict[str, Held]]:
        """The items `listing` serves at `now` (monotonic) when the catalog lists `items`: those,
        plus the services that left and are held; and each hold running, whether its service is
        back or not (its note must not come and go with each toggle). Called once per build.
        `may_keep(name)`: False for a name the listing may not hold whatever its history (one
        still in the catalog that it leaves out, one `serve_services` no longer allows, one whose
        HAProxy name a listed service has): it goes at once."""
        before = self.served.pop(listing, {})
        served, held = dict(items), {}
        touched: set[tuple[object, str]] = set()
        for name, item in before.items():
            key = (listing, name)
            record = self.departures.get(key)
            if name in items:
                if record is not None:
                    record.kept = False
                    if now < record.held_until:
                        record.returned = True
                        held[name] = record.held(now)
                continue
            if not may_keep(name):
                if record is not None:
                    record.kept = False
                continue
            record = record or self.departures.setdefault(key, _Departures())
            touched.add(key)
            if now >= record.held_until and not self._held_from_now(record, now):
                continue  # a departure within the burst, or a hold's end: it leaves
            record.kept = True
            served[name], held[name] = item, record.held(now)
        if len(self.served) >= MAX_KEPT_LISTINGS:
            self.served.pop(next(iter(self.served)))
        self.served[listing] = served
        self._trim(now, touched)
        return served, held

    @staticmethod
    def _held_from_now(record: _Departures, now: float) -> bool:
        """A departure from the listing at `now`, or a hold's end with the service gone: counted,
        and held when it passes the burst. A hold's end after the service stayed gone since it left
        is no new departure: it leaves. One that came back and left again meanwhile still comes and
        goes: held again, longer. Otherwise each name of 50 toggled in turn (one registrant, one
        toggle every 100 ms) cost a reload when its hold ended and one when it came back, about
        two a second for good: HAProxy's gap at 12 s, brand-new services 4.3-5.1 s (/tmp/rev41)."""
        if record.kept and not record.returned:
            record.kept = False
            return False
        record.returned = False
        return record.count(now)

    def _trim(self, now: float, touched: set[tuple[object, str]]) -> None:
        """Forget departures that faded (below a twentieth; looked for every TRIM_EVERY_S), then,
        past MAX_DEPARTURES, the ones that left longest ago, never one this build counted nor one
        whose hold runs. By how often they left, a flapper's fresh record (one departure) went
        first, in the build that made it, after a churn of 4,096 names left twice (an attacker's
        review, /tmp/rev40): its hold never began."""
        if len(self.departures) <= MAX_DEPARTURES and now < self._trimmed_at + TRIM_EVERY_S:
            return
        self._trimmed_at = now
        faded = [key for key, r in self.departures.items() if now >= r.held_until and r.lately(now) < 0.05]
        for key in faded:
            del self.departures[key]
        excess = len(self.departures) - MAX_DEPARTURES
        if excess > 0:
            candidates = (
                (r.counted_at, key)
                for key, r in self.departures.items()
                if key not in touched and not r.kept and now >= r.held_until
            )
            for _, key in heapq.nsmallest(excess, candidates, key=lambda pair: pair[0]):
                del self.departures[key]
