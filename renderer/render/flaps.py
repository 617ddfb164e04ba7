"""A service whose settings keep changing, or that keeps leaving a listing, is held: its flapping
costs HAProxy a reload now and then (`SettingsFlaps`, `PresenceFlaps`).

A setting from meta (`haproxy_balance`, `haproxy_mode`, …) changes a section's structure, and
HAProxy takes that only by reloading. One registrant flipping its own service's settings every
100 ms made a reload storm: `ReloadPace` (deliver/apply.py) then lengthens HAProxy's reload gap,
and every other service waits for it, a brand-new one (a new backend: a reload) ~7 s instead of
~0.2 s (the last note's "storm price"). The cause is one service: the hold is that service's.

Each change of a service's served settings counts, fading with FLAP_MEMORY_S. Past FLAP_BURST
changes lately, the change is served and the settings then hold for FLAP_FIRST_HOLD_S, doubling
with each change past the burst up to FLAP_MAX_HOLD_S, and to the next turn of HOLD_TURN_S; a
change meanwhile waits (the last served settings stay) and the newest is taken when the hold
ends. A service flipping its settings every 100 ms has four changes served in its first half
second, then one on each of the next three turns, and about one a minute for good (test_flaps):
below `ReloadPace`'s burst, so the reload gap stays at its floor for everyone else. A deploy's
change of settings (one, once every instance carries it) is never held; an operator's fifth
change within a few minutes waits up to 40 s. A service's presence in a listing is held the same
way, by its departures (`PresenceFlaps`). Holds are per name and names are free: the renders
that reload HAProxy are counted for all services too (`_Rate`), and past its burst every change
but a brand-new service waits for the next turn. Settings most of a service's registrations do
not carry wait in a storm, and past MAX_UNBACKED services serving such settings, for
UNBACKED_MAX_WAIT_S at most (`SettingsFlaps`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from renderer.decay import faded

FLAP_BURST = 3.0  # changes of one service's settings within a few minutes that are never held
FLAP_MEMORY_S = 300.0  # how long a change counts (its weight fades with this time constant)
FLAP_FIRST_HOLD_S = 10.0  # the first hold past the burst, doubling with each change past it
FLAP_MAX_HOLD_S = 300.0  # the longest hold
HOLD_TURN_S = 30.0  # holds end, and a flapper's coming back is served, on these turns of the clock: one reload for all


def turn_after(at: float) -> float:
    """The first turn (a multiple of HOLD_TURN_S of the monotonic clock) at or after `at`. Holds of
    many services end together: one registrant's 50 names, each waiting out its hold gone and
    coming back as it ended, cost a reload per end and per comeback, ~1.5 a second for good
    (an attacker's review, /tmp/rev42); on shared turns, one per turn."""
    return math.ceil(at / HOLD_TURN_S) * HOLD_TURN_S


Settings = TypeVar("Settings")


@dataclass(frozen=True)
class Held:
    """A hold: the changes lately that started it, its length, and seconds left (all stable
    during one hold but the last)."""

    changes: int
    hold_s: float
    left_s: float
    # "held": the service's own hold; "waiting": back after it left, it waits for the turn in
    # `left_s` (PresenceFlaps); "storm": the listing, or all services' settings, changed often
    # lately, and this change waits for the turn (`_Rate`); "unbacked": settings most of the
    # service's registrations do not carry wait while a storm runs or MAX_UNBACKED services serve
    # such settings (`SettingsFlaps.serve`)
    why: Literal["held", "waiting", "storm", "unbacked"] = "held"


SHARED_BURST = 6.0  # renders that changed a listing, or any service's settings, within about a minute: no storm
SHARED_CALM = 1.0  # … and a storm lasts until fewer than this are left (fading): about a minute without
SHARED_MEMORY_S = 60.0  # how long such a render counts (its weight fades with this time constant)


@dataclass
class _Rate:
    """The renders that changed a listing (or any service's settings) lately, each a reload of
    HAProxy, fading with SHARED_MEMORY_S. Holds are per name, and names cost a registrant nothing:
    past SHARED_BURST of them (ReloadPace's burst, and one name's own) a storm begins, and the
    changes wait for the next turn, until fewer than SHARED_CALM are left. It counts the changes
    served, not the ones asked for: departures kept and back before the turn, which change
    nothing, kept a listing storming for good at no cost, and every other service's changes
    waited for the turns (an attacker's review, /tmp/rev44); and one storm lasts while the turns
    change something, else the count hovered at the burst and the changes between turns came
    back (12 reloads in a minute)."""

    level: float = 0.0
    counted_at: float = -math.inf  # monotonic: the last render counted
    storm: bool = False
    _decided_at: float = math.nan  # the render `storm` was decided for

    def count(self, now: float) -> None:
        """A render at `now` served a change (counted once, however many it served, and however
        many templates the pass rendered at that `now`), after the render's storm is decided."""
        self.storming(now)
        if now != self.counted_at:
            self.level, self.counted_at = self.lately(now) + 1.0, now

    def lately(self, now: float) -> float:
        return faded(self.level, self.counted_at, now, SHARED_MEMORY_S)

    def storming(self, now: float) -> bool:
        """A storm, as the render at `now` began: the changes of one render go together."""
        if now != self._decided_at:
            level, self._decided_at = self.lately(now), now
            self.storm = level > SHARED_BURST or (self.storm and level >= SHARED_CALM)
        return self.storm


@dataclass
class _Counted:
    """Changes lately, each fading with FLAP_MEMORY_S, and the hold that passing FLAP_BURST of
    them starts (FLAP_FIRST_HOLD_S, doubling with each change past it, FLAP_MAX_HOLD_S at most,
    then to the next turn: `turn_after`)."""

    level: float = 0.0  # the changes lately, each fading with FLAP_MEMORY_S from `counted_at`
    counted_at: float = 0.0  # monotonic
    held_until: float = 0.0  # monotonic: the hold runs until then
    hold_s: float = 0.0
    storm: bool = False  # the hold is a storm's (`_Rate`: to the next turn), not its own

    def lately(self, now: float) -> float:
        return faded(self.level, self.counted_at, now, FLAP_MEMORY_S)

    def held(self, now: float) -> Held:
        return Held(math.ceil(self.level), self.hold_s, self.held_until - now, "storm" if self.storm else "held")

    def wait_for_turn(self, now: float) -> None:
        self.storm, self.held_until = True, turn_after(now)

    def count(self, now: float) -> bool:
        """One change more at `now` (monotonic): True when it passes the burst, and a hold begins."""
        self.level, self.counted_at = self.lately(now) + 1.0, now
        if self.level <= FLAP_BURST:
            return False
        self.storm = False
        self.hold_s = min(FLAP_MAX_HOLD_S, FLAP_FIRST_HOLD_S * 2 ** max(0.0, self.level - FLAP_BURST - 1.0))
        self.held_until = turn_after(now + self.hold_s)
        return True


MAX_UNBACKED = 4  # services serving settings most of their registrations do not carry, at most (see `SettingsFlaps`)
# … unless one asked for such settings this long without a break: then served at the next turn, as a
# storm's change is (an attacker's review, /tmp/rev74: four names of its own filled the cap, and
# critical registrations without meta outnumbering a service's owners held the owners' unanimous
# change of their health check's path for good: HAProxy checked the retired path and marked every
# server down).
UNBACKED_MAX_WAIT_S = FLAP_MAX_HOLD_S


@dataclass
class _Served(_Counted, Generic[Settings]):
    settings: Settings = field(kw_only=True)
    backed: bool = True  # what most of the service's registrations carry (see `SettingsFlaps.serve`)
    unbacked_wait: bool = False  # the change waiting is to settings most registrations do not carry
    unbacked_since: float | None = None  # monotonic: since when such a change waits (without a break)
    # The unbacked settings served were served past UNBACKED_MAX_WAIT_S: the step back to backed ones
    # is an ordinary change (the turns, in a storm), not one at once: served at once, every name of a
    # registrant's could step back off the turns every 5 minutes, past the cap (helper-129, /tmp/rev75:
    # 22 reloads a minute with 150 names, against 2 before the bound).
    waited_through: bool = False

    def held(self, now: float) -> Held:
        held = super().held(now)
        return Held(held.changes, held.hold_s, held.left_s, "unbacked") if self.unbacked_wait else held

    def waited_out(self, now: float) -> bool:
        """Whether a wait for unbacked settings has lasted UNBACKED_MAX_WAIT_S (it begins now if none
        runs): the change is then served at this turn, storm or cap."""
        if self.unbacked_since is None:
            self.unbacked_since = now
        return now - self.unbacked_since >= UNBACKED_MAX_WAIT_S


@dataclass
class SettingsFlaps(Generic[Settings]):
    """Per service, the settings served and how often they changed lately, and how often all
    services' settings changed (kept across renders): past `_Rate`'s burst, a storm, and every
    service's next change waits for the next turn.

    Settings most of a service's registrations do not carry (`backed` False: its instances passing
    alone while the others are critical, see `agreed_settings`) are served, but give way at once to
    the ones most carry when they are back (the owners of a service are back from a redeploy beside
    an attacker's instance: its health check must not keep marking them down). Those at-once
    changes are off the turns, one per service, and names are free: so a change to settings most
    registrations do not carry, from ones they do, waits while a storm runs, and while
    MAX_UNBACKED services serve such settings already. One registrant's 20 names, each flipping an
    instance passing alone between such a value and the agreed one, made ~25 reloads a minute in a
    storm (an attacker's review, /tmp/rev46): each name's flip back cost one off the turns. Such a
    wait lasts UNBACKED_MAX_WAIT_S at most while the ask goes on (a pause ends it: more than half of
    the registered instances served and carrying the served settings): the owners' own change,
    outvoted by critical registrations, is served then."""

    served: dict[str, _Served[Settings]] = field(default_factory=dict)
    # The reloads lately, shared with the listings (`PresenceFlaps.changes`): 50 names' settings, each
    # below its burst, made 23 reloads a minute; a listing's and the settings' storms, each below its
    # burst, made 9 together (/tmp/rev44, /tmp/rev45).
    changes: _Rate = field(default_factory=_Rate)
    unbacked: set[str] = field(default_factory=set)  # the services served settings not `backed`

    def serving(self, service: str) -> Settings | None:
        """The settings served for `service`, if it has a record."""
        served = self.served.get(service)
        return served.settings if served is not None else None

    def serve(
        self,
        service: str,
        wanted: Settings,
        now: float,
        backed: bool = True,
        fallback: Settings | None = None,
        paused: bool | None = None,
    ) -> tuple[Settings, Held | None]:
        """The settings to serve for `service` at `now` (monotonic), when its instances ask for
        `wanted`, and the hold while one runs (the whole hold, whatever is asked meanwhile: its
        note must not come and go with each flip). The same answer for every call of one render:
        the first one counts the change.

        `backed`: most of the service's registrations carry `wanted` (the settings last agreed on,
        `agreed_settings`); `fallback`: the ones they carry, served to a service first seen (or
        back after it left) asking for others while those wait. A hold never keeps settings that
        are not against ones that are: an attacker's instance, passing alone while the owners'
        were down, flipped its own value into a hold, and HAProxy kept it up to ~30 s after the
        owners were back (their servers failing its health check), where it ended at once before
        (an attacker's review, /tmp/rev34); a storm's wait neither: the first of a render's calls
        began one and the next ones replaced the value, so one render's route and backend disagreed
        (an HTTP route to a TCP listener, /tmp/rev48).

        `paused`: no unbacked change is asked for now, which ends a wait for one (default: `wanted`
        is what is served). The caller says so when more than half of the service's registered
        instances are served ones carrying the settings served (`template.most_carry_all`):
        `wanted` falls back to them whenever instances disagree, so one instance without meta
        passing for a moment among the owners asking for their change restarted the wait, and an
        attacker holding a moment every 100 s kept the owners' new check path from HAProxy for good
        (helper-129, /tmp/rev75). Counting only pauses a turn long instead let owners whose health
        flaps have an attacker's value served over them (helper-135, /tmp/rev81); counting the
        served instances alone let four passing ones of an attacker's hold it (helper-137)."""
        served = self.served.get(service)
        if served is None:
            return self._first_seen(service, wanted, now, backed, fallback)
        if served.unbacked_wait and backed:  # it waited for unbacked settings only
            served.held_until, served.storm, served.unbacked_wait = now, False, False
        if wanted == served.settings if paused is None else paused:
            served.unbacked_since = None  # no wait for unbacked settings goes on
        # With nothing served changing, `backed` only rises, and only outside a hold. Following the
        # registrations' health, it let held settings change ~40 times a minute (/tmp/rev45) and marked
        # services unbacked past the storm and the cap, each owners' change then served at once: 20
        # names, 20 reloads a minute off the turns (/tmp/rev49). Rising in a hold, the owners gone for a
        # moment made an attacker's held value backed, and it stayed 57 s after they were back (/tmp/rev52).
        if wanted == served.settings:
            if now >= served.held_until:
                served.backed = served.backed or backed
        elif backed and not served.backed and not served.waited_through:  # the owners' replace it at once
            self.changes.count(now)
            served.settings, served.backed = wanted, True
            if now >= served.held_until:
                served.storm = False
                self._mark(service, served)
                return wanted, served.held(now) if served.count(now) else None
        self._mark(service, served)
        if now < served.held_until:  # the hold goes on (on the owners' settings, if they came back)
            return served.settings, served.held(now)
        served.unbacked_wait = False  # over: it stayed, and a later backed ask ended the next own hold
        if wanted == served.settings:
            served.storm = False
            return wanted, None
        waited_through = served.backed and not backed and self._unbacked_wait(now)
        if waited_through and not served.waited_out(now):
            served.wait_for_turn(now)  # looked at again at each turn
            served.unbacked_wait = True
            return served.settings, served.held(now)
        if not served.storm and self.changes.storming(now):  # many services' changes: this one waits for the turn
            served.wait_for_turn(now)
            return served.settings, served.held(now)
        self.changes.count(now)
        served.storm, served.settings, served.backed, served.unbacked_since = False, wanted, backed, None
        served.waited_through = waited_through
        self._mark(service, served)
        return wanted, served.held(now) if served.count(now) else None

    def _first_seen(
        self, service: str, wanted: Settings, now: float, backed: bool, fallback: Settings | None
    ) -> tuple[Settings, Held | None]:
        """A service first seen, or back after it left (its record forgotten then): nothing changed,
        its settings are served, unless they are unbacked and such settings wait: then the backed
        ones (`fallback`), to the turn. A registrant's names, each coming back on a turn asking for
        an unbacked value and its owners' then, had one reload off the turns each (20 names per turn:
        42 reloads a minute; an attacker's review, /tmp/rev48)."""
        if not backed and fallback is not None and self._unbacked_wait(now):
            self.served[service] = served = _Served(settings=fallback, counted_at=now)
            served.wait_for_turn(now)
            served.unbacked_wait, served.unbacked_since = True, now
            return fallback, served.held(now)
        self.served[service] = served = _Served(settings=wanted, backed=backed, counted_at=now)
        self._mark(service, served)
        return wanted, None

    def _unbacked_wait(self, now: float) -> bool:
        """Settings most registrations do not carry wait: a storm runs, or enough serve such settings."""
        return self.changes.storming(now) or len(self.unbacked) >= MAX_UNBACKED

    def _mark(self, service: str, served: _Served[Settings]) -> None:
        if served.backed:
            self.unbacked.discard(service)
        else:
            self.unbacked.add(service)

    def forget_all_but(self, services: set[str]) -> None:
        """Drop the services no longer read (a deregistered service's record never outlives it)."""
        for gone in set(self.served) - services:
            del self.served[gone]
            self.unbacked.discard(gone)


MAX_DEPARTURES = 4096  # services whose departures are remembered: a churn of new names cannot grow it
TRIM_EVERY_S = 10.0  # how often the faded ones are looked for (4,096 of them cost ~3 ms a build)
MAX_KEPT_LISTINGS = 64  # listings remembered (a tag read from KV cannot grow it without end)
MAX_STORM_KEPT = MAX_DEPARTURES  # services that left a listing its storm keeps to the next turn (past them, at once)

Item = TypeVar("Item")


@dataclass
class _Departures(_Counted):
    """A service's departures from one listing; its hold keeps it listed."""

    kept: bool = False  # listed by the hold alone (it left and has not come back)
    returned: bool = False  # came back while the hold ran: still coming and going


@dataclass
class _Listed(Generic[Item]):
    """What a listing served last, the services back in the catalog it has not served yet (name →
    the turn it serves them at), and the services its storm keeps."""

    items: dict[str, Item] = field(default_factory=dict)
    waiting: dict[str, float] = field(default_factory=dict)
    storm_kept: int = 0  # services that left and are kept to the next turn by the storm


@dataclass
class PresenceFlaps(Generic[Item]):
    """A service that keeps leaving a listing and coming back is kept listed a while after it leaves;
    a listing that keeps changing changes on turns.

    A service's section (its backend, its TCP listener) comes and goes with it, and HAProxy takes
    that only by reloading: one registrant toggling its `lb` tag (or deregistering and registering
    again) every 100 ms made a reload each time, HAProxy's reload gap grew to 8 s and a brand-new
    service waited ~5 s (an attacker's review, /tmp/rev38); the settings hold never saw it, since a
    service that leaves is forgotten. Past FLAP_BURST departures lately, the next is not served:
    the service stays listed (with its last tags) for FLAP_FIRST_HOLD_S, doubling up to
    FLAP_MAX_HOLD_S, to the next turn (`turn_after`), so its coming and going costs nothing
    meanwhile; when the hold ends it leaves if it stayed gone since it left, and is held again,
    longer, if it came and went meanwhile. Such a service coming back after it left is served at
    the next turn, with every other one then.

    Holds are per name, and names cost a registrant nothing: 50 names, each waiting out its hold
    gone and coming back as it ended, made ~1.5 listing changes a second (/tmp/rev42), and 50
    names each toggled once a minute, below any name's burst, 50 a minute. So past SHARED_BURST
    reloads lately (`changes`: the renders that changed a listing or a service's settings), the
    next departures and comebacks wait for the next turn: one reload a turn for all of them. A
    brand-new service is served at once whatever the listing does, and so is a service coming back
    while the listing is calm (a redeploy that deregisters every instance first)."""

    served: dict[object, _Listed[Item]] = field(default_factory=dict)  # per listing: what it served last
    changes: _Rate = field(default_factory=_Rate)  # the reloads lately: every listing's, and the settings' (shared)
    departures: dict[tuple[object, str], _Departures] = field(default_factory=dict)
    _trimmed_at: float = field(default=-math.inf, repr=False)

    def serve(
        self, listing: object, items: dict[str, Item], now: float, may_keep: Callable[[str], bool] = lambda _: True
    ) -> tuple[dict[str, Item], dict[str, Held]]:
        """The items `listing` serves at `now` (monotonic) when the catalog lists `items`: those,
        but the ones back that wait for a turn, plus the services that left and are held; and each
        hold running, whether its service is back or not (its note must not come and go with each
        toggle), and each wait. Called once per build. `may_keep(name)`: False for a name the
        listing may not hold whatever its history (one still in the catalog that it leaves out,
        one `serve_services` no longer allows, one whose HAProxy name a listed service has): it
        goes at once."""
        known = self.served.pop(listing, None)
        last = known or _Listed[Item]()
        stormy = self.changes.storming(now)
        listed = _Listed[Item](dict(items), {})
        held: dict[str, Held] = {}
        touched: set[tuple[object, str]] = set()
        for name, item in last.items.items():
            record = self.departures.get((listing, name))
            if name in items:
                if record is not None:
                    record.kept = False
                    if now < record.held_until:
                        record.returned = True
                        if not record.storm:  # its own hold: said while it runs, back or not
                            held[name] = record.held(now)
            elif not may_keep(name):
                if record is not None:
                    record.kept = False
            elif self._kept(listing, name, stormy and last.storm_kept + listed.storm_kept < MAX_STORM_KEPT, now):
                touched.add((listing, name))
                record = self.departures[(listing, name)]
                listed.items[name], held[name] = item, record.held(now)
                listed.storm_kept += int(record.storm)
            else:
                touched.add((listing, name))
        for name in items.keys() - last.items.keys():
            back_at = self._back_at(listing, name, last.waiting.get(name), stormy, now)
            if back_at is not None:
                touched.add((listing, name))
                del listed.items[name]
                listed.waiting[name] = back_at
                record = self.departures[(listing, name)]
                why: Literal["waiting", "storm"] = "waiting" if record.lately(now) > FLAP_BURST else "storm"
                held[name] = Held(math.ceil(record.level), record.hold_s, back_at - now, why=why)
        if known is not None and listed.items.keys() != last.items.keys():  # a reload: counted, brand-new ones too
            self.changes.count(now)
        if len(self.served) >= MAX_KEPT_LISTINGS:
            self.served.pop(next(iter(self.served)))
        self.served[listing] = listed
        self._trim(now, touched)
        return listed.items, held

    def _kept(self, listing: object, name: str, stormy: bool, now: float) -> bool:
        """A service last served and gone from the catalog's listing: kept while its hold runs; at
        the hold's end, kept again (longer) if it came and went meanwhile, else it leaves; any other
        departure counts, and is kept when it passes the service's burst (a hold of its own) or
        while the listing storms (to the next turn)."""
        record = self.departures.setdefault((listing, name), _Departures())
        if now < record.held_until:
            record.kept = True
            return True
        if record.kept and not record.returned:  # a hold's end, the service gone since it left
            record.kept = record.storm = False
            return False
        # A departure, or a hold's end after the service came and went: otherwise each name of 50
        # toggled in turn (one toggle every 100 ms) cost a reload when its hold ended and one when
        # it came back, about two a second for good (/tmp/rev41).
        record.returned = False
        if record.count(now):
            record.kept = True
        elif stormy:
            record.kept = True
            record.wait_for_turn(now)
        else:
            record.kept = record.storm = False
        return record.kept

    def _back_at(self, listing: object, name: str, waited: float | None, stormy: bool, now: float) -> float | None:
        """The turn a service back in the listing (not served in its last build) is served at, or
        None for at once: a brand-new one, or one back while the listing is calm and it left no
        more than FLAP_BURST times lately. A wait goes on to the turn it began with; a new one counts
        as a change of the service too: else a registrant leaving again before each turn let its
        count fade below the burst while it waited, and was then served at once, off the turns
        (50 names: ~0.6 listing changes a second)."""
        record = self.departures.get((listing, name))
        if record is None:
            return None
        if waited is None:
            flapping = record.lately(now) > FLAP_BURST
            if flapping:
                record.count(now)
            elif not stormy:
                return None
            waited = turn_after(now)
        return waited if now < waited else None

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
