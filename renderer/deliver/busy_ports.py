"""A catalog listener never takes a port another program on this host has listened on.

The bind pre-check (`haproxy.control.check_new_binds`) leaves out a TCP listener whose port
another process holds, and the quarantine tries it again every 5 minutes. A try that fell in that
program's restart bound the port, and the program could not start again: an attacker's review
did it end to end to a Consul agent (then its ports were reserved), and any other daemon of the
load balancer's host whose port lies within `tcp_ports` stayed open to it. Two versions that let a
port in once it had stayed free long enough were broken by the reviews that followed: a
registration timed by a connect probe from outside landed in the first restart the renderer ever
saw (it learnt of a port only when a registration asked for it while its program listened), and a
program in a crash loop (Kubernetes backs off up to 300 s) stays down longer than any wait.

So each destination remembers every port it has seen something listen on that is not HAProxy's
(`BusyPorts`): the host's listening sockets (/proc/net/tcp and tcp6, state 0A) are read at every
check of new bind lines and every SCAN_S in a thread; a port the live file binds, or bound within
OURS_FOR_S (or, once a reload HAProxy confirmed no longer binds it, until a scan after that reload
finds it not listened on: its old workers are done with it), is HAProxy's; one a reload could not
bind (another program took it) is not. A `listen` section never binds a
remembered port; the operator hands one over by removing it from `.NAME.busy-ports.json` (beside
the output) and restarting the renderer.
A port not seen listened on for FORGET_S is forgotten. A frontend's bind is judged by the probe
alone (a frontend cannot be left out: holding it back would reject the whole file); a `listen`
section of the template's own (`listen stats`) is judged like a catalog service's: the check
cannot tell them apart. A connection's local port fails the bind probe too (refused then) but is
never remembered (it is not listening), unless the listening sockets cannot be read (not Linux):
then every port the probe finds held is.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.deliver.write import live_bytes, write_atomically
from renderer.errors import WriteError
from renderer.haproxy.config_text import bind_addresses, split_bind_address
from renderer.haproxy.control import IN_USE

log = logging.getLogger(__name__)

SCAN_S = 30.0  # how often the host's listening ports are read besides each check of new binds
OURS_FOR_S = 600.0  # a port the live file bound stays HAProxy's this long after (a reload not confirmed yet)
SCAN_AFTER_LOAD_S = 1.0  # a scan this long after each load HAProxy confirmed (its dropped ports, soon)
UNBINDABLE_S = 3600.0  # a port HAProxy could not bind for another reason than "in use" is refused this long
FORGET_S = 30 * 86400.0  # a port not seen listened on for this long is forgotten (its program is gone)
_KEPT_AGAIN_S = 3600.0  # a sighting that only moves a port's time is kept to disk at most this often
_SOCKET = re.compile(rb" *(\d+): [0-9A-Fa-f]+:([0-9A-F]{4}) [0-9A-Fa-f]+:[0-9A-F]{4} ([0-9A-F]{2}) ")
_LISTENING_FIRST = (b"0A", b"03")  # listening sockets (and, on old kernels, their pending requests)


def listening_ports(tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[int] | None:
    """The TCP ports something listens on, on any address of this host (Linux: /proc/net/tcp and
    tcp6, state 0A); None when /proc/net/tcp cannot be read. A missing tcp6 (a host booted with
    ipv6.disable=1) is an empty table: reading both at once threw the IPv4 ports away and turned
    the memory blind, silently (helper-148). The kernel lists the listening sockets before the
    connections, so each table is read up to the first connection's line: a load balancer's tables
    hold hundreds of thousands of lines (helper-148: 242 ms of the loop held for one pass at 400k).
    Only while the lines are numbered in order: gVisor lists sockets in any order (helper-149), and
    such a table is read whole."""
    found: set[int] = set()
    for table in tables:
        try:
            with open(table, "rb") as lines:
                next(lines, None)  # the header
                in_order = True  # Linux numbers its lines 0, 1, …; gVisor prints socket ids, in any order
                for number, line in enumerate(lines):
                    socket = _SOCKET.match(line)
                    if socket is None:
                        continue
                    in_order = in_order and int(socket.group(1)) == number
                    if in_order and socket.group(3) not in _LISTENING_FIRST:
                        break
                    if socket.group(3) == b"0A":
                        found.add(int(socket.group(2), 16))
        except FileNotFoundError:
            if table == tables[0]:
                return None
        except OSError:
            return None
    return found


@dataclass
class BusyPorts:
    """The ports one destination has seen another program listen on (see the module)."""

    seen: dict[int, float] = field(default_factory=dict)  # port → (wall clock) when last seen listened on
    kept_at: Path | None = None
    live_at: Path | None = None  # the file HAProxy runs: the ports it binds are HAProxy's
    also_ours: Callable[[], list[Path]] = list  # the renderer's other HAProxy outputs (their binds are HAProxy's too)
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    listening: Callable[[], set[int] | None] = listening_ports
    background: bool = True  # read the host's ports every SCAN_S in a thread (tests call `scan`)
    _ours: dict[int, float] = field(default_factory=dict, repr=False)  # port → (monotonic) HAProxy's until
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _writing: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _dirty: bool = field(default=False, repr=False)
    _kept: dict[int, float] = field(default_factory=dict, repr=False)  # `seen` as last kept to disk
    _blind: bool = field(default=False, repr=False)  # the host's listening ports could not be read
    _scanner: threading.Thread | None = field(default=None, repr=False)
    _refused: set[int] = field(default_factory=set, repr=False)  # ports a reload could not bind (`learn`)
    _unloaded: set[int] = field(default_factory=set, repr=False)  # ports a confirmed load no longer binds
    _soon: threading.Event = field(default_factory=threading.Event, repr=False)  # a load was confirmed: scan soon
    # What the last load HAProxy confirmed bound: HAProxy's with no time limit until a later confirmed load
    # drops it. A refused reload retried for over 10 minutes (a frontend's port taken) had the ports the
    # refused file dropped, which the old workers still served, learnt as another program's (helper-152's F1).
    _confirmed: set[int] = field(default_factory=set, repr=False)
    _unbindable: dict[int, tuple[float, str]] = field(default_factory=dict, repr=False)  # port → (monotonic) until, why

    @classmethod
    def for_destination(cls, destination: Path, **options: Any) -> BusyPorts:
        """The memory of `destination`, with the sightings a previous run kept beside it."""
        kept_at = destination.with_name(f".{destination.name}.busy-ports.json")
        found = cls(kept_at=kept_at, live_at=destination, **options)
        found.seen = _read(kept_at, found.clock())
        found._kept = dict(found.seen)
        return found

    def scan(self) -> None:
        """Read the host's listening ports and remember those that are not HAProxy's; keep them."""
        listening = self.listening()
        if listening is None and not self._blind:
            log.warning("the host's listening sockets cannot be read (/proc/net/tcp): only ports found held at a "
                        "check are kept from catalog listeners")  # fmt: skip
        self._blind = listening is None
        ours = self._haproxys_ports()
        if ours is None:  # HAProxy's own ports unknown: none is learnt now (they would count as another's)
            return
        now, wall = self.monotonic(), self.clock()
        with self._lock:
            ours = ours | self._confirmed  # what the last confirmed load bound: its workers may serve it for long
            self._ours.update(dict.fromkeys(ours, now + OURS_FOR_S))
            for port in self._unloaded - ours:  # a load HAProxy confirmed went through without it:
                if listening is not None and port not in listening:  # its old workers are done with it
                    self._ours[port] = now
            self._ours = {port: until for port, until in self._ours.items() if until > now}
            self._unloaded &= self._ours.keys()
            for port in (listening or set()) - self._ours.keys():
                if port not in self.seen:
                    log.info("port %d: another program listens on it; no catalog service will be given it", port)
                if wall - self._kept.get(port, -math.inf) >= _KEPT_AGAIN_S:
                    self._dirty = True
                self.seen[port] = wall
            for port in [port for port, when in self.seen.items() if wall - when >= FORGET_S]:
                del self.seen[port]
                self._dirty = True
        self.keep()

    def _haproxys_ports(self) -> set[int] | None:
        """The ports the live files bind, this destination's and the other HAProxy destinations' of
        the renderer (helper-148: a TCP service moved from one to another on its port was refused
        there as another program's, for 30 days); None when this destination's is missing or cannot
        be read (another's that is counts as binding nothing: a template that never rendered must not
        stop the learning)."""
        ours: set[int] = set()
        for path in ([self.live_at] if self.live_at is not None else []) + list(self.also_ours()):
            try:
                live = _live_text(path)
            except WriteError:
                live = None
            if live is None and path == self.live_at:
                return None
            ours |= _bound_by(live)
        with self._lock:
            return ours - self._refused

    def learn(self, port: int) -> bool:
        """HAProxy's reload found `port` in use: another program took it after the bind pre-check's
        probe (a restart, timed or not). Remembered now, and no longer HAProxy's although the live
        file binds it: the failed file counted as HAProxy's had kept that program from being learnt
        (helper-148's F3). Only when something listens on it (or the host's sockets cannot be read):
        a connection's local port fails HAProxy's bind too, and is no program's (helper-150's F3).
        True when remembered."""
        listening = self.listening()
        if listening is not None and port not in listening:
            return False
        with self._lock:
            if port not in self.seen:
                log.info("port %d: another program took it before HAProxy could; no catalog service will be given it",
                         port)  # fmt: skip
            self.seen[port], self._dirty = self.clock(), True
            self._ours.pop(port, None)
            self._refused.add(port)
        self.keep()
        return True

    def unbindable(self, port: int, reason: str) -> None:
        """HAProxy's reload could not bind `port` for another reason than "in use" (a privileged port,
        HAProxy not root; an address not on this host): the probe cannot tell, so each try was a
        failed reload (HAProxy 2.8 stops accepting for ~2 s in one). Refused for UNBINDABLE_S."""
        with self._lock:
            self._unbindable[port] = (self.monotonic() + UNBINDABLE_S, reason)

    def loaded(self, confirmed: bool) -> None:
        """HAProxy loaded its files (a reload, a start): the ports they bind are its own again;
        `confirmed` (its master said a new worker runs, or it started on them): a port they no
        longer bind stops being HAProxy's once a scan after it finds the port not listened on (the
        scanner runs SCAN_AFTER_LOAD_S after), not OURS_FOR_S after it left the file. A port an
        attacker's section held counted as HAProxy's for 10 minutes, so a program starting on it
        then and restarting within them was not learnt (helper-148's F3). An old worker stops
        listening when `reload` answers (2.8.25, measured), unless the global `grace` keeps it
        listening that long: a fixed 10 s learnt a redeployed TCP service's own port (helper-151's A)."""
        with self._lock:
            self._refused.clear()
        bound = self._haproxys_ports() if confirmed else None  # what the load bound (None: not known)
        if bound is None:
            return
        with self._lock:
            self._confirmed = bound
            self._ours.update(dict.fromkeys(bound, self.monotonic() + OURS_FOR_S))
            self._unloaded = self._ours.keys() - bound
        self._soon.set()

    def judge(self, kind: str, host: str, port: int, in_use: bool) -> str | None:
        """Why a `kind` section ("listen", "frontend") may not bind `host`:`port` now (None: it may);
        `in_use`: the check's probe found it held."""
        with self._lock:
            blind = in_use and self._blind and port not in self.seen
        ours = self._haproxys_ports() if blind else None
        with self._lock:  # and those it bound lately (an old worker: helper-152's F2)
            held = ours is not None and port not in ours and port not in self._ours and port not in self._confirmed
            if held:  # no /proc: every sighting counts, but HAProxy's own ports (unknown while its file is: helper-149)
                self.seen[port], self._dirty = self.clock(), True
        with self._lock:
            when = self.seen.get(port)
            until, reason = self._unbindable.get(port, (-math.inf, ""))
        if in_use:
            return IN_USE
        if kind == "listen" and until > self.monotonic():
            return (
                f"could not be bound by HAProxy at a reload ({reason}): give this service another port (meta "
                f"haproxy_port); it is tried again in {max(1, round((until - self.monotonic()) / 60))} min"
            )
        if kind == "listen" and when is not None:
            return (
                f"is a port another program on this host listened on (last seen {_ago(self.clock() - when)}); a "
                "catalog service never takes one, or that program could not start again: give this service "
                "another port (meta haproxy_port), or, if the program is gone for good, remove "
                f'"{port}" from {self.kept_at.name if self.kept_at else "the busy-ports file"} and restart the renderer'
            )
        return None

    def start(self) -> None:
        """Read the host's ports now and every SCAN_S, in a thread (once; not in tests' memories).
        From the renderer's start, not its first check of new bind lines: a renderer whose file
        never changes its binds read none, and a registration landing in a restart took the port."""
        if not self.background:
            return
        with self._lock:
            if self._scanner is not None:
                return
            self._scanner = threading.Thread(target=self._scan_for_ever, name="busy-ports scan", daemon=True)
        self._scanner.start()

    def _scan_for_ever(self) -> None:
        while True:
            try:
                self.scan()
            except Exception:  # contained: the next scan tries again
                log.exception("reading the host's listening ports failed")
            if self._soon.wait(SCAN_S):  # a confirmed load: its dropped ports are read again shortly
                self._soon.clear()
                time.sleep(SCAN_AFTER_LOAD_S)

    def keep(self) -> None:
        """Keep the sightings beside the output when they changed; the check's thread and the
        scanner's take turns, so the newest sightings are the last written."""
        with self._writing:
            with self._lock:
                if self.kept_at is None or not self._dirty:
                    return
                self._dirty = False
                kept = {str(port): round(when, 3) for port, when in sorted(self.seen.items())}
                self._kept = dict(self.seen)
            try:
                if kept:
                    write_atomically(self.kept_at, json.dumps(kept))
                else:
                    self.kept_at.unlink(missing_ok=True)
            except (WriteError, OSError) as err:
                log.warning("busy ports not kept at %s (a restart forgets them): %s", self.kept_at, err)


def _live_text(path: Path) -> str | None:
    """The live file's text (None: there is none, say a first start or a file removed to render it
    again: helper-148 saw HAProxy's own ports learnt then); WriteError when it cannot be read."""
    live = live_bytes(path)
    return live.decode(errors="replace") if live is not None else None


def _bound_by(text: str | None) -> set[int]:
    """The TCP ports `text` binds: one regular-expression scan, as the quarantine reads binds (a
    whole parse took 23.5 ms of a 1,000-service file every 30 s; the scan 1.3 ms, same ports)."""
    return {port for port in map(lambda address: split_bind_address(address)[1], bind_addresses(text or ""))
            if port is not None}  # fmt: skip


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _read(path: Path, now: float) -> dict[int, float]:
    """The sightings a previous run kept at `path`, checked (anyone who can write there could have
    edited it): ports 1-65535, finite times, younger than FORGET_S; a time in the future (a clock
    that starts behind after a reboot) counts as now."""
    try:
        raw = live_bytes(path)
        kept = json.loads(raw) if raw is not None else {}
    except (WriteError, ValueError, RecursionError) as err:
        log.warning("busy ports at %s not read (%s); starting with none", path, err)
        return {}
    seen: dict[int, float] = {}
    for port, when in kept.items() if isinstance(kept, dict) else ():
        if not (isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5):
            continue
        if not 0 < int(port) < 65536 or not isinstance(when, int | float) or isinstance(when, bool):
            continue
        try:
            at = float(when)
        except OverflowError:
            continue
        if math.isfinite(at) and now - at < FORGET_S:
            seen[int(port)] = min(at, now)
    return seen
