"""Dependencies: the Consul data a template uses, each identified by a stable string key.

A dependency knows which API path answers it and how to turn the answer into plain, sorted,
immutable values. Two templates that ask for the same data produce the same key, so the watcher
keeps one blocking query for both. Every string taken from Consul is a `CatalogStr` that remembers
where it came from, so an unsafe value can be reported by service and field.
"""

from __future__ import annotations

import base64
import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar
from urllib.parse import quote

from renderer.haproxy.checked import (
    SETTING_PREFIX,
    Reach,
    address_problem,
    address_reach,
    endpoint,
    path_problem,
    port_problem,
    server_name,
    setting_problem,
    weight_problem,
)
from renderer.logs import shown

_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def unsafe_char(text: str) -> str | None:
    """The first character that could break a config line (controls, line/paragraph separators)."""
    if text.isprintable():  # C speed; false for every unsafe character (and for non-ASCII spaces)
        return None
    for char in text:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            return char
    return None


QUOTED_LIMIT = 200  # characters of an id, node name or key a report shows (Consul takes 250 KB ids)


def shown_id(value: object) -> str:
    """An id, node name or key as reports show it: quoted, escaped, cut to QUOTED_LIMIT characters
    (a 250 KB instance id made each report of it 250 KB: the log, the check, /status, the page)."""
    return shown(value, QUOTED_LIMIT) if isinstance(value, str) else repr(value)[:QUOTED_LIMIT]


def shown_name(name: str) -> str:
    """A service name as reports show it: as it is when it is a plain name (letters, digits, `.`,
    `_`, `-`), else quoted: one with a character that could forge a log line (a newline), or words
    that could pass for the report's own (`payments, instance 'pay-7' …, field Address: drained`
    named an instance that does not exist in the check and /status); cut past QUOTED_LIMIT
    characters (Consul takes names of 16 KiB, and each report of each instance carried it whole)."""
    return name if len(name) <= QUOTED_LIMIT and _PLAIN_NAME.fullmatch(name) else shown(name, QUOTED_LIMIT)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CatalogStr(str):
    """A string from Consul that remembers its origin, e.g. "service web, instance web-1, field Tags"."""

    origin: str

    def __new__(cls, value: object, origin: str) -> CatalogStr:
        obj = super().__new__(cls, "" if value is None else str(value))
        obj.origin = origin
        return obj


# A filter (Consul 1.4+) that matches no instance: Consul sets an instance's ID to its name when
# none is given, so no registered instance has an empty ID.
NO_INSTANCE = 'Service.ID == ""'

_STATUS_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}


@dataclass(frozen=True)
class ServiceInstance:
    """One instance of a service, with the health of its node and service checks folded in."""

    node: str
    id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    status: str = "passing"  # the worst of its checks: passing < warning < critical
    node_address: str = ""
    datacenter: str = ""
    unsafe: str | None = None  # why it must be left out, e.g. "… field Address: '…' carries an IPv6 zone id"
    server_name: str = ""  # an HAProxy identifier from node and id, unique among the service's instances
    endpoint: str = ""  # `v4:port`, `[v6]:port` or `host:port`, checked (empty when unsafe)
    settings: Mapping[str, str] = field(default_factory=dict)  # checked meta `haproxy_<key>` values
    notes: tuple[str, ...] = ()  # meta `haproxy_*` values ignored, with why
    registered_at: int = 0  # Consul's CreateIndex (set by its servers, not the registrant); 0: unknown
    # Consul's ModifyIndex: the last write of this registration (not of its checks). Compared, so the
    # store always holds the latest (an older one kept for equal fields could match a new index after
    # a snapshot restore); a change in a field not read here (Weights) costs a render, as a tag does.
    changed_at: int = 0

    @property
    def weight(self) -> str | None:
        return self.meta.get("weight")

    @property
    def where(self) -> str:
        """The address HAProxy connects to: the service's Address, else its node's."""
        return self.address or self.node_address

    @property
    def reach(self) -> Reach:
        """Where `where` leads (see `checked.address_reach`): local, private, public or a name."""
        return address_reach(self.where)

    @property
    def origin(self) -> str:
        """How reports name it: `service web, instance 'web-1' on node 'n1'`."""
        return _where(self.name, self.id, self.node)


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    datacenter: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    unsafe: str | None = None  # why it must be left out (with where): a control character, a bad address


@dataclass(frozen=True)
class NodeServices:
    """`/v1/catalog/node/NAME`: the node and each service on it, as a checked instance (unsafe ones
    included, marked: `node()` leaves them out and reports them)."""

    node: Node
    instances: tuple[ServiceInstance, ...]


@dataclass(frozen=True)
class KeyPair:
    key: str
    value: str


class Dependency:
    """A piece of Consul data. Subclasses are frozen dataclasses; `key` is their identity."""

    kind: ClassVar[str]
    # Its answer asked for gzipped over HTTP/2: large, and resent whole whenever anything moves.
    compressed: ClassVar[bool] = False
    # Its request names what a template read from Consul or KV (a service, a node, a key): Consul may
    # refuse that name (see fetch.refused_for_form), and the key is then served empty.
    named_by_data: ClassVar[bool] = False
    # The least time between two asks of it, past the watcher's `min_gap_s` (see CatalogNodes).
    min_gap_s: ClassVar[float] = 0.0

    @property
    def key(self) -> str:
        raise NotImplementedError

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        raise NotImplementedError

    def parse(self, data: Any) -> Any:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.key


def _key_part(text: str) -> str:
    """A name as part of a key: `|`, `(`, `)` and `%` escaped, so a service named `api|tag=x` is
    not the key of `service("api", tag="x")`."""
    return text if not any(c in text for c in "|()%") else quote(text, safe="")


def _meta(raw: Mapping[str, Any] | None, origin: str) -> dict[str, str]:
    return {CatalogStr(k, f"{origin}, field Meta"): CatalogStr(v, f"{origin}, field Meta[{k}]")
            for k, v in sorted((raw or {}).items())}  # fmt: skip


def _worst(checks: list[Mapping[str, Any]]) -> str:
    statuses = [str(c.get("Status", "critical")) for c in checks] or ["passing"]
    return max(statuses, key=lambda s: _STATUS_RANK.get(s, 2))


@dataclass(frozen=True)
class HealthService(Dependency):
    """The instances of one service, with their health (`/v1/health/service/NAME`)."""

    name: str
    tag: str | None = None
    kind: ClassVar[str] = "health.service"
    named_by_data: ClassVar[bool] = True

    @functools.cached_property
    def key(self) -> str:  # cached: asked for each of thousands of services at every render
        name, tag = _key_part(self.name), _key_part(self.tag or "")
        return f"health.service({name}{'|tag=' + tag if tag else ''})"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/v1/health/service/{quote(self.name, safe='')}", [("tag", self.tag)] if self.tag else []

    def probe(self, cached: bool = False) -> tuple[str, list[tuple[str, str]]]:
        """The same query with a filter no instance matches: an empty body, but the service's own
        `X-Consul-Index`. A sweep asks this first and reads the instances only where it moved
        (measured at 1,000 services × 10: ~0.17 s and 0.13 s of our CPU per 1,000 probes, against
        0.3-0.5 s and 0.26-0.4 s for the full answers; Consul encodes and we receive almost nothing).

        `cached`: answered from the agent's cache (`?cached`, background refresh), which keeps the
        probe current with a blocking query of its own to the servers: after its first answer a
        probe costs the servers no request, and the entry wakes when this service changes. It is
        a stale read that can trail the servers (see sweep.py for who may ask it)."""
        path, params = self.request()
        return path, [*params, ("filter", NO_INSTANCE), *([("cached", "")] if cached else [])]

    def parse(self, data: Any) -> tuple[ServiceInstance, ...]:
        """The instances of exactly this service: Consul matches names without case, so it answers
        `api` with the instances of `Api` too; those are not `api`'s."""
        objects = map(_object, data or [])
        entries = [e for e in objects if str(_object(e.get("Service")).get("Service", self.name)) == self.name]
        instances = sorted((self._instance(entry) for entry in entries), key=lambda i: (i.node, i.id))
        return _named(instances)

    def _instance(self, entry: Mapping[str, Any]) -> ServiceInstance:
        """One entry, read as `_instance`; one of a shape Consul never sends (a tag that is a number,
        meta that is a list) is left out and said why, never the end of the service's answer: its
        other instances are served."""
        node, svc = _object(entry.get("Node")), _object(entry.get("Service"))
        try:
            return _instance(node, svc, self.name, list(entry.get("Checks") or []))
        except Exception as err:  # any shape at all: contained to this entry
            origin = _where(self.name, svc.get("ID"), node.get("Node"))
            return ServiceInstance("", "", self.name, "", 0, unsafe=f"{origin}: unreadable ({type(err).__name__})")


def _instance(
    node: Mapping[str, Any],
    svc: Mapping[str, Any],
    name: str,
    checks: list[Mapping[str, Any]],
    port_required: bool = True,
) -> ServiceInstance:
    """One instance from Consul's Node and Service objects, checked once here (see `_first_unsafe`):
    an unsafe one carries why, and no endpoint or settings."""
    origin = _where(str(svc.get("Service") or name), svc.get("ID"), node.get("Node"))
    address = svc.get("Address") or node.get("Address") or ""
    instance = ServiceInstance(
        node=CatalogStr(node.get("Node", ""), f"{origin}, field Node"),
        id=CatalogStr(svc.get("ID", ""), f"{origin}, field ID"),
        name=CatalogStr(svc.get("Service", name), f"{origin}, field Service"),
        address=CatalogStr(address, f"{origin}, field Address"),
        port=_port(svc.get("Port")),
        tags=tuple(CatalogStr(t, f"{origin}, field Tags") for t in sorted(svc.get("Tags") or [])),
        meta=_meta(svc.get("Meta"), origin),
        status=_worst(checks),
        node_address=CatalogStr(node.get("Address", ""), f"{origin}, field Node.Address"),
        datacenter=CatalogStr(node.get("Datacenter", ""), f"{origin}, field Datacenter"),
        registered_at=_port(svc.get("CreateIndex")),  # an int as it is, anything else 0
        changed_at=_port(svc.get("ModifyIndex")),
    )
    unsafe = _first_unsafe(instance, svc.get("Port"), port_required)
    if unsafe is not None:
        return replace(instance, unsafe=unsafe)
    if instance.node_address and address_problem(instance.node_address) is not None:
        # Its own address is good, its node's is not (`10.0.0.9 backup`): given as none.
        instance = replace(instance, node_address=CatalogStr("", f"{origin}, field Node.Address"))
    settings, notes = _settings(instance.meta, origin)
    port_endpoint = endpoint(instance.address, instance.port) if instance.port else ""
    return replace(instance, endpoint=port_endpoint, settings=settings, notes=notes)


def _object(value: object) -> Mapping[str, Any]:
    """A JSON object of Consul's answer as a mapping; anything else (a list, a string) as an empty one."""
    return value if isinstance(value, Mapping) else {}


def _port(raw: object) -> int:
    """Consul's `Port`: an int as it is (checked later, see `port_problem`); anything else (a
    float such as 1e400, which JSON reads as infinity, a string, a bool) is no port: 0, left out."""
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else 0


def _no_port(raw: object) -> bool:
    """Whether Consul's `Port` says "no port": absent, or 0 (not `false`, a float or a string)."""
    return raw is None or (type(raw) is int and raw == 0)


def _where(service: str, instance_id: object, node: object) -> str:
    """How reports name an instance: `service web, instance 'web-1' on node 'n1'`."""
    return f"service {shown_name(service)}, instance {shown_id(instance_id)} on node {shown_id(node)}"


def _first_unsafe(instance: ServiceInstance, raw_port: object, port_required: bool = True) -> str | None:
    """Why the instance must never reach a config file or a Runtime API command, if it must not:
    a control character anywhere, or a field HAProxy would read otherwise than meant (a port of 0,
    none, is allowed only where `port_required` is false: a node's services listed by `node()`)."""
    values = [instance.node, instance.id, instance.name, instance.address, *instance.tags, instance.node_address,
              instance.datacenter, *instance.meta.keys(), *instance.meta.values()]  # fmt: skip
    bad = _first_unsafe_char(values)
    if bad is not None:
        return bad
    checks = [
        ("Address", address_problem(instance.address)),
        ("Port", None if _no_port(raw_port) and not port_required else port_problem(raw_port)),
        *((f"Meta[{key}]", check(instance.meta[key])) for key, check in _CHECKED_META if key in instance.meta),
    ]
    for where, problem in checks:
        if problem is not None:
            return f"{_where(instance.name, instance.id, instance.node)}, field {where}: {problem}"
    return None


def _first_unsafe_char(values: Iterable[str]) -> str | None:
    """`<origin>: character '<c>'` for the first value holding a character that could break a
    config line (`unsafe_char`), or None."""
    for value in values:
        bad = unsafe_char(value)
        if bad is not None:
            return f"{getattr(value, 'origin', 'a value')}: character {bad!r}"
    return None


def _settings(meta: Mapping[str, str], origin: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The instance's `haproxy_<key>` meta values that pass their check, and a note for each other
    (the first MAX_SETTING_NOTES, then one that counts the rest: Consul takes 64 meta keys an
    instance, and a service of hundreds of instances would otherwise bring thousands of notes)."""
    settings: dict[str, str] = {}
    notes: list[str] = []
    ignored = 0
    for key, value in meta.items():
        if not key.startswith(SETTING_PREFIX):
            continue
        name = key[len(SETTING_PREFIX) :]
        problem = setting_problem(name, value)
        if problem is None:
            settings[name] = value
        elif (ignored := ignored + 1) <= MAX_SETTING_NOTES:
            notes.append(f"{origin}, field Meta[{key}]: {problem}; the setting keeps its default")
    if ignored > MAX_SETTING_NOTES:
        notes.append(f"{origin}: {ignored - MAX_SETTING_NOTES} more {SETTING_PREFIX}* meta values ignored")
    if "check_path" not in settings and meta.get("health_path", "/health") != "/health":
        # The older meta, checked with the instance (see _CHECKED_META), is the same setting (its
        # default, /health, is no value: instances with and without it agree, as before): agreed
        # on by every instance, compared exactly, the last agreed value kept while they disagree.
        # (The template compared it itself, with Jinja's `unique`, which ignores case: one instance
        # with `/HEALTHZ` set every server's check to its spelling, and any other value to /health.)
        settings["check_path"] = meta["health_path"]
    return settings, tuple(notes)


MAX_SETTING_NOTES = 3


# Meta keys the shipped templates write into haproxy.cfg, each with the check for its context.
_CHECKED_META = (("weight", weight_problem), ("health_path", path_problem))


def _named(instances: list[ServiceInstance]) -> tuple[ServiceInstance, ...]:
    """Each safe instance with its server name, unique within the service without case. Names
    repeat only when they had to be renamed (a hash collision a registrant can search for: 8 hex
    digits) or differ only in case: of those sharing one, the instance registered first (Consul's
    CreateIndex, then the answer's order) keeps it and the others are left out. Before, all of
    them were: a registration made to collide took a served instance out of its backend."""
    names = {n: server_name(i.node, i.id) for n, i in enumerate(instances) if i.unsafe is None}
    keepers: dict[str, int] = {}
    for n in sorted(names, key=lambda n: (instances[n].registered_at or _UNKNOWN_INDEX, n)):
        keepers.setdefault(names[n].lower(), n)
    named = []
    for n, instance in enumerate(instances):
        name = names.get(n)
        if name is not None and keepers[name.lower()] == n:
            instance = replace(instance, server_name=name)
        elif name is not None:
            first = instances[keepers[name.lower()]]
            origin = f"{_where(instance.name, instance.id, instance.node)}, field ID"
            why = (
                f"it would become the server name {name!r}, which instance {shown_id(first.id)} on node "
                f"{shown_id(first.node)}, registered before it, has (names are compared without case)"
            )
            instance = replace(instance, unsafe=f"{origin}: {why}", endpoint="")
        named.append(instance)
    return tuple(named)


_UNKNOWN_INDEX = 2**63  # an instance whose CreateIndex is unknown comes after those known


@dataclass(frozen=True)
class CatalogServices(Dependency):
    """Every service name with its tags (`/v1/catalog/services`)."""

    kind: ClassVar[str] = "catalog.services"
    # Every registration or removal anywhere resends the whole list (38,063 bytes at 1,000
    # services, 2,511 gzipped: measured on Consul 1.8.7), most often with not one name changed.
    compressed: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return "catalog.services"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return "/v1/catalog/services", []

    def parse(self, data: Any) -> dict[str, tuple[str, ...]]:
        return {
            CatalogStr(name, f"service {shown_id(name)}, field Name"): tuple(
                CatalogStr(t, f"service {shown_id(name)}, field Tags") for t in sorted(set(tags or []))
            )
            for name, tags in sorted((data or {}).items())
        }


@dataclass(frozen=True)
class CatalogNodes(Dependency):
    """Every node (`/v1/catalog/nodes`)."""

    kind: ClassVar[str] = "catalog.nodes"
    # Every node write anywhere (a registrant's own node's meta, every 10 ms) resends the whole list:
    # 1.4 MB at 5,000 nodes, 85% of a core to follow it at once (helper-111, /tmp/rev58). As the
    # watcher's trigger (not a template's key): a node's change waits up to twice this under such
    # writes; once they stop, the next one comes at once.
    min_gap_s: ClassVar[float] = 1.0

    @property
    def key(self) -> str:
        return "catalog.nodes"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return "/v1/catalog/nodes", []

    def parse(self, data: Any) -> tuple[Node, ...]:
        return tuple(sorted((_node(n) for n in data or []), key=lambda n: n.name))


def _node(raw: Mapping[str, Any]) -> Node:
    origin = f"node {shown_id(raw.get('Node'))}"
    node = Node(
        name=CatalogStr(raw.get("Node", ""), f"{origin}, field Node"),
        address=CatalogStr(raw.get("Address", ""), f"{origin}, field Address"),
        datacenter=CatalogStr(raw.get("Datacenter", ""), f"{origin}, field Datacenter"),
        meta=_meta(raw.get("Meta"), origin),
    )
    return replace(node, unsafe=_node_unsafe(node))


def _node_unsafe(node: Node) -> str | None:
    """Why the node must never reach the output, if it must not: a control character in any field,
    or an address that cannot be a server address (as `_first_unsafe` for an instance)."""
    bad = _first_unsafe_char([node.name, node.address, node.datacenter, *node.meta.keys(), *node.meta.values()])
    if bad is not None:
        return bad
    why = address_problem(node.address)
    return None if why is None else f"{getattr(node.address, 'origin', 'node address')}: {why}"


@dataclass(frozen=True)
class CatalogNode(Dependency):
    """One node and the services registered on it (`/v1/catalog/node/NAME`)."""

    name: str
    kind: ClassVar[str] = "catalog.node"
    named_by_data: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return f"catalog.node({self.name})"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/v1/catalog/node/{quote(self.name, safe='')}", []

    def parse(self, data: Any) -> NodeServices | None:
        """The node and its services, each service an instance checked as `service()`'s are (the
        catalog has no health: each is "passing"; a service without a port keeps port 0)."""
        if not data or not data.get("Node"):
            return None
        raw = data["Node"]
        entries = [{"ID": sid, **(svc or {})} for sid, svc in sorted((data.get("Services") or {}).items())]
        instances = _named(sorted((_instance(raw, svc, "", [], port_required=False) for svc in entries),
                                  key=lambda i: i.id))  # fmt: skip
        return NodeServices(_node(raw), instances)


def _decode(value: str | None) -> str:
    return base64.b64decode(value).decode(errors="replace") if value else ""


@dataclass(frozen=True)
class KVKey(Dependency):
    """One key's value (`/v1/kv/KEY`); None while the key does not exist."""

    path: str
    kind: ClassVar[str] = "kv.key"
    named_by_data: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return f"kv.key({self.path})"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/v1/kv/{quote(self.path.lstrip('/'))}", []

    def parse(self, data: Any) -> str | None:
        if not data:
            return None
        return CatalogStr(_decode(data[0].get("Value")), f"key {shown_id(self.path)}")


@dataclass(frozen=True)
class KVPrefix(Dependency):
    """Every key under a prefix (`/v1/kv/PREFIX?recurse`), sorted by key."""

    prefix: str
    kind: ClassVar[str] = "kv.prefix"
    named_by_data: ClassVar[bool] = True

    @property
    def key(self) -> str:
        return f"kv.prefix({self.prefix})"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/v1/kv/{quote(self.prefix.lstrip('/'))}", [("recurse", "")]

    def parse(self, data: Any) -> tuple[KeyPair, ...]:
        base = self.prefix.lstrip("/")
        pairs = []
        for item in data or []:
            full = str(item.get("Key", ""))
            relative = full[len(base) :].lstrip("/") if full.startswith(base) else full
            if not relative or relative.endswith("/"):
                continue  # the prefix itself, or a "folder" key
            pairs.append(
                KeyPair(
                    CatalogStr(relative, f"key {shown_id(full)}, its name"),
                    CatalogStr(_decode(item.get("Value")), f"key {shown_id(full)}"),
                )
            )
        return tuple(sorted(pairs, key=lambda p: p.key))


@dataclass(frozen=True)
class HealthState(Dependency):
    """The checks in one state (`/v1/health/state/STATE`), as (node, check id, service name, status).

    The watcher's catalog-wide trigger, not a template function: the set changes when any check
    enters or leaves the state, and the difference names the services (or, for node checks with
    no service, the node) whose health moved.
    """

    state: str
    kind: ClassVar[str] = "health.state"

    @property
    def key(self) -> str:
        return f"health.state({self.state})"

    def request(self) -> tuple[str, list[tuple[str, str]]]:
        return f"/v1/health/state/{quote(self.state, safe='')}", []

    def parse(self, data: Any) -> frozenset[tuple[str, str, str, str]]:
        return frozenset(
            (str(c.get("Node", "")), str(c.get("CheckID", "")), str(c.get("ServiceName") or ""), str(c.get("Status")))
            for c in data or []
        )
