"""The Docker registrator: containers carrying our labels are registered in Consul while they run.

Labels on a container:
    consul.service=web            the service name (required; containers without it are ignored)
    consul.port=8080              the port the service listens on (required)
    consul.tags=lb,v2             comma-separated tags
    consul.meta.<key>=<value>     service meta, e.g. consul.meta.weight=5
    consul.check.http=/health     an HTTP check: a path on the container
    consul.check.interval=2s      its interval (default 2s)
    consul.meta.haproxy_mode / consul.meta.haproxy_port: a TCP listener of its own on every load
                                  balancer, honoured only with --allow-listener-label
    consul.address=10.0.0.5       the address to register, honoured only with --allow-address-label
                                  (default: the container's IP, or for --network host containers
                                  this host's address towards the agent)

Labels are untrusted: whoever may start a container writes them. They are checked where they
enter (`service_from_container`) and a container is carried on as a checked `ContainerService`:
    service  [A-Za-z0-9][A-Za-z0-9._-]{0,63}, and one of the --allow-service glob patterns when
             any are given (without any, every name may be claimed: logged once at start)
    port     1-65535 in ASCII digits
    tags     at most 32, each 1-128 printable characters (no control or format characters), not
             blank; meta: at most 32 keys of [A-Za-z0-9_-]{1,128} (Consul's own rule; our own keys
             below are reserved), values of at most 512 printable characters and 512 bytes (UTF-8)
    check    a path on the container: starts with `/`, at most 256 characters of
             [A-Za-z0-9._~%/?&=+,:@!$*()-] (no quotes, whitespace, `#` or backslash); its interval
             [0-9]{1,5}(ms|s|m)
A container with a label that fails is skipped, with one warning naming the container, the label
and why; the other containers go on. A check given as a full URL refuses the container too
(rather than registering it without the check it asked for): a check is the container's own
health, so it may only point at the container. `consul.address` without --allow-address-label is
ignored with a warning and the container's own address is registered.

Consul's answers are untrusted as well: a registration Consul refuses (4xx) is not retried and is
logged with the container, the service and Consul's message; errors are caught per container, so
one container never stops the sync or the events of the others. While the agent is unreachable
calls are retried with backoff; a registration it answers with a failure (5xx) is tried for
REGISTRATION_FAILING_FOR_S, then left to the next sync; `stop()` ends any retry at once.

Every registration it makes carries `Meta["registered-by"] = "consul-renderer-registrator"` and
`Meta["registrator-host"]`, and it only ever removes registrations with both marks for its own
host: registrations made by anyone else are never touched. At start (and after every reconnect
to Docker) it syncs: registers what runs, removes its own registrations whose container is gone
(no ghosts after a restart of the registrator or of Docker). Then it follows Docker events.

A container whose registration was withdrawn, or refused by Consul, FLAP_DROPS times within
FLAP_WINDOW_S (its health check or its state flapping) is registered again only by the periodic
sync, once a minute at most, until it is steady: each change moves the catalog for every load
balancer, and each refusal costs a request and a warning.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import docker.errors
import requests.exceptions
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_random_exponential

import docker
from renderer.errors import ConfigError, ConsulError
from renderer.logs import shown
from renderer.registration.register import Interrupted, Registration, sleeping_on, worth_retrying
from renderer.render.listing import EVERY_SERVICE, ServedServices
from renderer.source.client import said

log = logging.getLogger(__name__)

OWNER_KEY = "registered-by"
OWNER = "consul-renderer-registrator"
HOST_KEY = "registrator-host"
CONTAINER_KEY = "container-id"
START_EVENTS = frozenset({"start", "unpause"})
# Not "kill" (-s HUP is a reload), nor "oom": Docker says it when any process in the container is
# killed for memory, the container running on; its end says "die" (helper-141: a running container
# withdrawn until the next sync).
STOP_EVENTS = frozenset({"die", "stop", "destroy", "pause"})
EVENT_WINDOW_S = 1
# Every this often the registrations are compared with what runs again (as consul-registrator's
# -resync): an event missed while the connection stayed up (Docker drops events for a slow reader;
# a deregistration the agent refused during a blip) left a registration for a container that is
# gone, for good when it had no check, at an address Docker may give to another container.
RESYNC_S = 60.0
POLL_S = 0.2  # how often `serve` looks for a signal
# Flap damping: a container whose registration was withdrawn (unhealthy, stopped, paused) this many
# times within the window is registered again by the periodic sync (RESYNC_S), not by its next
# healthy or start event. Each withdrawal and registration moves the catalog, and every load
# balancer's renderer reads it: a container flapping its health check every second cost each of
# them a catalog read a second. Its withdrawals stay immediate: no request goes to it meanwhile.
FLAP_DROPS, FLAP_WINDOW_S = 3, 300.0

SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PORT = re.compile(r"[0-9]{1,5}")  # a str pattern's [0-9] is ASCII only: no '８０'
META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
CHECK_PATH = re.compile(r"/[A-Za-z0-9._~%/?&=+,:@!$*()-]{0,255}")
INTERVAL = re.compile(r"[0-9]{1,5}(ms|s|m)")
CONTAINER_ID = re.compile(r"[0-9a-f]{12,64}")
ENGINE_ID = re.compile(r"[A-Za-z0-9:_.-]{1,128}")  # `docker info`'s ID: a UUID, or the older 12 groups of 4
# A registration the agent keeps answering with a failure (5xx) is given up after this, until the
# next sync: one container Consul cannot take holds the others' events no longer than this.
REGISTRATION_FAILING_FOR_S = 10.0
HOST_MARK = re.compile(r"[A-Za-z0-9:_.-]{1,160}")  # a --host-id or --adopt mark
# How long `engine_host` waits for Docker to say its ID, and how often it asks.
ENGINE_WAIT_S, ENGINE_RETRY_S = 60.0, 2.0
SAFE_SERVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a word in a URL path
MAX_TAGS, MAX_TAG_CHARS = 32, 128
MAX_META, MAX_META_VALUE_BYTES = 32, 512  # Consul counts a meta value's bytes (UTF-8), not its characters
RESERVED_META = frozenset({OWNER_KEY, HOST_KEY, CONTAINER_KEY})
# The most a `consul.*` label may hold, and the most of them, before any is parsed: a 16 MB tags
# label was split whole (0.9 s and 434 MB each time, helper-141). Tags: 32 × 128 and the commas.
MAX_LABEL_CHARS, MAX_CONSUL_LABELS = 8192, MAX_META + 8
# Consul's own service (its servers register it): a container claiming it would be served as one
# of them, to `consul.service.consul` too (helper-141).
RESERVED_SERVICES = frozenset({"consul"})
# The containers whose labels were refused, remembered so that their events and the periodic sync
# neither inspect them nor warn again (labels cannot change): at most this many, the oldest let go.
MAX_REFUSED_CONTAINERS = 4096
# Meta that opens a port of its own on every load balancer (a TCP `listen`): more than a name may claim.
LISTENER_META = frozenset({"haproxy_mode", "haproxy_port"})


@dataclass(frozen=True)
class LabelPolicy:
    """What containers may claim through their labels."""

    allowed_services: tuple[str, ...] = ()  # shell patterns, read as serve_services reads them; none: any name
    address_label: bool = False  # honour `consul.address`
    listener_label: bool = False  # honour meta `haproxy_mode` / `haproxy_port` (a listener on the load balancers)
    _served: ServedServices = field(init=False, repr=False, compare=False, default=EVERY_SERVICE)

    def __post_init__(self) -> None:
        if self.allowed_services:
            object.__setattr__(self, "_served", ServedServices(self.allowed_services))

    @classmethod
    def parse(cls, patterns: Iterable[str], address_label: bool = False, listener_label: bool = False) -> LabelPolicy:
        """From --allow-service values (blank ones dropped); a pattern no name could match is a ConfigError."""
        allowed = tuple(p.strip() for p in patterns if p.strip())
        for pattern in allowed:
            if not SERVICE_NAME.fullmatch(pattern.replace("*", "x").replace("?", "x")):
                raise ConfigError(
                    f"--allow-service {pattern!r} (CONSUL_RENDERER_ALLOW_SERVICES): expected a service name "
                    "with * and ? wildcards, e.g. web or web-*"
                )
        return cls(allowed, address_label, listener_label)

    def allows(self, name: str) -> bool:
        """Whether a container may register `name`: matched as the renderer's serve_services are, case
        for case and with wildcards that never match a `.` (fnmatch's `*` did: `shop-*` let a
        container register `shop-eu.example`, which takes Host shop-eu.example.* from shop-eu)."""
        return self._served.refusal(name) is None


class LabelRefused(ValueError):
    """One label that fails its check: the container is skipped."""

    def __init__(self, label: str, value: str, why: str) -> None:
        # The key is the container's too (the Docker API checks no label key): quoted unless plain.
        key = label if _PLAIN_LABEL.fullmatch(label) else shown(label)
        super().__init__(f"label {key}={shown(value)} {why}")
        self.label = label


_PLAIN_LABEL = re.compile(r"[A-Za-z0-9._*-]{1,200}")


@dataclass(frozen=True)
class ContainerService:
    """What a container's labels ask for, checked (see the module docstring)."""

    container_id: str
    name: str
    port: int
    address: str | None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check_http: str | None = None
    check_interval: str = "2s"

    @property
    def service_id(self) -> str:
        return f"{self.name}-{self.container_id[:12]}"

    def registration(self, host: str) -> Registration:
        meta = {**self.meta, OWNER_KEY: OWNER, HOST_KEY: host, CONTAINER_KEY: self.container_id[:12]}
        return Registration(
            name=self.name,
            port=self.port,
            address=self.address,
            service_id=self.service_id,
            tags=self.tags,
            meta=meta,
            check_http=self.check_http,
            check_interval=self.check_interval,
            deregister_critical_after="1m" if self.check_http else None,
            follow_redirects=False,  # a path its owner chose: see Registrar._put_registration
        )


def engine_host(
    engine: DockerEngine, wait_s: float = ENGINE_WAIT_S, sleep: Callable[[float], None] = time.sleep
) -> str | None:
    """The mark for this Docker host's registrations: its engine's own ID, which a recreated
    registrator container keeps. An attacker's review: the default was the hostname, in compose the
    registrator container's ID, new at each recreate, so the registrations of containers stopped
    meanwhile were nobody's, never removed (none at all without a check label), at addresses Docker
    gives to other containers.

    Docker is asked again every ENGINE_RETRY_S while it does not answer, for `wait_s` at most, then
    a ConfigError says so (a later review: one failed call switched to the hostname's mark without a
    word, and the registrations marked with the engine's ID became ghosts). An engine that answers
    without a usable ID: None, with a warning (the hostname serves then)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = engine.info()
            break
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as err:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"Docker did not say its engine ID within {wait_s:.0f} s ({said(str(err))}): the registrator "
                    "marks its registrations with it; check that Docker runs, or give --host-id NAME"
                ) from err
            log.warning("Docker did not say its engine ID (%s); asking again in %.0f s", said(str(err)), ENGINE_RETRY_S)
            sleep(ENGINE_RETRY_S)
    ident = info.get("ID") if isinstance(info, Mapping) else None
    if isinstance(ident, str) and ENGINE_ID.fullmatch(ident):
        return f"docker-engine-{ident}"
    log.warning(
        "Docker gave no usable engine ID (%s): registrations are marked with this host's name instead; "
        "give --host-id NAME to choose the mark", said(repr(ident), 80),
    )  # fmt: skip
    return None


def host_marks(engine: DockerEngine, host_id: str | None, adopt: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """The registrator's mark (`--host-id`, else the engine's: `engine_host`) and the marks it takes
    as its own too: `adopt` (`--adopt`), and by default this host's name (the default mark before).
    A mark given must look like one (HOST_MARK: a review found an empty or stray `--adopt` could
    take over another registrator's registrations on a shared agent, and remove them)."""
    for flag, mark in [("--host-id", host_id), *(("--adopt", one) for one in adopt)]:
        if mark is not None and not HOST_MARK.fullmatch(mark):
            raise ConfigError(
                f"{flag} {shown(mark)}: expected a host mark of 1-160 letters, digits and ':_.-', as "
                "Meta[registrator-host] shows it (a hostname, docker-engine-<ID>, or a --host-id)"
            )
    if host_id:
        return host_id, adopt
    return engine_host(engine), (socket.gethostname(), *adopt)


def _moved(registration: Registration, registered: Mapping[str, Any]) -> str | None:
    """What of a registration on the agent (`registered`, as /v1/agent/services gives it) differs
    from what `Registration.payload` would send for its container now, or None. A container
    restarted while the registrator was away (or whose events Docker dropped) keeps its ID and may
    get another address: the sync compared IDs alone, so the catalog kept the old address, which
    Docker may give another container."""
    sent = registration.payload(default_address=str(registered.get("Address") or ""))
    have = {
        "Name": registered.get("Service"), "Address": registered.get("Address"), "Port": registered.get("Port"),
        "Tags": registered.get("Tags") or [], "Meta": registered.get("Meta") or {},  # Consul gives null for none
    }  # fmt: skip
    for key, value in have.items():
        if sent[key] != value:
            return key.lower()
    return None


def _metas(registrations: Mapping[str, Mapping[str, Any]]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """(id, Meta) of each registration that has a Meta object."""
    for sid, registered in registrations.items():
        meta = registered.get("Meta")
        if isinstance(meta, Mapping):
            yield sid, meta


def _serving(attrs: Mapping[str, Any]) -> bool:
    """Whether a listed container serves: Docker lists paused and restarting containers, and
    unhealthy ones, which their `pause`, `die` and `health_status: unhealthy` events deregistered."""
    state = attrs.get("State")
    if not isinstance(state, Mapping):
        return True  # an engine that says nothing of it: as before
    health = state.get("Health")
    unhealthy = isinstance(health, Mapping) and health.get("Status") == "unhealthy"
    # Not running: a start event read again (the event windows overlap) after the container ended
    # registered it again, dead, for a moment (helper-141).
    ended = state.get("Running") is False
    return not (state.get("Paused") or state.get("Restarting") or unhealthy or ended)


@dataclass(frozen=True)
class Reading:
    """What a container's inspect data says: its service (None: not registered), what to warn of,
    and whether its labels were refused, which holds for the container's life (labels cannot
    change; its networks can)."""

    service: ContainerService | None
    notes: tuple[str, ...] = ()
    refused: bool = False


def service_from_container(attrs: Mapping[str, Any], policy: LabelPolicy | None = None) -> ContainerService | None:
    """The service a container's labels describe, or None: no `consul.service` label, or a label
    that fails its check (one warning naming the container, the label and why)."""
    reading = read_container(attrs, policy)
    for note in reading.notes:
        log.warning("%s", note)
    return reading.service


def read_container(attrs: Mapping[str, Any], policy: LabelPolicy | None = None) -> Reading:
    """`service_from_container`'s checks, saying nothing: the registrator says each note once a
    container (helper-141: a container paused and unpaused in a loop made 805 warnings in 20 s)."""
    policy = policy or LabelPolicy()
    labels = _labels(attrs)
    if "consul.service" not in labels:
        return Reading(None)
    container_id = str(attrs.get("Id", ""))
    if not CONTAINER_ID.fullmatch(container_id):
        return Reading(None, (f"container with id {shown(container_id)}: not a Docker container id; skipped",), True)
    own_address = _container_ip(attrs)
    mode = _network_mode(attrs)
    labelled = policy.address_label and "consul.address" in labels  # an address of the operator's choice
    if own_address is None and mode != "host" and not labelled:
        return Reading(None, (
            f"container {container_id[:12]}: no address of its own that may be registered (network mode "
            f"{shown(mode or 'unknown')}): skipped; only a container with an address on a network (not "
            "loopback, link-local, multicast, unspecified or reserved such as 240.0.0.0/4), or on the "
            "host's network (--network host), is registered",
        ))  # fmt: skip
    try:
        service = _checked_service(container_id, labels, policy, own_address)
    except LabelRefused as refused:
        return Reading(None, (f"container {container_id[:12]}: {refused}; container skipped",), True)
    notes = []
    dropped = sorted(LISTENER_META & set(service.meta)) if not policy.listener_label else []
    if dropped:
        notes.append(
            f"container {container_id[:12]}: meta {', '.join(dropped)} ignored (a listener of its own on the "
            "load balancers needs --allow-listener-label); registered as an HTTP service"
        )
        service = replace(service, meta={k: v for k, v in service.meta.items() if k not in LISTENER_META})
    if "consul.address" in labels and not policy.address_label:
        notes.append(
            f"container {container_id[:12]}: label consul.address={shown(labels['consul.address'])} ignored "
            "(address labels need --allow-address-label); registering the container's own address"
        )
    return Reading(service, tuple(notes))


def _checked_service(
    container_id: str, labels: Mapping[str, str], policy: LabelPolicy, own_address: str | None
) -> ContainerService:
    ours = [label for label in labels if label.startswith("consul.")]
    if len(ours) > MAX_CONSUL_LABELS:
        raise LabelRefused("consul.*", "", f"{len(ours)} consul.* labels, more than {MAX_CONSUL_LABELS}")
    for label in ours:
        if len(labels[label]) > MAX_LABEL_CHARS:
            raise LabelRefused(label, labels[label], f"is over {MAX_LABEL_CHARS} characters")
    name = labels["consul.service"]
    if not SERVICE_NAME.fullmatch(name):
        raise LabelRefused("consul.service", name, "is not a service name ([A-Za-z0-9][A-Za-z0-9._-]{0,63})")
    if name.lower() in RESERVED_SERVICES:
        raise LabelRefused("consul.service", name, "is Consul's own service, which only its servers register")
    if not policy.allows(name):
        allowed = ",".join(policy.allowed_services)
        raise LabelRefused("consul.service", name, f"is not an allowed name (--allow-service {allowed})")
    check_http = labels.get("consul.check.http")
    if check_http is not None:
        _check_path(check_http)
    interval = labels.get("consul.check.interval", "2s")
    if not INTERVAL.fullmatch(interval):
        raise LabelRefused("consul.check.interval", interval, "is not a duration such as 500ms, 2s or 1m")
    address = own_address
    if policy.address_label and "consul.address" in labels:
        address = _address(labels["consul.address"])
    return ContainerService(
        container_id=container_id,
        name=name,
        port=_port(labels.get("consul.port", "")),
        address=address,
        tags=_tags(labels.get("consul.tags", "")),
        meta=_meta(labels),
        check_http=check_http,
        check_interval=interval,
    )


def _port(value: str) -> int:
    if not PORT.fullmatch(value) or not 1 <= int(value) <= 65535:
        raise LabelRefused("consul.port", value, "is not a port (1-65535, ASCII digits)")
    return int(value)


def _text(label: str, value: str, limit: int) -> str:
    """Printable text (no control, format or line-separator characters), not blank, at most `limit`."""
    if not value.strip() or len(value) > limit or not value.isprintable():
        raise LabelRefused(label, value, f"is not 1-{limit} printable characters")
    return value


def _tags(value: str) -> tuple[str, ...]:
    tags = [t.strip() for t in value.split(",") if t.strip()]
    if len(tags) > MAX_TAGS:
        raise LabelRefused("consul.tags", value, f"has {len(tags)} tags, more than {MAX_TAGS}")
    return tuple(sorted(_text("consul.tags", t, MAX_TAG_CHARS) for t in tags))


def _meta(labels: Mapping[str, str]) -> dict[str, str]:
    meta = {}
    for label, value in sorted(labels.items()):
        if not label.startswith("consul.meta."):
            continue
        key = label.removeprefix("consul.meta.")
        if not META_KEY.fullmatch(key) or key in RESERVED_META or key.lower().startswith("consul-"):
            # consul-: Consul reserves the prefix and refuses the registration, echoing the pair
            raise LabelRefused(label, value, "has a meta key that is not [A-Za-z0-9_-]{1,128} or is reserved")
        meta[key] = _text(label, value, MAX_META_VALUE_BYTES) if value else value
        if len(value.encode("utf-8", "surrogatepass")) > MAX_META_VALUE_BYTES:
            # a review: 512 `é` passed, and Consul refused the registration at every health event
            raise LabelRefused(label, value, f"is over {MAX_META_VALUE_BYTES} bytes in UTF-8 (Consul's limit)")
    if len(meta) > MAX_META:
        raise LabelRefused("consul.meta.*", "", f"{len(meta)} meta keys, more than {MAX_META}")
    return meta


def _check_path(value: str) -> None:
    if "://" in value or not value.startswith("/"):
        raise LabelRefused("consul.check.http", value, "is not a path on the container such as /health (no URL)")
    if not CHECK_PATH.fullmatch(value):
        raise LabelRefused(
            "consul.check.http", value, "has a character a check path may not have (quote, space, #, \\) or is long"
        )


def _address(value: str) -> str:
    try:
        if "%" in value:
            raise ValueError(value)
        address = ipaddress.ip_address(value)
    except ValueError:
        raise LabelRefused("consul.address", value, "is not an IP address") from None
    if _own_address(str(address)) is None:
        # loopback too: a check on 127.0.0.1 at the agent's port reads the agent itself (helper-143)
        raise LabelRefused(
            "consul.address", value, "is not an address to register (loopback, link-local, multicast, reserved)"
        )
    return str(address)


def _own_address(value: str) -> str | None:
    """A container's address as Docker says it, when one that may be registered: not loopback,
    link-local, unspecified, multicast or reserved, no IPv6 zone (helper-141: Docker's answer was
    taken whole, and a check URL built on 127.0.0.1 or 169.254.169.254 sends the agent there)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and (address.scope_id or address.ipv4_mapped):
        return None
    unusable = address.is_loopback or address.is_link_local or address.is_unspecified or address.is_multicast
    return None if unusable or (address.version == 4 and address.is_reserved) else str(address)


def _labels(attrs: Mapping[str, Any]) -> dict[str, str]:
    config = attrs.get("Config")
    labels = config.get("Labels") if isinstance(config, Mapping) else None
    if not isinstance(labels, Mapping):
        return {}
    return {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}


def _container_ip(attrs: Mapping[str, Any]) -> str | None:
    settings = attrs.get("NetworkSettings")
    networks = settings.get("Networks") if isinstance(settings, Mapping) else None
    for field_name in ("IPAddress", "GlobalIPv6Address"):  # IPv4 first; an IPv6-only network's
        for network in networks.values() if isinstance(networks, Mapping) else ():
            address = network.get(field_name) if isinstance(network, Mapping) else None
            usable = _own_address(address) if isinstance(address, str) and address else None
            if usable is not None:
                return usable
    return None  # --network host, none or container:X: none of its own


def _network_mode(attrs: Mapping[str, Any]) -> str | None:
    """`HostConfig.NetworkMode`: `host` (the registrar then uses this host's address), `none`,
    `container:ID`, a network's name, or None when the inspect data has none."""
    host_config = attrs.get("HostConfig")
    mode = host_config.get("NetworkMode") if isinstance(host_config, Mapping) else None
    return mode if isinstance(mode, str) else None


class Container(Protocol):
    """A container as the Docker SDK gives it: its inspect data (or, listed `sparse`, the list's)."""

    @property
    def id(self) -> str | None: ...
    @property
    def attrs(self) -> dict[str, Any]: ...


class Containers(Protocol):
    def list(self, filters: dict[str, str], sparse: bool = False) -> Sequence[Container]: ...
    def get(self, container_id: str) -> Container: ...


class DockerEngine(Protocol):
    """What the registrator asks of Docker: `docker.DockerClient` is the real one."""

    @property
    def containers(self) -> Containers: ...
    def info(self) -> Mapping[str, Any]: ...
    def events(self, decode: bool, filters: dict[str, str], since: int, until: int) -> Iterable[Mapping[str, Any]]: ...


class ServiceRegistrar(Protocol):
    """What the registrator asks of Consul's agent: `Registrar` (register.py) is the real one."""

    def services(self) -> dict[str, Any]: ...
    def register(self, registration: Registration) -> str: ...
    def deregister(self, service_id: str) -> bool: ...
    def interrupt(self) -> None: ...


class DockerRegistrator:
    """Keeps Consul's registrations equal to the labelled containers running on this Docker host."""

    def __init__(
        self,
        docker_client: DockerEngine,
        registrar: ServiceRegistrar,
        host: str | None = None,
        policy: LabelPolicy | None = None,
        adopt: tuple[str, ...] = (),
    ) -> None:
        self._docker = docker_client
        self._registrar = registrar
        self.host = host or socket.gethostname()
        self._marks = frozenset({self.host, *adopt})  # host marks whose registrations are ours (see `owned`)
        self._policy = policy or LabelPolicy()
        self._stop = threading.Event()
        self._refused: dict[str, str] = {}  # service id → why Consul refused it (the periodic sync says it once)
        self._refused_4xx: set[str] = set()  # service ids whose last registration Consul answered 4xx
        self._drops: dict[str, list[float]] = {}  # container id (12) → its withdrawals within FLAP_WINDOW_S
        self._damped: set[str] = set()  # containers said to flap (once an episode)
        # container id (12) → our registrations of it, as the last sync found them and registrations
        # since: a stop event withdraws them without listing the agent's services each time.
        self._ours: dict[str, set[str]] = {}
        # Containers whose labels were refused (ids, oldest first): their events and the syncs neither
        # inspect them again nor warn (a 16 MB label cost 0.9 s and 434 MB at each, helper-141); and
        # what was said of each container at WARNING (later: DEBUG). Both at most MAX_REFUSED_CONTAINERS.
        self._refused_labels: dict[str, None] = {}
        self._said: dict[tuple[str, str], None] = {}
        self._synced = False  # the first sync's failure ends `run`; a later one (a reconnect's) is retried
        if not self._policy.allowed_services:
            log.warning(
                "any container on this Docker host can register any service name; "
                "restrict the names with --allow-service PATTERN (or CONSUL_RENDERER_ALLOW_SERVICES)"
            )

    def stop(self) -> None:
        """Ends `run()` within one event window, and any retry against Consul or Docker at once.
        Not for a signal handler (it sets Events): see `serve`."""
        self._stop.set()
        self._registrar.interrupt()

    def owned(self) -> dict[str, Mapping[str, Any]]:
        """Our registrations on the agent: id → service, for this host only."""
        owned = {}
        for sid, svc in self._registrar.services().items():
            meta = svc.get("Meta") if isinstance(svc, Mapping) else None
            if not isinstance(meta, Mapping) or meta.get(OWNER_KEY) != OWNER or meta.get(HOST_KEY) not in self._marks:
                continue
            if SAFE_SERVICE_ID.fullmatch(sid):  # ours make a safe path; another is never sent back
                owned[sid] = svc
        return owned

    def running(self) -> tuple[dict[str, ContainerService], set[str]]:
        """The labelled containers that serve now: not paused, restarting or unhealthy, as the events
        tell (`handle`): a sync, every minute, must not register again what an event deregistered.
        Each is inspected on its own, and one Docker cannot answer for (or whose answer has a shape
        not foreseen) is left out of both: the second set holds their ids (12), whose registrations
        the sync keeps (helper-141: one inspect failing failed every sync, for every container)."""
        found: dict[str, ContainerService] = {}
        unread: set[str] = set()
        for listed in self._docker.containers.list(filters={"label": "consul.service"}, sparse=True):
            container_id = str(listed.id or "")
            if not CONTAINER_ID.fullmatch(container_id) or container_id in self._refused_labels:
                continue
            try:
                attrs = self._docker.containers.get(container_id).attrs
                service = self._read(container_id, attrs) if _serving(attrs) else None
            except docker.errors.NotFound:
                continue  # gone since the list
            except (docker.errors.APIError, LookupError, TypeError, AttributeError, ValueError) as err:
                unread.add(container_id[:12])
                why = said(f"{type(err).__name__}: {err}")
                self._say_once(container_id, f"container {container_id[:12]}: not read ({why}); its registrations stay")
                continue
            if service is not None:
                found[service.service_id] = service
        return found, unread

    def _read(self, container_id: str, attrs: Mapping[str, Any]) -> ContainerService | None:
        """`read_container`, its notes said once a container, a refusal remembered (see __init__)."""
        reading = read_container(attrs, self._policy)
        for note in reading.notes:
            self._say_once(container_id, note)
        if reading.refused:
            self._refused_labels[container_id] = None
            if len(self._refused_labels) > MAX_REFUSED_CONTAINERS:
                del self._refused_labels[next(iter(self._refused_labels))]
        return reading.service

    def _say_once(self, container_id: str, note: str) -> None:
        """`note` at WARNING the first time for this container, at DEBUG after."""
        key = (container_id[:12], note)
        if key in self._said:
            log.debug("%s", note)
            return
        self._said[key] = None
        if len(self._said) > MAX_REFUSED_CONTAINERS:
            del self._said[next(iter(self._said))]
        log.warning("%s", note)

    def sync(self, quiet: bool = False) -> tuple[list[str], list[str]]:
        """Register what runs, deregister our ghosts. Returns (registered ids, removed ids).
        `quiet`: said at INFO only when it changed something (the periodic one)."""
        (running, unread), owned = self.running(), self.owned()
        self._refused = {sid: why for sid, why in self._refused.items() if sid in running}
        self._refused_4xx &= self._refused.keys()
        # Ours: what runs of what we registered; `_register` adds each it registers now (and each
        # whose answer was lost); the ghosts, registered and gone, are withdrawn below.
        self._ours = {}
        for sid in owned.keys() & running.keys():
            self._ours.setdefault(running[sid].container_id[:12], set()).add(sid)
        # Docker did not say whether these serve: kept until it does, and still ours, so that their
        # stop event withdraws them (helper-143)
        unanswered = {sid: str(meta[CONTAINER_KEY]) for sid, meta in _metas(owned) if meta.get(CONTAINER_KEY) in unread}
        for sid, container in unanswered.items():
            self._ours.setdefault(container, set()).add(sid)
        added = []
        for sid, svc in sorted(running.items()):
            if sid in owned:
                moved = _moved(svc.registration(self.host), owned[sid])
                if moved is None:
                    continue
                log.info("%s: its %s changed while no event said so; registering it again", sid, moved)
            if self._register(svc, quiet):
                added.append(sid)
        removed = []
        for sid in sorted(set(owned) - set(running) - set(unanswered)):
            self._registrar.deregister(sid)
            removed.append(sid)
        level = logging.DEBUG if quiet and not added and not removed else logging.INFO
        log.log(level, "sync: %d running, %d registered now, %d ghosts removed", len(running), len(added), len(removed))
        return added, removed

    def _resync(self) -> None:
        """The periodic `sync`: one Consul cannot answer is tried again at the next (Docker's errors
        reconnect, as in `run`)."""
        try:
            self.sync(quiet=True)
        except Interrupted:
            raise
        except ConsulError as err:
            log.warning("periodic sync failed (tried again in %.0f s): %s", RESYNC_S, said(str(err)))

    def _register(self, service: ContainerService, quiet: bool = False) -> bool:
        """One container's registration; its failure is logged and ends nothing else (`quiet`: the
        periodic sync, which says a refusal said before at DEBUG: it asks again every minute)."""
        try:
            self._registrar.register(service.registration(self.host))
            self._ours.setdefault(service.container_id[:12], set()).add(service.service_id)
            self._refused.pop(service.service_id, None)
            self._refused_4xx.discard(service.service_id)
            return True
        except Interrupted:
            raise
        except ConsulError as err:
            why = said(str(err))
            status = getattr(err, "status", None)
            if isinstance(status, int) and 400 <= status < 500 and not worth_retrying(err):
                # Consul refuses what the labels hold; not 408/429, the agent asking anyone on this
                # address to slow down (a review, /tmp/rev20: that damped legitimate containers).
                self._refused_4xx.add(service.service_id)
            else:
                self._refused_4xx.discard(service.service_id)
                # No answer, or the agent failing: Consul may have taken it before the answer was
                # lost; the stop event withdraws it then (a review, /tmp/rev22: it stayed a ghost,
                # served at a dead address until the periodic sync).
                self._ours.setdefault(service.container_id[:12], set()).add(service.service_id)
            again = quiet and self._refused.get(service.service_id) == why
            self._refused[service.service_id] = why
            log.log(
                logging.DEBUG if again else logging.WARNING,
                "container %s: service %s not registered: %s",
                service.container_id[:12],
                service.name,
                why,
            )
            return False

    def handle(self, event: Mapping[str, Any]) -> None:
        """Act on one Docker event; a failure is logged with the container and ends nothing else."""
        actor = event.get("Actor")
        action = str(event.get("status") or event.get("Action") or "")
        container_id = str(event.get("id") or (actor.get("ID") if isinstance(actor, Mapping) else "") or "")
        if not CONTAINER_ID.fullmatch(container_id):
            return
        attributes = actor.get("Attributes") if isinstance(actor, Mapping) else None
        if isinstance(attributes, Mapping) and "consul.service" not in attributes:
            # Docker puts a container's labels in its events' attributes: one without the label
            # was never registered (labels cannot change), so its events cost Consul nothing.
            return
        if action.startswith("health_status"):
            action = "start" if action.endswith("healthy") and not action.endswith("unhealthy") else "die"
        try:
            if action in START_EVENTS:
                self._on_start(container_id)
            elif action in STOP_EVENTS:
                self._on_stop(container_id)
        except Interrupted:
            raise
        except (ConsulError, docker.errors.APIError) as err:
            log.warning("container %s: %s event not handled: %s", container_id[:12], action, said(str(err)))

    def _on_start(self, container_id: str) -> None:
        if self._flapping(container_id[:12]) or container_id in self._refused_labels:
            return  # the periodic sync registers it if it still serves then; a refused one: never
        try:
            container = self._docker.containers.get(container_id)
        except docker.errors.NotFound:
            return
        if not _serving(container.attrs):
            return  # an unpause (or a late start) of a container now unhealthy: not until it is healthy
        service = self._read(container_id, container.attrs)
        if service is not None and not self._register(service) and self._refused_by_consul(service):
            # counted as a withdrawal: an attacker's review flapped the health of a container whose
            # labels Consul refuses (a meta value of 512 characters but 1,024 bytes): 150 requests
            # and 150 warnings in 300 events, where a registered one was damped after 3. Only what
            # Consul refuses (4xx): an agent down or failing is no fault of the container's.
            self._withdrawn(container_id[:12])

    def _on_stop(self, container_id: str) -> None:
        """Withdraw the container's registrations that we know of (`_ours`): no request at all for
        one that has none, so a flapping or busy host's stop events cost Consul only the withdrawals.
        One registered behind our back is withdrawn by the periodic sync, as a ghost."""
        container = container_id[:12]
        ours, taken = sorted(self._ours.pop(container, ())), False
        for done, sid in enumerate(ours):
            try:
                withdrawn = self._registrar.deregister(sid)
            except BaseException:
                self._ours.setdefault(container, set()).update(ours[done:])
                raise
            taken |= withdrawn
            if not withdrawn:  # the next stop-like event (or the periodic sync) tries again
                self._ours.setdefault(container, set()).add(sid)
        if taken:  # counted once a stop: its die, stop and destroy events withdraw it once
            self._withdrawn(container)

    def _refused_by_consul(self, service: ContainerService) -> bool:
        """Whether Consul answered the service's last registration with a 4xx (a refusal of what it holds)."""
        return service.service_id in self._refused_4xx

    def _withdrawn(self, container: str) -> None:
        """Count a withdrawal, or a refusal, of `container`'s registration (see FLAP_DROPS)."""
        now = time.monotonic()
        if len(self._drops) > 4096:  # containers gone long ago: a host's churn never grows it for good
            self._drops = {cid: times for cid, times in self._drops.items() if now - times[-1] < FLAP_WINDOW_S}
            self._damped &= self._drops.keys()
        self._drops[container] = [*self._recent(container, now), now][-FLAP_DROPS:]

    def _recent(self, container: str, now: float) -> list[float]:
        """`container`'s withdrawals within FLAP_WINDOW_S of `now`."""
        return [t for t in self._drops.get(container, ()) if now - t < FLAP_WINDOW_S]

    def _flapping(self, container: str) -> bool:
        """`container` was withdrawn (or refused) FLAP_DROPS times within FLAP_WINDOW_S: its start
        or healthy event does not register it (said once an episode)."""
        recent = self._recent(container, time.monotonic())
        if len(recent) < FLAP_DROPS:
            self._damped.discard(container)
            return False
        if container not in self._damped:
            self._damped.add(container)
            log.warning(
                "container %s: withdrawn or refused %d times within %.0f s (health or state flapping); until "
                "it is steady it is registered again by the periodic sync (every %.0f s), not at each recovery",
                container, len(recent), FLAP_WINDOW_S, RESYNC_S,
            )  # fmt: skip
        return True

    def run(self) -> None:
        """Sync, then follow events; on a lost Docker connection reconnect with backoff and sync
        again. Returns once `stop()` was called (a retry in progress ends at once)."""
        lost = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
        retrying = Retrying(
            retry=retry_if_exception_type(lost),
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=stop_when_event_set(self._stop),
            sleep=sleeping_on(self._stop),
            before_sleep=lambda state: log.warning(
                "Docker unreachable (%s); reconnecting", state.outcome.exception() if state.outcome else "?"
            ),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    if not self._stop.is_set():
                        self._follow()
        except Interrupted:
            log.info("stopped while Consul was not ready")
        except lost:
            if not self._stop.is_set():
                raise

    def _follow(self) -> None:
        """Sync, then read events in short windows until stopped.

        Each window is a request with `until` one second ahead, so the stream ends by itself and a
        stop takes effect within a second (closing the SDK's stream from another thread does not
        interrupt a read on a UNIX socket). Windows overlap by a second so no event is missed; an
        event seen twice is harmless, handling is idempotent.
        """
        if self._synced:
            self._resync()  # after a reconnect: one Consul refuses must not end the registrator (helper-141)
        else:
            self.sync()
            self._synced = True
        since, synced = int(time.time()), time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - synced >= RESYNC_S:
                self._resync()
                synced = time.monotonic()
            until = int(time.time()) + EVENT_WINDOW_S
            events: Iterable[Mapping[str, Any]] = self._docker.events(
                decode=True, filters={"type": "container"}, since=since, until=until
            )
            for event in events:
                if isinstance(event, Mapping):
                    self.handle(event)
            since = until - 1


def serve(registrator: DockerRegistrator, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Run `registrator` until one of `signals` arrives, then stop it (any retry ends at once).

    The handlers only record the signal and this thread acts: an Event set inside a handler can
    deadlock on the lock the interrupted code holds. `run()` goes on a worker thread; what it
    raises is raised here.
    """
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: received.append(signum)) for signum in signals}
    try:
        with futures.ThreadPoolExecutor(1, thread_name_prefix="docker-registrator") as pool:
            running = pool.submit(registrator.run)
            try:
                while not received and not running.done():
                    futures.wait([running], timeout=POLL_S)
            finally:
                registrator.stop()
            running.result()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
