"""The templates the loop renders, compiled, and what it remembers of each between renders."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import psutil

from renderer.config import Config, TemplateSpec
from renderer.errors import ConfigError
from renderer.haproxy.checked import AddressPolicy, canonical_ip
from renderer.haproxy.control import has_prometheus_exporter
from renderer.logs import LineBudget
from renderer.loop.memory import RendererMemory
from renderer.render.flaps import PresenceFlaps
from renderer.render.listing import CatalogService
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import Dependency

log = logging.getLogger(__name__)

HOST_ADDRESSES_EVERY_S = 30.0


@dataclass
class TemplateState:
    """What the loop remembers of one template between renders."""

    renderer: TemplateRenderer
    memory: RendererMemory | None = None  # where the renderer's memory is kept across a restart (not --dry)
    dependencies: Mapping[str, Dependency] = field(default_factory=dict)  # the last render's, by key
    whole_dependencies: Mapping[str, Dependency] = field(default_factory=dict)  # the last that did not fail midway
    last_error: str | None = None
    printed: str | None = None  # --dry: the content last printed
    left_out: tuple[str, ...] = ()  # instances and parts left out for an unsafe value (as last applied)
    left_out_lines: LineBudget = field(default_factory=LineBudget)  # the log lines on them
    rendered: bool = False
    recheck_at: float | None = None  # an anti-empty guard holds instances until then
    missing: tuple[str, ...] = ()  # keys the last render waited for: no render again until all have data
    # The Store's generation when the latest render began, and when the last one delivered (served,
    # or equal to what runs) began: the changes after it are those the next apply carries.
    began: int | None = None
    covered: int | None = None
    change_told: float | None = None  # when the oldest change the render being delivered carries was told of

    @property
    def spec(self) -> TemplateSpec:
        return self.renderer.spec


def compile_templates(
    config: Config, builtin_vars: Mapping[str, str], own: frozenset[str] | None = None
) -> list[TemplateState]:
    """Compile every template; the user's vars override the built-in ones. Each serves the server
    addresses the config allows (allow_local_addresses, allow_host_names); `own`: the host's own
    addresses, local to the policy (read now when not given)."""
    if not config.templates:
        raise ConfigError("no template: pass --template SRC:DST or add a [[template]] table to the config file")
    variables = {**builtin_vars, **config.vars}
    secrets = [config.consul.token] if config.consul.token else []
    if config.allow_local_addresses:
        own = frozenset()
    elif own is None:
        own = host_addresses()
    policy = AddressPolicy(local=config.allow_local_addresses, names=config.allow_host_names, own=own)
    held = live_proxy_names(config)
    presence: PresenceFlaps[CatalogService] = PresenceFlaps()  # one for all: they keep the same services
    states = [
        TemplateState(
            TemplateRenderer(
                spec,
                variables,
                secrets=secrets,
                policy=policy,
                tcp_ports=config.tcp_ports,
                reserved_ports=config.reserved_ports,
                serve_services=config.serve_services,
                presence=presence,
            ),
            memory=None if config.dry else RendererMemory.beside(spec.destination),
        )
        for spec in config.templates
    ]
    for state in states:
        if state.memory is not None:
            state.memory.restore(state.renderer)  # first: what it remembered outlives the live file's names
        state.renderer.hold_names(held)
    return states


# A proxy's name in a config HAProxy runs: what the default template writes for each service.
_PROXY_NAME = re.compile(r"^(?:backend|listen)[ \t]+(\S+)", re.MULTILINE)


def live_proxy_names(config: Config) -> list[str]:
    """The backend and listen names of each HAProxy output as it is live now (none before the first
    start): which service held each HAProxy name before this start. An attacker's review: a case
    variant (`payments` beside a serving `Payments`) refused while the renderer ran took the name
    at its next start, when no renderer remembered who had it."""
    names: list[str] = []
    for spec in config.templates:
        if not spec.haproxy:
            continue
        try:
            names += _PROXY_NAME.findall(spec.destination.read_text(errors="replace"))
        except OSError:
            continue  # none yet, or unreadable: the delivery says so when it comes to it
    return names


def host_addresses() -> frozenset[str]:
    """This host's own interface addresses (see `HostAddresses`). Through psutil: the interface
    list is not in the standard library (and psutil reads it on Linux, the BSDs and macOS alike).
    Raises OSError when the system does not answer."""
    found = (canonical_ip(a.address) for addrs in psutil.net_if_addrs().values() for a in addrs)
    return frozenset(ip for ip in found if ip is not None)


@dataclass
class HostAddresses:
    """The host's own interface addresses as the address policy knows them, read again every
    `every_s` while running: an address the host gains (a new interface, a VIP moved to it, DHCP)
    is refused as local within that time, and one it loses is served again. (An address the host
    is reached at through NAT, an elastic IP, is not on an interface: never known here.)"""

    known: frozenset[str]
    every_s: float = HOST_ADDRESSES_EVERY_S
    read: Callable[[], frozenset[str]] = host_addresses
    clock: Callable[[], float] = time.monotonic
    checked_at: float = 0.0

    @classmethod
    def start(cls, read: Callable[[], frozenset[str]] = host_addresses) -> HostAddresses:
        """The addresses now; a failed read is logged and leaves none known (loopback and the other
        local addresses are refused all the same)."""
        watch = cls(frozenset(), read=read)
        watch.known = watch._read() or frozenset()
        return watch

    def due_at(self) -> float:
        return self.checked_at + self.every_s

    def refresh(self) -> bool:
        """Read them again: True when they changed. A failed read keeps the known ones (logged)."""
        now = self._read()
        if now is None or now == self.known:
            return False
        gained, lost = sorted(now - self.known), sorted(self.known - now)
        log.info("this host's own addresses changed (now local: %s; no longer: %s)", gained or "-", lost or "-")
        self.known = now
        return True

    def _read(self) -> frozenset[str] | None:
        """The addresses now, or None when the system did not answer (logged; read again later)."""
        self.checked_at = self.clock()
        try:
            return self.read()
        except OSError as err:
            log.warning("could not read this host's interface addresses (%s); read again in %g s", err, self.every_s)
            return None

    def apply(self, templates: Iterable[TemplateState]) -> None:
        """The known addresses into each template's address policy (rendered anew with it)."""
        for state in templates:
            if not state.renderer.policy.local:
                state.renderer.set_policy(replace(state.renderer.policy, own=self.known))


def builtin_variables(haproxy_bin: str | None) -> dict[str, str]:
    """Facts about the HAProxy binary that templates may use (e.g. haproxy_promex); runs `haproxy -vv`."""
    if haproxy_bin is None:
        return {}
    return {"haproxy_promex": "true" if has_prometheus_exporter(haproxy_bin) else "false"}
