"""A service whose settings keep changing is held: its flapping costs HAProxy a reload now and then.

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
"""

from __future__ import annotations

import math
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
class _Served(Generic[Settings]):
    settings: Settings
    backed: bool = True  # what most of the service's registrations carry (see `SettingsFlaps.serve`)
    level: float = 0.0  # the changes lately, each fading with FLAP_MEMORY_S from `changed_at`
    changed_at: float = 0.0  # monotonic
    held_until: float = 0.0  # monotonic: no change is served before it
    hold_s: float = 0.0

    def lately(self, now: float) -> float:
        return self.level * math.exp(-max(0.0, now - self.changed_at) / FLAP_MEMORY_S)

    def held(self, now: float) -> Held:
        return Held(math.ceil(self.level), self.hold_s, self.held_until - now)


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
            self.served[service] = _Served(wanted, backed, changed_at=now)
            return wanted, None
        if wanted == served.settings:
            served.backed = backed
        elif now < served.held_until and backed and not served.backed:
            served.settings, served.backed = wanted, True  # the hold goes on, on the owners' settings
        if now < served.held_until:
            return served.settings, served.held(now)
        if wanted == served.settings:
            return wanted, None
        level = served.lately(now) + 1.0
        served.settings, served.backed, served.level, served.changed_at = wanted, backed, level, now
        if level <= FLAP_BURST:
            return wanted, None
        served.hold_s = min(FLAP_MAX_HOLD_S, FLAP_FIRST_HOLD_S * 2 ** max(0.0, level - FLAP_BURST - 1.0))
        served.held_until = now + served.hold_s
        return wanted, served.held(now)

    def forget_all_but(self, services: set[str]) -> None:
        """Drop the services no longer read (a deregistered service's record never outlives it)."""
        for gone in set(self.served) - services:
            del self.served[gone]
