"""The typed boundary: each catalog value checked once, for the context it will be written into.

Everything Consul answers is untrusted: whoever can register a service writes it. A value that
reaches an HAProxy config word or a Runtime API argument is checked here, where the answer is taken
in, against HAProxy's own grammar for that word, never "cleaned":
- an address is an IPv4 address, an IPv6 address without a zone id, or a host name (RFC 1123
  labels); the server endpoint is written `v4:port`, `[v6]:port` or `host:port`;
- a port is an integer 1-65535; a weight (meta `weight`) 0-256 in ASCII digits;
- a URL path (meta `health_path`) uses an explicit character set: no quote, backslash, `#`, `$`,
  `;` or whitespace, which HAProxy's config parser or its CLI would interpret;
- a name made into an HAProxy identifier (`hap_name`) keeps only `[A-Za-z0-9._:-]`; a name that
  had to change, or one the template reserves, gets a short stable suffix derived from the whole
  original, so two names never become one (a collision left after that is refused by whoever
  lists the names: see `unique_names`).
A check returns the reason a value fails (a sentence naming the value), or None; the instance
that carries it is left out and reported, never the whole file.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

# RFC 1123 labels, the last one holding a letter: `127.1`, `0` or `2130706433` would be read as
# IPv4 addresses by the resolver, unchecked.
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_PATH = re.compile(r"/[A-Za-z0-9._~!&()*+,=:@%/-]{0,1023}")
_DIGITS = re.compile(r"[0-9]{1,10}")
IDENTIFIER = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A name kept as it is also starts with a letter, a digit or `_`: the default template writes it
# as an ACL pattern too, where a leading `-` would be read as an option.
_KEPT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]*")
_NOT_IDENTIFIER = re.compile(r"[^A-Za-z0-9._:-]")
_SUFFIXED = re.compile(r".*_[0-9a-fA-F]{8}")  # any case: names are compared without it
_NAME_KEEP = 96  # characters of the original kept before the suffix
MAX_WEIGHT = 256


def _shown(value: object, limit: int = 60) -> str:
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "…'"


def address_problem(address: str) -> str | None:
    """Why `address` cannot be a server address, or None (IPv4, IPv6 without zone, host name). A
    text longer than any address is refused before the cache: a registrant's 100 KB values would
    otherwise each stay in it (up to 65,536 of them)."""
    if len(address) > MAX_ADDRESS:
        return f"{_shown(address[:40])}… ({len(address)} characters) is longer than any address ({MAX_ADDRESS})"
    return _address_problem(address)


MAX_ADDRESS = 253  # a host name's limit; an IPv6 address with a zone id is far shorter


@functools.lru_cache(maxsize=65536)
def _address_problem(address: str) -> str | None:
    if not address:
        return "no address (neither the service nor its node has one)"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if not _HOSTNAME.fullmatch(address):
            return f"{_shown(address)} is not an IPv4 or IPv6 address or a host name"
        if _numeric_ipv4(address):
            # `0x7f000001`, `127.0.0.0x1`: no host name, though a label holds a letter; the
            # resolver reads them as an address (here, loopback) that the address policy never saw.
            return f"{_shown(address)} is an IPv4 address in a numeric form other than dotted decimal"
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return f"{_shown(address)} carries an IPv6 zone id, which HAProxy cannot take from the catalog"
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if ip.is_unspecified or (mapped is not None and mapped.is_unspecified):
        # HAProxy reads 0.0.0.0 as "the address the client connected to": itself, in a loop.
        return f"{_shown(address)} is an unspecified address (HAProxy would connect back to itself)"
    return None


def _numeric_ipv4(address: str) -> bool:
    """Whether the C library reads `address` as an IPv4 address (inet_aton: hex, octal and fewer
    than four parts, `0x7f000001`, `127.1`), as HAProxy's resolver does before any DNS. Only for a
    text the host-name grammar took: inet_aton also reads `10.0.0.9 backup`, ignoring the rest."""
    try:
        socket.inet_aton(address)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return False
    return True


class Reach(Enum):
    """Where a server address leads, as the address policy judges it (see `address_reach`)."""

    PUBLIC = "public"  # a global unicast address
    PRIVATE = "private"  # RFC 1918, unique-local, documentation, shared: other hosts, not global
    LOCAL = "local"  # the load balancer host itself or its link: loopback, unspecified, link-local
    # (cloud metadata at 169.254.169.254), multicast, reserved, the cloud host services outside
    # link-local (`_CLOUD_HOST_SERVICES`); and the names `localhost`, `*.localhost`
    NAME = "name"  # a host name: HAProxy resolves it at every start and reload


# Cloud services reached from every instance that sit outside link-local: AWS's metadata over IPv6
# (fd00:ec2::254), Alibaba Cloud's metadata (100.100.100.200), Azure's host endpoint (WireServer,
# 168.63.129.16). 169.254.169.254 (AWS, GCP, Azure, Oracle, OpenStack) is link-local already.
_CLOUD_HOST_SERVICES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "168.63.129.16"))


def _ip_reach(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Reach:
    local = ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast or ip.is_reserved
    if local or ip in _CLOUD_HOST_SERVICES:
        return Reach.LOCAL
    return Reach.PUBLIC if ip.is_global else Reach.PRIVATE


@functools.lru_cache(maxsize=65536)
def address_reach(address: str) -> Reach:
    """Where `address` leads: an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`) is judged by its
    IPv4 address, which is where HAProxy connects. Anything not an IP literal is a NAME (its
    syntax is `address_problem`'s to check), but for `localhost` and `*.localhost` (RFC 6761),
    which always resolve to the host itself."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        name = address.lower().rstrip(".")
        return Reach.LOCAL if name == "localhost" or name.endswith(".localhost") else Reach.NAME
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return _ip_reach(mapped if mapped is not None else ip)


_ALLOW_LOCAL = (
    "set allow_local_addresses = true (--allow-local-addresses true, CONSUL_RENDERER_ALLOW_LOCAL_ADDRESSES) "
    "if the web apps really run on the load balancer host"
)
_ALLOW_NAMES = (
    "register an IP address, or set allow_host_names = true (--allow-host-names true, "
    "CONSUL_RENDERER_ALLOW_HOST_NAMES) to accept names and the DNS they depend on"
)


@dataclass(frozen=True)
class AddressPolicy:
    """Which server addresses a registration may put into haproxy.cfg. Whoever can register a
    service writes its Address: by default neither a local address (HAProxy would proxy the
    internet to the load balancer host's own services, or to the cloud metadata service) nor a
    host name (resolved at every `haproxy -c` and reload: a slow or failing DNS then holds or
    fails every update) is taken. `local` / `names` allow them, for setups that need them."""

    local: bool = False
    names: bool = False
    # The load balancer host's own interface addresses (`canonical_ip` form), local like loopback:
    # its services that listen on every address are reached through them as well.
    own: frozenset[str] = frozenset()

    def refusal(self, address: str) -> str | None:
        """None when `address` is allowed, else "'<address>' is refused: <why and how to allow it>".
        A text longer than any address is refused before the caches (see `address_problem`)."""
        if len(address) > MAX_ADDRESS:
            return address_problem(address)
        return _refusal(address, self.local, self.names, self.own)


def canonical_ip(address: str) -> str | None:
    """An IP address in one spelling (`::ffff:10.0.0.1` → `10.0.0.1`, `fd00:0::2` → `fd00::2`, a
    zone id dropped), or None for anything else."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped if mapped is not None else ip)


# The default: neither local addresses nor host names (immutable, shared).
DEFAULT_POLICY = AddressPolicy()


@functools.lru_cache(maxsize=65536)
def _refusal(address: str, local: bool, names: bool, own: frozenset[str]) -> str | None:
    reach = address_reach(address)
    if reach is Reach.LOCAL and not local:
        why = (
            "a local address (loopback, unspecified, link-local such as the cloud metadata service, multicast, "
            f"reserved, or another cloud host service), which leads to the load balancer host itself; {_ALLOW_LOCAL}"
        )
    elif not local and own and canonical_ip(address) in own:
        why = (
            "an address of the load balancer host itself (one of its network interfaces), which leads to its "
            f"own services as loopback does; {_ALLOW_LOCAL}"
        )
    elif reach is Reach.NAME and not names:
        why = (
            "a host name, which HAProxy resolves through DNS at every start and reload (a slow or failing DNS "
            f"would hold or fail every update); {_ALLOW_NAMES}"
        )
    else:
        return None
    return f"{_shown(address)} is refused: {why}"


def port_problem(port: object) -> str | None:
    """Why `port` cannot be a server port, or None."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        return f"port {_shown(port)} is not 1-65535"
    return None


def weight_problem(weight: str) -> str | None:
    """Why `weight` (meta `weight`) cannot be a server weight, or None: ASCII digits, 0-256."""
    if not _DIGITS.fullmatch(weight) or int(weight) > MAX_WEIGHT:
        return f"weight {_shown(weight)} is not 0-{MAX_WEIGHT} in ASCII digits"
    return None


def path_problem(path: str) -> str | None:
    """Why `path` cannot be written as one HAProxy word (a health check path), or None."""
    if not _PATH.fullmatch(path):
        return f"path {_shown(path)} is not '/' followed by [A-Za-z0-9._~!&()*+,=:@%/-]"
    return None


def endpoint(address: str, port: int) -> str:
    """`v4:port`, `[v6]:port` or `host:port`: the form HAProxy reads in a file and in `add server`,
    an IP address in one spelling (`2001:DB8:0::10` → `2001:db8::10`): a registrant moving its
    instance between two spellings of one address made each move a `set server addr` HAProxy
    answers "no need to change", and a reload (helper-131, /tmp/rev77: 17 reloads a minute).
    For a checked address and port only."""
    address = spelled(address)
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def spelled(address: str) -> str:
    """An IP address in one spelling (compressed, lower case; IPv4-mapped IPv6 as `::ffff:10.0.0.1`,
    still IPv6: HAProxy reads the two families apart); a host name in lower case."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address.lower()  # a host name: DNS reads `APP.example` as `app.example`
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(ip)


def hap_name(value: object, reserved: tuple[str, ...] = ()) -> str:
    """`value` as an HAProxy identifier. A name already made of [A-Za-z0-9._:-] (at most 96 of
    them, the first not `-`, `.` or `:`), not reserved and not ending like a suffix (in any case), is kept; any
    other gets the kept characters (others as `_`, a leading `_` if needed) and `_` + 8 hex digits
    of its SHA-256: `api!` → `api__2a3ce982`. Kept in a cache but for long names (a registrant's
    100 KB names would each stay in it)."""
    if len(str(value)) > _CACHED_NAME:
        return _hap_name(value, reserved)
    return _cached_hap_name(value, reserved)


_CACHED_NAME = 512


@functools.lru_cache(maxsize=65536)
def _cached_hap_name(value: object, reserved: tuple[str, ...] = ()) -> str:
    return _hap_name(value, reserved)


def _hap_name(value: object, reserved: tuple[str, ...]) -> str:
    text = str(value)
    renamed = len(text) > _NAME_KEEP or text in reserved or _SUFFIXED.fullmatch(text)
    if _KEPT.fullmatch(text) and not renamed:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    kept = _NOT_IDENTIFIER.sub("_", text[:_NAME_KEEP])
    return f"{kept if _KEPT.match(kept) else '_' + kept}_{digest}"


def server_name(node: str, instance_id: str) -> str:
    """The server name of an instance: `node_id` when that is unambiguous (the node has no `_`, so
    the first `_` splits the two) and already an identifier; else the safe characters and 8 hex of
    the pair's SHA-256, so node `rack` with id `1_api` never takes the name of `rack_1` / `api`."""
    joined = f"{node}_{instance_id}"
    if "_" not in node and _KEPT.fullmatch(joined) and len(joined) <= _NAME_KEEP and not _SUFFIXED.fullmatch(joined):
        return joined
    pair = json.dumps([node, instance_id]).encode("utf-8", "surrogatepass")
    kept = _NOT_IDENTIFIER.sub("_", joined[:_NAME_KEEP])
    return f"{kept if _KEPT.match(kept) else '_' + kept}_{hashlib.sha256(pair).hexdigest()[:8]}"


@dataclass(frozen=True)
class Holder:
    """Who had an HAProxy name: its identifier, the name it was made from, and when that name left
    the catalog (monotonic; None while it is there)."""

    identifier: str
    name: str
    gone_at: float | None = None

    def holds(self, now: float) -> bool:
        """Whether the name is still kept for it: while it is in the catalog, and NAME_HOLD_S after."""
        return self.gone_at is None or now - self.gone_at < NAME_HOLD_S


# How long an HAProxy name stays with the service that had it once that service left the catalog (a
# redeploy that deregisters every instance first): as long as a port stays held for a listener.
NAME_HOLD_S = 600.0


def unique_names(
    names: Iterable[tuple[str, str]],
    reserved: tuple[str, ...] = (),
    ident: Callable[[str], str] | None = None,
    holders: Mapping[str, Holder] | None = None,
    now: float = 0.0,
) -> tuple[dict[str, str], dict[str, str]]:
    """For (key, name) pairs: ({key: identifier} where no other pair has that identifier, compared
    without case, {key: why} for the rest). `ident` makes a name an identifier (`hap_name` with
    `reserved` by default). `holders`: {identifier in lower case: who had it}, judged at `now`.

    `hap_name` is injective but for hash collisions, which a registrant can search for; two pairs
    can carry the same name; and HAProxy routes by lower-cased names while Consul answers `api`
    with the instances of `Api` too. Of the pairs sharing an identifier without case, the one that
    had it (`holders`) keeps it, and while it is held (`Holder.holds`) no other takes it; else the
    only one, or the first whose name is already that identifier in lower case (`api`, never `Api`);
    every other is refused, so a collision never yields two proxies, two routes or two servers of
    one name, and registering `Api` cannot take `api`'s place, nor `payments` (or `PAYMENTS`)
    `Payments`'s (an attacker's review: a newcomer `payments` took the backend and the Host of a
    serving `Payments`, and `PAYMENTS` took both out; the next one: a variant took a name for good
    in the seconds a redeploy left its service out of the catalog)."""
    make = ident or (lambda name: hap_name(name, reserved))
    by_id: dict[str, list[tuple[str, str, str]]] = {}
    for key, name in names:
        made = make(name)
        by_id.setdefault(made.lower(), []).append((key, name, made))
    kept: dict[str, str] = {}
    refused: dict[str, str] = {}
    for folded, owners in by_id.items():
        held = (holders or {}).get(folded)
        first = _keeper(folded, owners, held, now)
        for key, name, made in owners:
            if key == first:
                kept[key] = made
            elif held is not None and held.identifier != made and held.gone_at is not None and first is None:
                refused[key] = (
                    f"{_shown(name)} would become the HAProxy name {made!r}, which {_shown(held.name)} had until "
                    f"{now - held.gone_at:.0f} s ago: it keeps it for {NAME_HOLD_S / 60:.0f} minutes after it "
                    "leaves the catalog (names are compared without case)"
                )
            else:
                refused[key] = (
                    f"{_shown(name)} would become the HAProxy name {made!r}, which another already has "
                    "(names are compared without case)"
                )
    return kept, refused


def _keeper(folded: str, owners: list[tuple[str, str, str]], held: Holder | None, now: float) -> str | None:
    """The key of the (key, name, identifier) owner that keeps `folded` (see `unique_names`)."""
    if held is not None:
        found = next((key for key, _, made in owners if made == held.identifier), None)
        if found is not None or held.holds(now):
            return found
    if len(owners) == 1:
        return owners[0][0]
    return next((key for key, name, _ in owners if name == folded), None)


# Per-service settings from service meta `haproxy_<key>`: each checked against HAProxy's own grammar
# for the word it becomes. A value that fails is ignored (the setting keeps its default) and
# reported; it never leaves the instance out.
SETTING_PREFIX = "haproxy_"  # Consul meta keys allow only [A-Za-z0-9_-]
# Each takes servers through the Runtime API (HAProxy 2.8 refuses `add server` in a backend whose
# algorithm is static: static-rr, or a hash without `hash-type consistent`, which the template
# renders beside `source`). A registrant's `static-rr` made every flip of one instance's health a
# reload, about one every 7 s for as long as it flipped, each cutting every long-lived connection
# of every service at the old worker's hard stop (helper-130, /tmp/rev76).
BALANCE = ("roundrobin", "leastconn", "first", "source", "random")
_TIME = re.compile(r"([0-9]{1,10})(us|ms|s|m|h|d)?")
_TIME_UNIT_MS = {"us": 0.001, "ms": 1, "": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_TIME_MS = 2**31 - 1  # HAProxy: "timer overflow … (maximum value is 2147483647 ms or ~24.8 days)"
_STATUS = re.compile(r"[1-5][0-9][0-9]")
MAX_MAXCONN = 100_000


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def problem(value: str) -> str | None:
        return None if value in choices else f"{_shown(value)} is not one of {', '.join(choices)}"

    return problem


def _balance_problem(value: str) -> str | None:
    if value == "static-rr":
        return (
            "'static-rr' takes no server through the Runtime API (each instance change would reload HAProxy): "
            f"use one of {', '.join(BALANCE)}"
        )
    return _one_of(*BALANCE)(value)


def time_problem(value: str) -> str | None:
    """An HAProxy time: ASCII digits and an optional unit (us, ms, s, m, h, d), more than 0 (0
    turns a timeout off: HAProxy warns of "various problems") and at most HAProxy's 2147483647 ms
    (more fails `haproxy -c`, measured on 2.8: `2147484s`, `25d`)."""
    match = _TIME.fullmatch(value)
    if match is None:
        return f"{_shown(value)} is not a time such as 500ms, 30s or 2m"
    if not 0 < int(match[1]) * _TIME_UNIT_MS[match[2] or ""] <= MAX_TIME_MS:
        return f"{_shown(value)} is not a time from 1us to 24d (HAProxy's most is 2147483647ms)"
    return None


def _number(low: int, high: int) -> Callable[[str], str | None]:
    def problem(value: str) -> str | None:
        if _DIGITS.fullmatch(value) and low <= int(value) <= high:
            return None
        return f"{_shown(value)} is not {low}-{high} in ASCII digits"

    return problem


SETTINGS: dict[str, Callable[[str], str | None]] = {
    "mode": _one_of("http", "tcp"),
    "port": _number(1, 65535),  # the port a TCP service is published on
    "balance": _balance_problem,
    "timeout_server": time_problem,
    "timeout_connect": time_problem,
    "check_path": path_problem,
    "check_status": lambda v: None if _STATUS.fullmatch(v) else f"{_shown(v)} is not an HTTP status 100-599",
    "sticky": _one_of("true", "false"),
    "slowstart": time_problem,
    "maxconn": _number(1, MAX_MAXCONN),
}


def setting_problem(key: str, value: str) -> str | None:
    """Why meta `haproxy_<key>` = value cannot be used, or None."""
    check = SETTINGS.get(key)
    if check is None:
        return f"haproxy_{_shown(key)[1:-1]} is not a setting (known: {', '.join(sorted(SETTINGS))})"
    return check(value)
