"""Listings of the catalog's services for templates, built once per catalog answer.

A template asks for the same listing at every render, and at 1,000 services building it (or the
list of its names, sorted) costs a millisecond or two. `ServiceListings` builds each listing once
per catalog answer (kept by identity: the store replaces a value only when it changed) and keeps
it across renders. It hands out tuples, so no template can change what the next render reads.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from renderer.haproxy.checked import NAME_HOLD_S, Holder, hap_name, unique_names
from renderer.logs import shown
from renderer.render.flaps import HOLD_TURN_S, SHARED_BURST, Held, PresenceFlaps
from renderer.source.dependency import unsafe_char

# Consul 1.8 cannot answer /v1/health/service/NAME for these: following one would hold every render
# back, so the service is left out (a key refused all the same is served empty: see Watcher.refuse).
MAX_ASKED_NAME_BYTES = 16 * 1024  # quoted, up to 48 KiB of request line (Consul takes 1 MiB of header)


def unaskable(name: str) -> str | None:
    """Why Consul cannot be asked about a service of this name (None: it can). Measured on 1.8.7,
    both protocols: a name with a character Go does not print (controls, U+2028, a zero-width
    space, a non-ASCII space) is answered 400, and Python's `isprintable` refuses the same ones; a
    name of 1.1 MB, 431; a `/` or a path of `.` or `..` names another path once cleaned."""
    if name in (".", "..") or "/" in name:
        return "a name with '/', or '.' or '..', cannot be asked of Consul's health endpoint"
    if not name.isprintable():
        return "a name with a control, format or separator character: Consul answers 400 for it"
    if len(name.encode()) > MAX_ASKED_NAME_BYTES:
        return f"a name over {MAX_ASKED_NAME_BYTES} bytes is too long to ask Consul about"
    return None


@dataclass(frozen=True)
class ServedServices:
    """The services a listing may hold (config `serve_services`): names and shell patterns,
    matched case for case (`web` allows no `WEB`, which would share its backend name and Host
    beside a default service reached through `also`), their wildcards never matching a `.`."""

    patterns: tuple[str, ...] = ("*",)
    _match: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.patterns != ("*",):
            joined = "|".join(f"(?:{pattern_regex(p)})" for p in self.patterns) or "(?!)"
            object.__setattr__(self, "_match", re.compile(joined))

    def refusal(self, name: str) -> str | None:
        """Why a service of this name is not served (None: it may be)."""
        if self._match is None or self._match.match(name):
            return None
        listed = ",".join(self.patterns) or "none"  # the operator's own, checked printable
        listed = listed if len(listed) <= 200 else listed[:200] + "…"
        return (
            f"not among serve_services ({listed}): left out, with no route; add its name to serve_services "
            "(--serve-services, CONSUL_RENDERER_SERVE_SERVICES) to serve it"
        )


EVERY_SERVICE = ServedServices()


def pattern_regex(pattern: str) -> str:
    """A shell pattern as a regular expression whose wildcards (`*`, `?`, `[...]`) never match a
    `.`: the default template routes Host NAME.<anything> to the name with the most labels, so
    `shop-*` allowing `shop-eu.example` would let it take Host shop-eu.example.* from `shop-eu`.
    A dotted name is allowed only by a pattern that writes its dots."""
    out, i = [], 0
    while i < len(pattern):
        char, i = pattern[i], i + 1
        if char == "*":
            out.append("[^.]*")
        elif char == "?":
            out.append("[^.]")
        elif char == "[" and (close := _class_end(pattern, i)) is not None:
            out.append(_class_regex(pattern[i:close]))
            i = close + 1
        else:
            out.append(re.escape(char))
    return "".join(out) + r"\Z"


def _class_end(pattern: str, start: int) -> int | None:
    """Where the `[...]` opened before `start` closes (a `]` first, after an optional `!`, is a
    member, as fnmatch reads it); None: no `]`, the `[` is a character of its own."""
    at = start + (pattern[start : start + 1] == "!")
    at += pattern[at : at + 1] == "]"
    close = pattern.find("]", at)
    return close if close != -1 else None


def _class_regex(body: str) -> str:
    """`[body]` as fnmatch reads it (a backwards range matches nothing, `&`, `~`, `|` are escaped),
    never matching a `.`."""
    translated = fnmatch.translate(f"[{body}]")  # (?s:[...])\Z
    return "(?![.])" + translated.removeprefix("(?s:").removesuffix(")\\Z")


@dataclass(frozen=True)
class CatalogService:
    name: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Listing:
    """The services of one catalog answer (sorted by name) and those left out, each with why."""

    catalog: Any  # the answer it was built from, compared by identity
    services: tuple[CatalogService, ...]
    left_out: tuple[str, ...]
    until: float | None = None  # when a name held for a service gone may be let go (monotonic)


@dataclass(frozen=True)
class NamesQuery:
    """What `service_names()` was asked: the listing (`tag`, `reserved`), the names to add when the
    catalog lacks them (`also`) and whether to sort them as Jinja's `sort` filter does."""

    tag: str | None
    reserved: tuple[str, ...]
    also: tuple[str, ...] = ()
    sort: bool = False


def build_listing(
    catalog: Any,
    tag: str | None,
    reserved: tuple[str, ...],
    served: ServedServices = EVERY_SERVICE,
    holders: dict[str, Holder] | None = None,
    now: float = 0.0,
) -> Listing:
    """Every service of the answer (`{name: tags}`, None while there is none); with `tag`, those
    carrying it. A name `served` refuses or Consul cannot be asked about, or whose
    `hap_name(reserved)` would be another's, is left out (a refused name takes no name from
    another: it is left out first). `holders` ({identifier in lower case: who had it}, see
    `unique_names`) is read at `now`, and updated (`_mark_gone`, then what this listing keeps)."""
    candidates = [(n, tags) for n, tags in (catalog or {}).items() if tag is None or tag in tags]
    unreadable = {n: why for n, _ in candidates if (why := served.refusal(n) or unaskable(n)) is not None}
    pairs = ((n, n) for n, _ in candidates if n not in unreadable)
    if holders is not None and catalog is not None:  # no answer yet (a start's first render): none is gone
        _mark_gone(holders, catalog, now)
    kept, refused = unique_names(pairs, reserved, holders=holders, now=now)
    until = None
    if holders is not None:
        holders.update((made.lower(), Holder(made, name)) for name, made in kept.items())
        gone = [held.gone_at + NAME_HOLD_S for held in holders.values() if held.gone_at is not None]
        until = min(gone) if gone and refused else None
    chosen = tuple(CatalogService(n, _safe_tags(tags)) for n, tags in candidates if n in kept)
    dropped = tuple(f"service {shown(n, 100)}: {why}" for n, why in sorted({**refused, **unreadable}.items()))
    return Listing(catalog, chosen, dropped, until)


def _mark_gone(holders: dict[str, Holder], catalog: Any, now: float) -> None:
    """A holder whose name left the catalog is marked gone from `now`, and forgotten once its hold
    ran out; one whose name came back holds again. (Each name a listing keeps holds its HAProxy
    name from then on.) At most MAX_GONE_HOLDERS are kept for names gone, the oldest let go first:
    an attacker's re-review (/tmp/rev20) churned 100 new names a second, and 61,000 holds made each
    listing cost 27 ms instead of 3."""
    gone = []
    for folded, held in list(holders.items()):
        if held.name in catalog:
            if held.gone_at is not None:
                holders[folded] = replace(held, gone_at=None)
        elif held.gone_at is None:
            holders[folded] = replace(held, gone_at=now)
            gone.append((now, folded))
        elif not held.holds(now):
            del holders[folded]
        else:
            gone.append((held.gone_at, folded))
    for _, folded in heapq.nsmallest(len(gone) - MAX_GONE_HOLDERS, gone) if len(gone) > MAX_GONE_HOLDERS else ():
        del holders[folded]


MAX_GONE_HOLDERS = 4096


def _safe_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """`tags` without those holding a character no output may carry (a newline, a control): a
    template writing a service's tags (`{{ s.tags | join(',') }}`, as consul-template users do)
    refused its whole render for one such tag, and every later update with it. Not reported
    here: the instance carrying it is, where `service()` reads it (once, not twice)."""
    if all(tag.isprintable() for tag in tags):  # C-fast; the exact check for the few that are not
        return tags
    return tuple(tag for tag in tags if unsafe_char(tag) is None)


def jinja_sort_key(value: Any) -> Any:
    """The key of Jinja's `sort` filter by default (not case-sensitive): a string lower-cased,
    anything else as it is. With Python's stable sort, the same order as `| sort`."""
    return value.lower() if isinstance(value, str) else value


def names_of(
    listing: Listing, also: tuple[str, ...], sort: bool, reserved: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(names, left out with why): the listing's names, then each name of `also` not among them yet
    (in its order), all sorted as `| sort` sorts when `sort` is true: the order of
    `names + [extra] | sort` in a template. An `also` name is the template's own (the default
    service): a listed name that would become its HAProxy name without case (`Web` beside a
    `web` that has no lb tag, or is out of the catalog during a redeploy) is left out for it, as
    `build_listing` leaves `Api` out for `api`; else `Web`'s rules, written first, took Host
    `web` and `web.*`."""
    names = [service.name for service in listing.services]
    left_out: list[str] = []
    for extra in also:
        if extra in names:
            continue
        folded = hap_name(extra, reserved).lower()
        taking = [name for name in names if hap_name(name, reserved).lower() == folded]
        if any(name in also for name in taking):
            continue  # two of the template's own names are one: the first stays
        for name in taking:
            names.remove(name)
            left_out.append(
                f"service {shown(name, 100)}: would become the HAProxy name {hap_name(extra, reserved)!r} of "
                f"{shown(extra, 100)}, which the template serves (names are compared without case)"
            )
        names.append(extra)
    if sort:
        names.sort(key=jinja_sort_key)
    return tuple(names), tuple(left_out)


K = TypeVar("K")
V = TypeVar("V")
MAX_KEPT = 64  # queries remembered per template: a tag or `also` read from KV cannot grow it without end
MAX_STORM_NAMES = 5  # services a listing's storm note names


def _held_notes(held: dict[str, Held]) -> tuple[str, ...]:
    """Why services that keep leaving a listing are in it, or not back in it yet (see PresenceFlaps):
    a note for each service held or waiting, one for the changes the listing's storm holds. No
    seconds to go in them: a note is logged when first seen, and one that changed with each build
    made a log line of each (/tmp/rev44)."""
    notes, storm = [], []
    for name, hold in sorted(held.items()):
        said = (
            f"service {shown(name, 100)}: left the listing {hold.changes} times lately; each time reloads HAProxy, so"
        )
        if hold.why == "storm":
            storm.append(name)
        elif hold.why == "waiting":
            notes.append(f"{said} it is listed again at the next turn of {HOLD_TURN_S:.0f} s")
        else:
            notes.append(
                f"{said} it stays listed {hold.hold_s:.0f} s after it last left and to the next turn of "
                f"{HOLD_TURN_S:.0f} s, with the instances it has meanwhile"
            )
    if storm:
        more = f" (and {len(storm) - MAX_STORM_NAMES} more)" if len(storm) > MAX_STORM_NAMES else ""
        notes.append(
            f"services left the listing or came back more than {SHARED_BURST:.0f} times within about a minute; "
            f"each change reloads HAProxy, so the next ones wait for the next turn of {HOLD_TURN_S:.0f} s (the "
            "ones that left stay listed with the instances they have, the ones back are not listed yet): "
            + ", ".join(shown(name, 100) for name in storm[:MAX_STORM_NAMES])
            + more
        )
    return tuple(notes)


@dataclass
class ServiceListings:
    """The listings one template asked for, kept across its renders; each is built again when the
    catalog answer it came from is replaced. Only answers to the current catalog are kept, and at
    most MAX_KEPT of each kind (a query's words may come from KV, which anyone with write access
    to it can vary at will)."""

    served: ServedServices = EVERY_SERVICE
    # Who had each HAProxy name (see `unique_names`): carried over a SIGHUP, and at a start read
    # from the live config (`TemplateRenderer.hold_names`).
    holders: dict[str, Holder] = field(default_factory=dict)
    # Services that keep leaving a listing stay in it a while (see PresenceFlaps): carried over a SIGHUP.
    presence: PresenceFlaps[CatalogService] = field(default_factory=PresenceFlaps)
    _listings: dict[tuple[str | None, tuple[str, ...]], Listing] = field(default_factory=dict)
    _names: dict[NamesQuery, tuple[Listing, tuple[tuple[str, ...], tuple[str, ...]]]] = field(default_factory=dict)

    def listing(self, catalog: Any, tag: str | None, reserved: tuple[str, ...], now: float = 0.0) -> Listing:
        """The listing for `tag` and `reserved`: the one built for this answer, unless a name it
        holds for a service gone may be let go by `now`."""
        built = self._listings.get((tag, reserved))
        if built is None or built.catalog is not catalog or (built.until is not None and now >= built.until):
            self._listings = _current(self._listings, lambda kept: kept.catalog is catalog)
            built = build_listing(catalog, tag, reserved, self.served, self.holders, now)
            built = self._kept_while_flapping(built, tag, reserved, now) if catalog is not None else built
            self._listings[(tag, reserved)] = built
        return built

    def _kept_while_flapping(self, built: Listing, tag: str | None, reserved: tuple[str, ...], now: float) -> Listing:
        """`built` with the services that left it and are held in it (see PresenceFlaps); each hold
        running is said, and its end renders again."""
        items = {service.name: service for service in built.services}
        taken: set[str] = set()  # the HAProxy names of the listed services, without case (built when asked)

        def may_keep(name: str) -> bool:
            """A service gone from the listing may be kept in it: not left out while in the catalog,
            allowed by serve_services (a SIGHUP may have changed it), and its HAProxy name no listed
            service's (a case variant taking a name whose hold a churn pushed out, /tmp/rev40)."""
            tags = built.catalog.get(name)
            if (tags is not None and (tag is None or tag in tags)) or self.served.refusal(name) is not None:
                return False
            if not taken:
                taken.update(hap_name(kept, reserved).lower() for kept in items)
            return hap_name(name, reserved).lower() not in taken

        served, held = self.presence.serve((tag, reserved), items, now, may_keep)
        if not held:
            return built
        notes = _held_notes(held)
        ends = min(now + hold.left_s for hold in held.values())
        return replace(
            built,
            services=tuple(sorted(served.values(), key=lambda service: service.name)),
            left_out=built.left_out + notes,
            until=ends if built.until is None else min(built.until, ends),
        )

    def names(self, catalog: Any, query: NamesQuery, now: float = 0.0) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """`names_of` the query's listing: (names, left out with why)."""
        listing = self.listing(catalog, query.tag, query.reserved, now)
        kept = self._names.get(query)
        if kept is None or kept[0] is not listing:
            self._names = _current(self._names, lambda names: names[0].catalog is catalog)
            kept = self._names[query] = (listing, names_of(listing, query.also, query.sort, query.reserved))
        return kept[1]


def _current(kept: dict[K, V], current: Callable[[V], bool]) -> dict[K, V]:
    """What `kept` holds for the current catalog, emptied when it is full (a new entry comes next)."""
    fresh = {key: value for key, value in kept.items() if current(value)}
    return fresh if len(fresh) < MAX_KEPT else {}
