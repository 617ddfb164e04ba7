"""The templates the loop renders, compiled, and what it remembers of each between renders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import psutil

from renderer.config import Config, TemplateSpec
from renderer.errors import ConfigError
from renderer.haproxy.checked import AddressPolicy, canonical_ip
from renderer.haproxy.control import has_prometheus_exporter
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import Dependency


@dataclass
class TemplateState:
    """What the loop remembers of one template between renders."""

    renderer: TemplateRenderer
    dependencies: Mapping[str, Dependency] = field(default_factory=dict)  # the last render's, by key
    last_error: str | None = None
    printed: str | None = None  # --dry: the content last printed
    left_out: tuple[str, ...] = ()  # instances and parts left out for an unsafe value (as last applied)
    rendered: bool = False
    recheck_at: float | None = None  # an anti-empty guard holds instances until then
    missing: tuple[str, ...] = ()  # keys the last render waited for: no render again until all have data

    @property
    def spec(self) -> TemplateSpec:
        return self.renderer.spec


def compile_templates(config: Config, builtin_vars: Mapping[str, str]) -> list[TemplateState]:
    """Compile every template; the user's vars override the built-in ones. Each serves the server
    addresses the config allows (allow_local_addresses, allow_host_names)."""
    if not config.templates:
        raise ConfigError("no template: pass --template SRC:DST or add a [[template]] table to the config file")
    variables = {**builtin_vars, **config.vars}
    secrets = [config.consul.token] if config.consul.token else []
    own = frozenset() if config.allow_local_addresses else host_addresses()
    policy = AddressPolicy(local=config.allow_local_addresses, names=config.allow_host_names, own=own)
    return [
        TemplateState(TemplateRenderer(spec, variables, secrets=secrets, policy=policy)) for spec in config.templates
    ]


def host_addresses() -> frozenset[str]:
    """This host's own interface addresses, read when the templates are compiled (at start and at
    each SIGHUP): the address policy treats them as local. Through psutil: the interface list is
    not in the standard library (and psutil reads it on Linux, the BSDs and macOS alike)."""
    found = (canonical_ip(a.address) for addrs in psutil.net_if_addrs().values() for a in addrs)
    return frozenset(ip for ip in found if ip is not None)


def builtin_variables(haproxy_bin: str | None) -> dict[str, str]:
    """Facts about the HAProxy binary that templates may use (e.g. haproxy_promex); runs `haproxy -vv`."""
    if haproxy_bin is None:
        return {}
    return {"haproxy_promex": "true" if has_prometheus_exporter(haproxy_bin) else "false"}
