"""Templates: Jinja2 with StrictUndefined, whose functions record the Consul data they use.

A render never blocks: a function whose data has not arrived yet records the dependency as missing
and returns an empty value, so the first render discovers every dependency (as consul-template
does). A template whose dependencies all have data renders to bytes; otherwise it reports what is
missing. Every value that reaches the output passes `_finalize`: a newline or any other control
character fails the render with an error that names its origin (service, instance and field), so
catalog data can never inject a line into haproxy.cfg.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
import traceback
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2

from renderer.config import CONSUL_PORTS, DEFAULT_SERVE_SERVICES, DEFAULT_TCP_PORTS, TemplateSpec
from renderer.errors import TemplateError
from renderer.haproxy import checked
from renderer.haproxy.checked import DEFAULT_POLICY, AddressPolicy, path_problem, weight_problem
from renderer.logs import shown
from renderer.render.flaps import (
    HOLD_TURN_S,
    MAX_UNBACKED,
    SHARED_BURST,
    UNBACKED_MAX_WAIT_S,
    Held,
    PresenceFlaps,
    SettingsFlaps,
)
from renderer.render.guard import Guard
from renderer.render.listing import CatalogService, Listing, NamesQuery, ServedServices, ServiceListings
from renderer.source.dependency import (
    CatalogNode,
    CatalogNodes,
    CatalogServices,
    CatalogStr,
    Dependency,
    HealthService,
    KeyPair,
    KVKey,
    KVPrefix,
    Node,
    ServiceInstance,
    shown_name,
    unsafe_char,
)

HEALTH_FILTERS = {
    "passing": frozenset({"passing"}),
    "passing,warning": frozenset({"passing", "warning"}),
    "any": frozenset({"passing", "warning", "critical", "maintenance"}),
}


@runtime_checkable
class ChangeLog(Protocol):
    """A DataSource that also says which keys changed since a point (the Store): a render then
    checks its cached blocks against those keys only."""

    generation: int

    def changed_since(self, generation: int) -> frozenset[str] | None: ...


class DataSource(Protocol):
    """What a render reads: (has_data, value) for a dependency key. The watcher's Store is one."""

    def get(self, key: str) -> tuple[bool, Any]: ...


@dataclass(frozen=True)
class RenderResult:
    """`content` is None while `missing` lists dependencies without data, or when `error` says why.

    `recheck_in`: seconds after which the template must render again although no data changed
    (an anti-empty guard is holding instances back until then).
    """

    content: str | None
    dependencies: Mapping[str, Dependency]  # key → dependency, in the order read (not to be modified)
    missing: tuple[str, ...] = ()
    error: str | None = None
    recheck_in: float | None = None
    left_out: tuple[str, ...] = ()  # instances left out for an unsafe value, with where and why


@dataclass(frozen=True)
class ServiceSettings:
    """A service's settings from meta `haproxy_<key>` (see `checked.SETTINGS`): a value only where
    every instance carries the same checked value; None (the template's default) otherwise."""

    mode: str | None = None
    port: str | None = None
    balance: str | None = None
    timeout_server: str | None = None
    timeout_connect: str | None = None
    check_path: str | None = None
    check_status: str | None = None
    sticky: str | None = None
    slowstart: str | None = None
    maxconn: str | None = None


def agreed_settings(
    instances: list[ServiceInstance], last: Mapping[str, str], registered: Sequence[ServiceInstance] | None = None
) -> tuple[ServiceSettings, dict[str, str], list[str]]:
    """(the settings that apply, {key: value} to pass as `last` next time, notes: ignored values
    and disagreements).

    The rule: a setting applies when every instance carries the same value for it. While they
    disagree (one that only some instances carry, or different values), the value they last all
    agreed on (`last`, the previous answer for this service) holds, else the default, and the
    disagreement is reported: during a rolling change the backend keeps what it had until every
    instance asks for the new value, and one instance can never set a service's balance, checks or
    port alone. A setting no instance carries is the default (and is forgotten).

    `registered` (every instance Consul registers for the service that could be served, whatever
    its health): a value the instances agree on becomes the last agreed one only when most of these
    (more than half) are served instances carrying it. An attacker's review (/tmp/rev16): one instance asking
    `haproxy_check_status 418`, passing alone while the others were critical (a redeploy), agreed
    with itself, and its value held once they passed again: HAProxy marked them down and sent it
    all the traffic. (Agreeing among all of them instead let one critical registration pointing
    nowhere veto every change, and a restart drop a TCP service's listener: the next review. And
    all of the registered ones having to carry it let one critical registration keep a value the
    owners had left remembered, to come back at their next rolling change: the one after. And
    counting critical registrations that carried it let an attacker's dummies, critical and
    costing nothing, outvote the owners during their redeploy: the one after that, /tmp/rev22.)"""
    notes = [note for i in instances for note in i.notes]
    chosen: dict[str, str] = {}
    remembered: dict[str, str] = {}
    for key in sorted({k for i in instances for k in i.settings}):
        values = {i.settings.get(key) for i in instances}
        kept = last.get(key)
        if len(values) == 1:
            value = chosen[key] = str(values.pop())
            if registered is None or _most_carry(registered, instances, key, value):
                remembered[key] = value
            elif kept is not None:
                remembered[key] = kept
            continue
        if kept is not None:
            chosen[key] = remembered[key] = kept
        holds = f"its last agreed value {kept!r}" if kept is not None else "its default"
        meta = "haproxy_check_path (or health_path)" if key == "check_path" else f"haproxy_{key}"
        notes.append(
            f"service {shown_name(instances[0].name)}: instances disagree on meta {meta} ({_some(values)}); "
            f"the setting keeps {holds} until every instance carries the same value"
        )
    return ServiceSettings(**chosen), remembered, notes  # keys: checked.SETTINGS, the same as the fields


def most_carry_all(
    registered: Sequence[ServiceInstance], served: Sequence[ServiceInstance], settings: ServiceSettings
) -> bool:
    """Whether, key by key, more than half of `registered` are `served` instances carrying what
    `settings` holds (`_most_carry`; a key it leaves unset: carrying none). `agreed_settings` falls
    back to the served settings whenever instances disagree: this tells a pause in an ask for new
    settings (the owners' own instances ask for the served ones) from a disagreement (see
    `SettingsFlaps.serve`). Counted on the served instances alone, four passing registrations of an
    attacker's for half a second outnumbered three owners outvoted by critical dummies, and restarted
    their wait at each blip (helper-137, /tmp/rev83)."""
    keys = {key for instance in served for key in instance.settings}
    keys |= {key for key, value in vars(settings).items() if value is not None}
    return all(_most_carry(registered, served, key, getattr(settings, key)) for key in sorted(keys))


def _most_carry(registered: Sequence[ServiceInstance], served: Sequence[ServiceInstance], key: str, value: str) -> bool:
    """More than half of `registered` are `served` instances carrying `value` for `key`: one not
    served (critical, left out) counts against, whatever it carries (see `agreed_settings`)."""
    carriers = {(i.node, i.id) for i in served if i.settings.get(key) == value}
    return 2 * sum(1 for i in registered if (i.node, i.id) in carriers) > len(registered)


# Of the values instances disagree on, how many a note shows, and how many characters of each: an
# attacker's review gave 400 instances of one service 400 different 500-character health paths, and
# the note listing them all (200 KB) filled the log, the check and /status each time one changed.
VALUES_SHOWN, VALUE_SHOWN_CHARS = 3, 60


def _some(values: Collection[str | None]) -> str:
    """A few of `values` for a note (quoted, escaped, cut), then how many more."""
    ordered = sorted(shown(v, VALUE_SHOWN_CHARS) if v is not None else "unset" for v in values)
    more = f" and {len(ordered) - VALUES_SHOWN} more" if len(ordered) > VALUES_SHOWN else ""
    return ", ".join(ordered[:VALUES_SHOWN]) + more


class RenderedBlock(str):
    """Output of a `cached` block: its values were checked when it was rendered."""


def _finalize(value: Any) -> Any:
    if isinstance(value, str) and not isinstance(value, RenderedBlock) and not value.isprintable():
        # isprintable() is C-fast and false for every unsafe character (and for a few safe ones,
        # non-ASCII spaces, which the exact check below lets through).
        bad = unsafe_char(value)
        if bad is not None:
            origin = getattr(value, "origin", "a template expression")
            raise TemplateError(f"unsafe character {bad!r} in {origin}: refusing to render it into the output")
    return value


def hap_path(value: object) -> str:
    """A URL path safe as one HAProxy word (see `path_problem`); anything else falls back to /health
    (the instance carrying it was left out at the boundary already)."""
    text = str(value)
    return text if path_problem(text) is None else "/health"


def valid_server(instance: object) -> bool:
    """True when the instance passed the boundary's checks: its `endpoint` can form a server."""
    return bool(getattr(instance, "endpoint", "")) and not getattr(instance, "unsafe", None)


def hap_name(value: object, reserved: Iterable[str] = ()) -> str:
    """A name as an HAProxy identifier, distinct for distinct names (see `checked.hap_name`);
    `reserved`: names the template itself uses (e.g. its frontend), which get a suffix too."""
    return checked.hap_name(str(value), tuple(reserved))


def weight(value: object) -> str | None:
    """A checked weight (0-256, ASCII digits) or None: for `weight {{ i.weight | weight }}`."""
    text = "" if value is None else str(value)
    return text if text and weight_problem(text) is None else None


# What `env()` shows a template: the Consul token and other secrets never, whatever the pattern.
ENV_ALLOWED = ("HOME", "HOSTNAME", "USER", "LANG", "TZ", "HAPROXY_*", "TEMPLATE_*")
_ENV_SECRET = re.compile(r"TOKEN|SECRET|PASSW|KEY|CREDENTIAL|AUTH", re.IGNORECASE)


def env_allowed(name: str) -> bool:
    return not _ENV_SECRET.search(name) and any(fnmatch.fnmatchcase(name, glob) for glob in ENV_ALLOWED)


def by_tag(instances: Iterable[ServiceInstance], tag: str | None = None) -> Any:
    """With a tag: the instances carrying it. Without: {tag: [instances]} (consul-template's byTag)."""
    items = list(instances)
    if tag is not None:
        return [i for i in items if tag in i.tags]
    groups: dict[str, list[ServiceInstance]] = {}
    for instance in items:
        for each in instance.tags:
            groups.setdefault(each, []).append(instance)
    return dict(sorted(groups.items()))


def by_meta(instances: Iterable[ServiceInstance], key: str, value: str | None = None) -> Any:
    """With a value: the instances whose meta[key] equals it. Without: {meta value: [instances]}."""
    items = list(instances)
    if value is not None:
        return [i for i in items if i.meta.get(key) == value]
    groups: dict[str, list[ServiceInstance]] = {}
    for instance in items:
        if key in instance.meta:
            groups.setdefault(instance.meta[key], []).append(instance)
    return dict(sorted(groups.items()))


def by_labels(names: Iterable[str], reserved: Iterable[str] = ()) -> list[tuple[int, list[str]]]:
    """The names whose HAProxy identifier (`hap_name`) has two labels or more, grouped by their
    label count, most labels first, each group in the order given: the order a Host's routes are
    tried in (a name before the names it starts with). One pass: a template looping over the label
    counts and filtering every name at each paid counts × names at every render (48 counts and
    1,500 dotted names, 140 ms a render; helper-116, /tmp/rev63)."""
    groups: dict[int, list[str]] = {}
    kept = tuple(reserved)
    for name in names:
        labels = hap_name(name, kept).count(".") + 1
        if labels > 1:
            groups.setdefault(labels, []).append(name)
    return sorted(groups.items(), reverse=True)


@dataclass(frozen=True)
class CachedBlock:
    """A rendered `cached` block and the data it was rendered from (by identity: the store replaces
    a value only when it changed)."""

    output: RenderedBlock
    reads: tuple[tuple[str, Dependency, Any], ...]  # (key, dependency, value)
    left_out: tuple[str, ...] = ()
    descendants: frozenset[tuple[str, ...]] = frozenset()  # the blocks rendered inside it, theirs, …
    read_keys: frozenset[str] = frozenset()  # the keys of `reads`
    dependencies: Mapping[str, Dependency] = field(default_factory=dict)  # `reads` as key → dependency
    until: float | None = None  # (monotonic) not reused from then on, whatever the data

    @classmethod
    def of(
        cls, output: RenderedBlock, reads: tuple[tuple[str, Dependency, Any], ...], left_out: tuple[str, ...],
        descendants: frozenset[tuple[str, ...]], until: float | None = None,
    ) -> CachedBlock:  # fmt: skip
        keys = frozenset(key for key, _, _ in reads)
        return cls(output, reads, left_out, descendants, keys, {key: dep for key, dep, _ in reads}, until)


@dataclass
class _OpenBlock:
    """A cached block while it renders: the data it read, the blocks rendered inside it, and when
    its output expires whatever the data (monotonic: a service's settings held until then)."""

    reads: dict[str, tuple[str, Dependency, Any]] = field(default_factory=dict)
    children: set[tuple[str, ...]] = field(default_factory=set)
    until: float | None = None


@dataclass
class _Render:
    """The functions one render hands to the template, and what they recorded."""

    source: DataSource
    environ: Mapping[str, str]
    guard: Guard | None = None
    now: float = 0.0
    blocks: dict[tuple[str, ...], CachedBlock] = field(default_factory=dict)  # kept across renders
    listings: ServiceListings = field(default_factory=ServiceListings)  # … these too
    dependencies: dict[str, Dependency] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    recheck_in: float | None = None
    leave_out_unsafe: bool = True  # else an unsafe value fails the render (the template's choice)
    withheld: frozenset[str] = frozenset()  # variables whose value is a secret (the token): never shown
    left_out: list[str] = field(default_factory=list)
    _noted: set[str] = field(default_factory=set)  # left_out's items, for `_note`
    tcp_ports: tuple[tuple[int, int], ...] = DEFAULT_TCP_PORTS  # where meta haproxy_port may publish
    reserved_ports: frozenset[int] = frozenset()  # … never: Consul's and the renderer's (Config.reserved_ports)
    policy: AddressPolicy = DEFAULT_POLICY  # which server addresses may be served
    agreed: dict[str, dict[str, str]] = field(default_factory=dict)  # kept across renders: settings by service
    flaps: SettingsFlaps[ServiceSettings] = field(default_factory=SettingsFlaps)  # … and how often they changed
    holds: int = 0  # services the anti-empty guard is holding in this render
    used_blocks: set[tuple[str, ...]] = field(default_factory=set)
    changed: frozenset[str] | None = None  # the keys changed since the last render, if the source says
    _open: list[_OpenBlock] = field(default_factory=list)  # the cached blocks being rendered, outermost first

    def _read(self, dep: Dependency) -> tuple[bool, Any]:
        key = dep.key
        self.dependencies.setdefault(key, dep)
        present, value = self.source.get(key)
        if not present and key not in self.missing:
            self.missing.append(key)
        for block in self._open:
            block.reads.setdefault(key, (key, dep, value))
        return present, value

    def cached(self, *key: object, caller: Callable[[], str]) -> RenderedBlock:
        """`{% call cached(k1, k2…) %}…{% endcall %}`: the block's output is reused while the Consul
        data it read is unchanged. Its output must depend only on the key, the template's variables
        and the data read inside it (put any outer loop variable it uses into the key)."""
        block_key = tuple(str(part) for part in key)
        self.used_blocks.add(block_key)
        if self._open:
            self._open[-1].children.add(block_key)
        hit = self.blocks.get(block_key)
        if hit is not None and self._still_valid(hit):
            if hit.until is not None:  # a hold inside it: render again when it ends
                self._expires_in(hit.until - self.now)
            self.dependencies.update(hit.dependencies)
            for outer in self._open:  # an enclosing block depends on the same data
                for read in hit.reads:
                    outer.reads.setdefault(read[0], read)
            # A reused block's inner blocks were not called this time, yet are in use: without
            # this the sweep after the render dropped them, and the next change elsewhere in an
            # enclosing group re-rendered every one of them (measured: a new service cost ~40 ms
            # at 1,000, not ~9).
            self.used_blocks |= hit.descendants
            self._note(hit.left_out)
            return hit.output
        block = _OpenBlock()
        self._open.append(block)
        missing, holds, left = len(self.missing), self.holds, len(self.left_out)
        try:
            output = RenderedBlock(caller())
        finally:
            self._open.pop()
        if len(self.missing) == missing and self.holds == holds:  # complete, and no guard holding
            self.blocks[block_key] = CachedBlock.of(
                output, tuple(block.reads.values()), tuple(self.left_out[left:]), self._descendants(block.children),
                block.until,
            )  # fmt: skip
        else:
            self.blocks.pop(block_key, None)
        return output

    def _expires_in(self, seconds: float) -> None:
        """What is rendered now holds for `seconds` at most: the template renders again then, and
        the blocks open now are reused until then only (a settings hold: flaps.py). Not kept out
        of the cache meanwhile: 32 held services, one per group, made every group of a
        1,000-service render run again at every render, 21 ms where 2.7 (/tmp/rev34)."""
        seconds = max(seconds, 0.0)
        self.recheck_in = seconds if self.recheck_in is None else min(self.recheck_in, seconds)
        until = self.now + seconds
        for block in self._open:
            block.until = until if block.until is None else min(block.until, until)

    def _still_valid(self, block: CachedBlock) -> bool:
        """Whether the data `block` read is unchanged: by the keys changed since the last render
        when the source keeps that log (a few keys, whatever the catalog), else value by value;
        and a hold inside it has not ended."""
        if block.until is not None and self.now >= block.until:
            return False
        if self.changed is not None:
            return self.changed.isdisjoint(block.read_keys)
        return all(self.source.get(k)[1] is value for k, _, value in block.reads)

    def _descendants(self, children: Iterable[tuple[str, ...]]) -> frozenset[tuple[str, ...]]:
        found: set[tuple[str, ...]] = set()
        for child in children:
            found.add(child)
            inner = self.blocks.get(child)
            if inner is not None:
                found |= inner.descendants
        return frozenset(found)

    def _require(self, dep: Dependency, present: bool, why: str) -> None:
        if present and dep.key not in self.missing:
            self.missing.append(f"{dep.key} ({why})")

    def service(self, name: str, tag: str | None = None, health: str = "passing") -> list[ServiceInstance]:
        if health not in HEALTH_FILTERS:
            raise TemplateError(f"service({name!r}): health={health!r}; use one of {', '.join(HEALTH_FILTERS)}")
        dep = HealthService(name, tag)
        present, instances = self._read(dep)
        wanted = HEALTH_FILTERS[health]
        chosen = self._within_policy([i for i in instances or () if i.status in wanted])
        if self.leave_out_unsafe and any(i.unsafe for i in chosen):
            self._note(i.unsafe for i in chosen if i.unsafe)
            chosen = [i for i in chosen if not i.unsafe]
        if present and self.guard is not None:
            chosen, hold = self.guard.filter(f"{dep.key}|{health}", name, chosen, self.now)
            if hold is not None:
                self.holds += 1
                self.recheck_in = hold if self.recheck_in is None else min(self.recheck_in, hold)
        return chosen

    def _within_policy(self, instances: list[ServiceInstance]) -> list[ServiceInstance]:
        """The instances, each one whose address the address policy refuses marked unsafe (with
        why and how to allow it): left out and reported like any other unsafe instance."""
        if self.policy.local and self.policy.names:
            return instances
        refusals = [None if i.unsafe else self.policy.refusal(i.where) for i in instances]
        nodes = [
            not i.unsafe and i.node_address not in ("", i.address) and self.policy.refusal(i.node_address) is not None
            for i in instances
        ]  # the node's address, where the instance is served at one of its own
        if not any(refusals) and not any(nodes):
            return instances
        return [_policed(i, why, node) for i, why, node in zip(instances, refusals, nodes, strict=True)]

    def _listing(self, tag: str | None, reserved: tuple[str, ...]) -> Listing:
        """The catalog answer's listing for `tag` and `reserved`; what it left out is reported."""
        _, catalog = self._read(CatalogServices())
        listing = self.listings.listing(catalog, tag, reserved, self.now)
        self._note(listing.left_out)
        if listing.until is not None:  # a name held for a service gone is let go then: render again
            wait = max(listing.until - self.now, 0.0)
            self.recheck_in = wait if self.recheck_in is None else min(self.recheck_in, wait)
        return listing

    def services(self, tag: str | None = None, reserved: Iterable[str] = ()) -> list[CatalogService]:
        """Every service (sorted by name); with `tag`, only those with an instance carrying it.
        A service whose HAProxy name (`hap_name` with `reserved`) would be another's is left out
        and reported. Built once per catalog answer (kept by identity): thousands of services at
        every render."""
        return list(self._listing(tag, tuple(reserved)).services)

    def service_names(
        self, tag: str | None = None, reserved: Iterable[str] = (), also: Iterable[str] = (), sort: bool = False
    ) -> list[str]:
        """The names of `services(tag, reserved)`, in its order and with the same services left out
        and reported, then each name of `also` they lack (e.g. the default backend's service, whether
        registered or not; a listed name that would share its HAProxy name is left out for it); with
        `sort`, all of them in the order of Jinja's `sort` filter (not case-sensitive; equal keys
        keep that order). The same as
        `services(tag, reserved) | map(attribute="name") | list`, plus `also`, then `| sort`, but
        built once per catalog answer instead of at every render (1-2 ms at 1,000 services).
        A new list at every call."""
        query = NamesQuery(tag, tuple(reserved), tuple(also), bool(sort))
        listing = self._listing(query.tag, query.reserved)
        names, left_out = self.listings.names(listing.catalog, query, self.now)
        self._note(left_out)
        return list(names)

    def settings(self, instances: list[ServiceInstance], name: str | None = None) -> ServiceSettings:
        """`settings(service(name), name)`: the service's settings from meta (see `agreed_settings`);
        ignored values and disagreements are reported like left-out instances. With `name`, a service
        with no instance at the moment keeps the settings its instances last agreed on: a TCP service
        keeps its listener and its port through an outage or a redeploy, where another registration
        asking for that port would otherwise take it for good (the live file then shows the newcomer
        serving it).

        With `name`, a value becomes the last agreed one only when most of the instances Consul
        registers for the service that could be served, whatever their health, are served ones
        carrying it (`_registered`, see `agreed_settings`)."""
        registered = self._registered(name) if name is not None else None
        items = list(instances)
        service = str(items[0].name) if items else name
        last = self.agreed.get(service, {}) if service is not None else {}
        if items:
            chosen, applied, notes = agreed_settings(items, last, registered)
        else:
            chosen, applied, notes = ServiceSettings(**last), dict(last), []
        carried = ServiceSettings(**applied)  # what most registrations carry (see SettingsFlaps)
        # A render with no answer for the service yet (it waits for it) is never served: it recorded the
        # defaults, and the settings of the whole render after it came as a change, held in a storm: a
        # brand-new TCP service served as HTTP to the turn (an attacker's review, /tmp/rev52).
        if service is not None and (name is None or registered is not None):
            self.agreed[service] = applied
            serving = self.flaps.serving(service)
            paused = most_carry_all(registered, items, serving) if items and registered and serving else None
            chosen, held = self.flaps.serve(service, chosen, self.now, chosen == carried, carried, paused)
            if held is not None:  # rendered again when it ends: a block reading it is kept until then only
                self._expires_in(held.left_s)
                notes.append(_settings_held_note(str(service), held))
        self._note(notes)
        if chosen.port is not None and int(chosen.port) in self.reserved_ports:
            self._note(
                [
                    f"service {shown_name(str(service))}: meta haproxy_port {chosen.port} is Consul's or this "
                    "renderer's port, never published (a listener there would take it whenever the agent "
                    "restarts): served as an HTTP backend"
                ]
            )
            chosen = replace(chosen, port=None)
        if chosen.port is not None and not any(low <= int(chosen.port) <= high for low, high in self.tcp_ports):
            self._note(
                [
                    f"service {shown_name(str(service))}: meta haproxy_port {chosen.port} is outside tcp_ports "
                    f"({ports_text(self.tcp_ports)}): served as an HTTP backend; widen tcp_ports (--tcp-ports, "
                    "CONSUL_RENDERER_TCP_PORTS) to publish it"
                ]
            )
            chosen = replace(chosen, port=None)
        return chosen

    def _registered(self, name: str) -> list[ServiceInstance] | None:
        """Every instance of `name` in Consul's answer that could be served, any health: none the
        boundary or the address policy leaves out (None before the answer came)."""
        present, instances = self._read(HealthService(name))
        return [i for i in self._within_policy(list(instances or ())) if not i.unsafe] if present else None

    def _note(self, items: Iterable[str]) -> None:
        """Report what was left out or ignored, once each (a set beside the list: thousands of notes,
        each kept block's repeated at every render, were a quadratic scan of the list)."""
        for item in items:
            if item not in self._noted:
                self._noted.add(item)
                self.left_out.append(item)

    def key(self, path: str) -> str:
        dep = KVKey(path)
        present, value = self._read(dep)
        self._require(dep, present and value is None, "key does not exist")
        return value or ""

    def key_or_default(self, path: str, default: str = "") -> str:
        present, value = self._read(KVKey(path))
        return value if present and value is not None else default

    def _pairs(self, prefix: str, direct_only: bool, refuse_empty: bool) -> list[KeyPair]:
        dep = KVPrefix(prefix)
        present, pairs = self._read(dep)
        chosen = [p for p in pairs or () if not direct_only or "/" not in p.key]
        if refuse_empty:
            self._require(dep, present and not chosen, "prefix is empty")
        return chosen

    def tree(self, prefix: str) -> list[KeyPair]:
        return self._pairs(prefix, direct_only=False, refuse_empty=False)

    def ls(self, prefix: str) -> list[KeyPair]:
        return self._pairs(prefix, direct_only=True, refuse_empty=False)

    def safe_tree(self, prefix: str) -> list[KeyPair]:
        return self._pairs(prefix, direct_only=False, refuse_empty=True)

    def safe_ls(self, prefix: str) -> list[KeyPair]:
        return self._pairs(prefix, direct_only=True, refuse_empty=True)

    def nodes(self) -> list[Node]:
        """Every node whose record is safe and whose address the address policy allows; the others
        left out and reported (a custom template may write `server … {{ n.address }}`)."""
        _, nodes = self._read(CatalogNodes())
        return [n for n in nodes or () if self._node_allowed(n, self.policy.refusal(n.address))]

    def node(self, name: str) -> dict[str, Any] | None:
        """The node and its services (`{"node": Node, "services": {id: instance}}`), none when the
        catalog has no such node or its record is unsafe. Each service is checked as `service()`'s
        instances are, the address policy applied to the address it is reached at; one that fails
        is left out alone and reported. A node address the policy refuses is reported and given as
        none (the node's `address`, its services' `node_address`); its services with an address of
        their own are still given."""
        _, value = self._read(CatalogNode(name))
        if value is None or not self._node_allowed(value.node, None):
            return None
        node, refusal = value.node, self.policy.refusal(value.node.address)
        if refusal is not None:  # given with no address; its services at addresses of their own are served
            where = getattr(node.address, "origin", f"node {name!r}, field Address")
            self._note([f"{where}: {refusal} (the node is given without its address)"])
            node = replace(node, address=CatalogStr("", where))
        chosen = self._within_policy(list(value.instances))
        self._note(i.unsafe for i in chosen if i.unsafe)
        return {"node": node, "services": {i.id: i for i in chosen if not i.unsafe}}

    def _node_allowed(self, node: Node, refusal: str | None) -> bool:
        where = getattr(node.address, "origin", f"node {node.name!r}, field Address")
        why = node.unsafe or (None if refusal is None else f"{where}: {refusal}")
        if why is not None:
            self._note([why])
        return why is None

    def env(self, name: str, default: str = "") -> str:
        """An environment variable on the allow-list (`ENV_ALLOWED`); never the Consul token."""
        if not env_allowed(name):
            raise TemplateError(
                f"env({name!r}): templates may read only {', '.join(ENV_ALLOWED)} (never a token or secret); "
                f"pass other values with --var {name.lower()}=VALUE"
            )
        if name in self.withheld:
            raise TemplateError(f"env({name!r}): its value holds the Consul token, which templates never see")
        return CatalogStr(self.environ.get(name, default), f"environment variable {name}")

    def functions(self) -> dict[str, Callable[..., Any]]:
        return {
            "service": self.service, "services": self.services, "service_names": self.service_names,
            "key": self.key, "key_or_default": self.key_or_default, "ls": self.ls, "tree": self.tree,
            "safe_ls": self.safe_ls, "safe_tree": self.safe_tree, "nodes": self.nodes, "node": self.node,
            "env": self.env, "cached": self.cached, "settings": self.settings,
        }  # fmt: skip


def make_environment(search_path: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(search_path)),
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        autoescape=False,
        auto_reload=False,
    )
    env.filters.update(
        {
            "by_tag": by_tag,
            "by_meta": by_meta,
            "by_labels": by_labels,
            "hap_name": hap_name,
            "hap_path": hap_path,
            "weight": weight,
        }
    )
    env.tests.update(
        {
            "valid_server": valid_server,
            "digit_string": lambda value: str(value).isascii() and str(value).isdigit(),
            "contains": lambda container, item: item in container,
        }
    )
    return env


def _is_undefined_name(err: BaseException) -> bool:
    """A name the template uses but nobody defined (a typo, a missing --var): never a data gap."""
    return isinstance(err, jinja2.UndefinedError) and bool(re.fullmatch(r"'[^']+' is undefined", str(err)))


def _template_line(err: BaseException, filename: str) -> str:
    """`file:line` of the deepest frame of the template in a render error, as Jinja2 rewrites them."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.endswith(filename)]
    return f"{filename}:{frames[-1].lineno}" if frames else filename


def _settings_held_note(service: str, held: Held) -> str:
    """Why a service's settings from meta wait (see SettingsFlaps): its own changes, or many
    services' changes lately. No seconds to go: a note is logged when first seen."""
    if held.why == "unbacked":
        return (
            f"service {shown_name(service)}: its instances passing now ask for settings from meta most of its "
            f"registrations do not carry (the others are critical, or carry others): while many services' settings "
            f"change, or {MAX_UNBACKED} services serve such settings already, it keeps the ones they carry, looked at "
            f"again each turn of {HOLD_TURN_S:.0f} s, and serves the ones asked for once they have been asked for "
            f"{UNBACKED_MAX_WAIT_S / 60:.0f} minutes without a break"
        )
    if held.why == "storm":
        return (
            f"service {shown_name(service)}: many services' settings from meta changed lately (more than "
            f"{SHARED_BURST:.0f} within about a minute): each change reloads HAProxy, so its change waits for the "
            f"next turn of {HOLD_TURN_S:.0f} s (the newest is taken then; the timeline names what changed)"
        )
    return (
        f"service {shown_name(service)}: its settings from meta changed {held.changes} times lately: each change "
        f"reloads HAProxy, so the next one waits {held.hold_s:.0f} s after the last and to the next turn of "
        f"{HOLD_TURN_S:.0f} s (the newest is taken then; the timeline names what changed)"
    )


def ports_text(ranges: tuple[tuple[int, int], ...]) -> str:
    """`1024-65535`, `5432,10000-20000`, or `none`."""
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def _policed(instance: ServiceInstance, refusal: str | None, node_refused: bool) -> ServiceInstance:
    """The instance as the address policy leaves it: unsafe (left out) when its address is refused;
    its `node_address` none when only that one is (it is served at an address of its own)."""
    if refusal is not None:
        return replace(instance, unsafe=f"{instance.origin}, field Address: {refusal}", endpoint="")
    if node_refused:
        return replace(instance, node_address=CatalogStr("", f"{instance.origin}, field Node.Address"))
    return instance


class TemplateRenderer:
    """One compiled template; `render` turns the current data into a RenderResult."""

    def __init__(
        self,
        spec: TemplateSpec,
        variables: Mapping[str, str],
        environ: Mapping[str, str] | None = None,
        secrets: Collection[str] = (),
        policy: AddressPolicy = DEFAULT_POLICY,
        tcp_ports: tuple[tuple[int, int], ...] = DEFAULT_TCP_PORTS,
        serve_services: tuple[str, ...] = DEFAULT_SERVE_SERVICES,
        presence: PresenceFlaps[CatalogService] | None = None,
        reserved_ports: frozenset[int] = CONSUL_PORTS,
    ) -> None:
        """`secrets`: values no template may read through env() (the Consul token): a variable
        holding one is refused whatever its name (an operator may have copied it, or a URL with
        it, under a name on the allow-list). `policy`: the server addresses `service()` serves;
        an instance at another is left out and reported (by default local addresses and host
        names are refused). `tcp_ports`: where meta haproxy_port may publish a listener, never on
        `reserved_ports` (Config.reserved_ports);
        `serve_services`: the services `services()` and `service_names()` may list. `presence`:
        the services that keep leaving the listings (see PresenceFlaps), shared by the templates of
        one process so that they keep the same ones (each counting for itself, one that rendered a
        catalog answer the other skipped kept a backend whose route was gone)."""
        self.spec = spec
        self.policy = policy
        self.tcp_ports, self.reserved_ports = tcp_ports, reserved_ports
        self._variables = {k: CatalogStr(v, f"var {k}") for k, v in variables.items()}
        self._environ = dict(os.environ if environ is None else environ)
        hidden = {secret.strip() for secret in secrets if secret.strip()}
        self._withheld = frozenset(k for k, v in self._environ.items() if any(secret in v for secret in hidden))
        self._template = self._compile(spec.source)
        self._guard = Guard(spec)
        self._blocks: dict[tuple[str, ...], CachedBlock] = {}
        # The source and its generation the kept blocks were last checked against (see ChangeLog).
        self._checked_at: tuple[ChangeLog | None, int] = (None, 0)
        self._listings = ServiceListings(ServedServices(serve_services), presence=presence or PresenceFlaps())
        # Per service, the settings its instances last agreed on (see `agreed_settings`), and those
        # served and how often they changed (a service whose settings keep changing is held: flaps.py).
        self._agreed: dict[str, dict[str, str]] = {}
        self._whole_read: set[str] = set()  # the services the last whole render read (see `_forget_settings`)
        self._flaps: SettingsFlaps[ServiceSettings] = SettingsFlaps(changes=self._listings.presence.changes)

    def carry_over(self, previous: TemplateRenderer) -> None:
        """What the renderer a SIGHUP replaces remembers of the services (the settings their
        instances last agreed on: a TCP service with no instance at that moment keeps its port; who
        had each HAProxy name: a case variant registered meanwhile does not take it; and the services
        that keep leaving the listings: see PresenceFlaps)."""
        self._agreed, self._flaps, self._whole_read = previous._agreed, previous._flaps, previous._whole_read
        self._listings.holders = previous._listings.holders
        self._listings.presence = previous._listings.presence

    def share_storms(self, running: TemplateRenderer) -> None:
        """A template a SIGHUP adds keeps the services the running ones keep (their departures, see
        PresenceFlaps) and counts its reloads with theirs (a fresh record held nothing for it)."""
        self._listings.presence = running._listings.presence
        self._flaps.changes = running._listings.presence.changes
        # … and starts from the settings they serve: a fresh record served a service the settings four
        # unbacked services kept from the others, for good (/tmp/rev52)
        self._flaps.served = {name: replace(served) for name, served in running._flaps.served.items()}
        self._flaps.unbacked = set(running._flaps.unbacked)

    def remembered(self) -> tuple[dict[str, checked.Holder], dict[str, dict[str, str]]]:
        """What this renderer remembers of the services (who had each HAProxy name, the settings
        their instances last agreed on), to keep across a restart (`renderer.loop.memory`)."""
        return self._listings.holders, self._agreed

    def restore(self, holders: Mapping[str, checked.Holder], agreed: Mapping[str, Mapping[str, str]]) -> None:
        """What a previous run remembered (see `remembered`), checked by the caller."""
        self._listings.holders.update(holders)
        self._agreed.update({service: dict(values) for service, values in agreed.items()})
        self._whole_read |= set(agreed)

    def hold_names(self, identifiers: Iterable[str]) -> None:
        """HAProxy names the live output gives services (read at start): each stays with the service
        that has it, against a name equal to it without case (see `unique_names`)."""
        for identifier in identifiers:
            self._listings.holders.setdefault(identifier.lower(), checked.Holder(identifier, identifier))

    def set_reserved_ports(self, ports: frozenset[int]) -> None:
        """Ports no listener may take (the agent's, read at start): no kept block is reused, since a
        block may have published one of them."""
        if ports != self.reserved_ports:
            self.reserved_ports = ports
            self._blocks.clear()
            self._checked_at = (None, 0)

    def set_policy(self, policy: AddressPolicy) -> None:
        """A new address policy (the host's own addresses changed): no kept block is reused, since
        each served the addresses the old policy allowed."""
        if policy != self.policy:
            self.policy = policy
            self._blocks.clear()
            self._checked_at = (None, 0)

    @staticmethod
    def _compile(source: Path) -> jinja2.Template:
        if not source.is_file():
            raise TemplateError(f"template {source} does not exist; fix the template's source path")
        try:
            return make_environment(source.parent).get_template(source.name)
        except jinja2.TemplateSyntaxError as err:
            raise TemplateError(f"{err.filename or source}:{err.lineno}: {err.message}") from err
        except (OSError, jinja2.TemplateError) as err:
            raise TemplateError(f"template {source}: {err}") from err

    def render(self, source: DataSource, now: float | None = None) -> RenderResult:
        """Render with the data `source` has now. Errors come back in the result, never raised.
        `now`: the monotonic time holds and storms are decided at (by default the clock's), the same
        for every template a pass renders (see `RenderCycle`)."""
        at = time.monotonic() if now is None else now
        render = _Render(source, self._environ, self._guard, at, self._blocks, self._listings)
        render.leave_out_unsafe = self.spec.on_unsafe_value == "leave_out"
        render.withheld = self._withheld
        render.policy, render.agreed, render.tcp_ports = self.policy, self._agreed, self.tcp_ports
        render.reserved_ports = self.reserved_ports
        render.flaps = self._flaps
        (log, generation), self._checked_at = self._checked_at, (None, 0)  # set again only by a whole render
        if isinstance(source, ChangeLog):
            render.changed = source.changed_since(generation) if log is source else None
            log, generation = source, source.generation
        else:  # blocks made from this source are checked against no log: the next one checks every value
            log, generation = None, 0
        try:
            content = self._template.render(**self._variables, **render.functions())
            for stale in set(self._blocks) - render.used_blocks:
                del self._blocks[stale]
            if not render.missing:  # a render waiting for data read less than it will
                self._guard.keep_only(set(render.dependencies))
            self._forget_settings(render.dependencies.values(), whole=not render.missing)
            self._checked_at = (log, generation)  # every block kept was checked against the data of now
        except Exception as err:  # anything a template can raise: report it with file and line
            self._forget_settings(render.dependencies.values(), whole=False)  # else a failing template's
            # settings grew by one per name an attacker cycled (/tmp/rev52)
            if render.missing and not _is_undefined_name(err):
                return self._incomplete(render)  # empty placeholder data can trip template logic
            where = _template_line(err, self.spec.source.name)
            detail = str(err) if isinstance(err, TemplateError) else f"{type(err).__name__}: {err}"
            return RenderResult(None, render.dependencies, error=f"{where}: {detail}")
        if render.missing:
            return self._incomplete(render)
        return RenderResult(content, render.dependencies, recheck_in=render.recheck_in, left_out=tuple(render.left_out))

    def _forget_settings(self, read: Iterable[Dependency], whole: bool) -> None:
        """Drop the agreed settings of services this render no longer read (a reused block counts
        its reads), nor the last whole render: a deregistered service's memory never outlives it.
        A render waiting for data read less than it will: at a restart the first one, with no data
        yet, forgot every setting the memory file gave back (an attacker's review, /tmp/rev50), so
        the services the last whole render read (at first, those the memory gave back) stay."""
        services = {dep.name for dep in read if isinstance(dep, HealthService)}
        if whole:
            self._whole_read = services
        services |= self._whole_read
        for gone in set(self._agreed) - services:
            del self._agreed[gone]
        self._flaps.forget_all_but(services)

    @staticmethod
    def _incomplete(render: _Render) -> RenderResult:
        return RenderResult(None, render.dependencies, tuple(render.missing))


class _NoData:
    def get(self, key: str) -> tuple[bool, Any]:
        return False, None


def check_template(spec: TemplateSpec, variables: Mapping[str, str]) -> list[str]:
    """Every error found without Consul: syntax (file:line), and undefined names on a trial render."""
    try:
        renderer = TemplateRenderer(spec, variables)
    except TemplateError as err:
        return [str(err)]
    result = renderer.render(_NoData())
    return [result.error] if result.error else []
