"""A port another program held is not taken by a catalog listener the moment it is seen free.

The bind pre-check (`haproxy.control.check_new_binds`) leaves out a TCP listener whose port
another process holds, and the quarantine tries it again every 5 minutes. A try that fell in that
program's restart bound the port, and the program could not start again: an attacker's review
did it end to end to a Consul agent (then its ports were reserved), and any other daemon of the
load balancer's host whose port lies within `tcp_ports` stayed open to it; twelve registrations 5 s
apart caught a 6 s restart (each new section is probed at once).

So each destination remembers the ports it saw another process listen on (`BusyPorts`), and a
`listen` section may bind one only once the port has stayed free for FREE_FOR_S *without a
break*: while a section waits for it, the renderer probes the port itself every PROBE_S (a
thread; from the first time a section asks for it), and any sighting of it held, or a gap in
the probes (nothing waited, the renderer stopped), starts the wait again. A restart (seconds)
never lasts that long. The free time is judged on the monotonic clock; only the sightings are
kept beside the output
(`.NAME.busy-ports.json`, wall-clock times), so a restart of the renderer, say the host's reboot
with HAProxy up before the daemon, starts every wait again rather than forgetting the port.
(helper-146 took a port across two restarts 4 minutes apart when only the registrations' own
probes counted, and with a wall-clock step.)

A frontend's bind is judged by the probe alone (a frontend cannot be left out, and holding it back
would reject the whole file). A `listen` section of the template's own (`listen stats`) waits like
a catalog listener: the check cannot tell them apart.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.deliver.write import live_bytes, write_atomically
from renderer.errors import WriteError
from renderer.haproxy.control import IN_USE, port_in_use

log = logging.getLogger(__name__)

FREE_FOR_S = 240.0  # free this long without a break before a listener may take the port
PROBE_S = 5.0  # while a section waits for a port: how often the renderer probes it
CHAIN_GAP_S = 3 * PROBE_S  # probes further apart than this break the wait (nothing saw the port meanwhile)
WAIT_S = 360.0  # a section asked for the port this recently: it waits (the quarantine asks every 300 s)
FORGET_S = 30 * 86400.0  # a port not seen held for this long is forgotten (its program is gone)
_KEPT_AGAIN_S = 3600.0  # a sighting that only moves `held_at` is kept to disk at most this often


def _listening(port: int) -> bool:
    """Whether a socket listens on TCP `port` (Linux: /proc/net/tcp and tcp6, state 0A); True when
    that cannot be read. An outbound connection's local port fails the bind probe too, and an
    attacker's backend sees HAProxy's (helper-146): those are no daemon's, and are not remembered."""
    wanted = f":{port:04X} "
    try:
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, encoding="ascii", errors="replace") as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == "0A" and (fields[1] + " ").endswith(wanted):
                        return True
    except OSError:
        return True
    return False


@dataclass
class _Seen:
    held_at: float  # (wall clock) the last probe that found another process listening on it
    host: str = "0.0.0.0"  # the address the last section asking for it binds (probed there)
    free_since: float | None = None  # (monotonic) the start of an unbroken run of free probes
    probed_at: float = -math.inf  # (monotonic) the last probe of that run
    asked_at: float = -math.inf  # (monotonic) the last time a section asked for the port
    kept_held_at: float = -math.inf  # `held_at` as last kept to disk


@dataclass
class BusyPorts:
    """The ports one destination's probes found another process listening on (see the module)."""

    seen: dict[int, _Seen] = field(default_factory=dict)
    kept_at: Path | None = None
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    probe: Callable[[str, int], bool] = port_in_use
    listening: Callable[[int], bool] = _listening
    background: bool = True  # probe waiting ports in a thread (tests call `tick` instead)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _writing: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _dirty: bool = field(default=False, repr=False)
    _prober: threading.Thread | None = field(default=None, repr=False)

    @classmethod
    def for_destination(cls, destination: Path, **options: Any) -> BusyPorts:
        """The memory of `destination`, with the sightings a previous run kept beside it."""
        kept_at = destination.with_name(f".{destination.name}.busy-ports.json")
        found = cls(kept_at=kept_at, **options)
        found.seen = _read(kept_at, found.clock())
        return found

    def judge(self, kind: str, host: str, port: int, in_use: bool) -> str | None:
        """Why a `kind` section ("listen", "frontend") may not bind `host`:`port` now (None: it may);
        `in_use`: the check's probe found it held. Called from the check's thread; `keep` after."""
        with self._lock:
            why = self._judge(kind, host, port, in_use, self.monotonic())
            remembered = port in self.seen
        if why is not None and remembered:  # a section waits for it: probed from now on
            self._start_prober()
        return why

    def _judge(self, kind: str, host: str, port: int, in_use: bool, now: float) -> str | None:
        entry = self.seen.get(port)
        if in_use:
            if entry is not None or self.listening(port):  # an outbound connection's port is no daemon's
                entry = self._held(port, entry)
                entry.host, entry.asked_at = host, now
            return IN_USE
        if entry is None or kind != "listen":
            return None
        entry.host, entry.asked_at = host, now
        self._free(entry, now)
        assert entry.free_since is not None
        free = now - entry.free_since
        if free >= FREE_FOR_S:
            del self.seen[port]
            self._dirty = True
            log.info("port %d, held by another process until %s, has stayed free for %.0f s: a listener may "
                     "bind it", port, _ago(self.clock() - entry.held_at), free)  # fmt: skip
            return None
        return (
            f"was held by another process {_ago(self.clock() - entry.held_at)} and has stayed free for "
            f"{free:.0f} s only; a catalog service takes a port another program held once it has stayed free "
            f"for {FREE_FOR_S:.0f} s without a break (a program restarting must find its port free): give this "
            "service another port (meta haproxy_port), or wait"
        )

    def _held(self, port: int, entry: _Seen | None) -> _Seen:
        now_wall = self.clock()
        if entry is None:
            entry = self.seen[port] = _Seen(now_wall)
        entry.held_at, entry.free_since = now_wall, None
        if now_wall - entry.kept_held_at >= _KEPT_AGAIN_S:
            self._dirty = True
        return entry

    @staticmethod
    def _free(entry: _Seen, now: float) -> None:
        """A probe found the port free: the run of free probes goes on, or starts when broken."""
        if entry.free_since is None or now - entry.probed_at > CHAIN_GAP_S or now < entry.probed_at:
            entry.free_since = now
        entry.probed_at = now

    def tick(self) -> bool:
        """Probe every port a section waits for (the prober's step); whether any still waits."""
        with self._lock:
            now = self.monotonic()
            waiting = {port: e for port, e in self.seen.items() if now - e.asked_at < WAIT_S}
            for port, entry in self.seen.items():
                if port not in waiting:
                    entry.free_since = None  # nothing waits: the run of free probes ends here
        for port, entry in waiting.items():
            held = self.probe(entry.host, port)  # in use at all: not free (the port was a daemon's)
            with self._lock:
                if port in self.seen:
                    if held:
                        self._held(port, entry)
                    else:
                        self._free(entry, self.monotonic())
        self.keep()
        return bool(waiting)

    def _start_prober(self) -> None:
        if not self.background:
            return
        with self._lock:
            if self._prober is not None and self._prober.is_alive():
                return
            self._prober = threading.Thread(target=self._probe_while_waiting, name="busy-ports prober", daemon=True)
            self._prober.start()

    def _probe_while_waiting(self) -> None:
        try:
            while True:
                time.sleep(PROBE_S)
                if not self.tick():
                    return
        except Exception:  # contained: the waits then break, and start again at the next check
            log.exception("probing the ports listeners wait for failed")

    def keep(self) -> None:
        """Keep the sightings beside the output when they changed (once per check, not per port); the
        check's thread and the prober's take turns, so the newest sightings are the last written."""
        with self._writing:
            with self._lock:
                if self.kept_at is None or not self._dirty:
                    return
                self._dirty = False
                kept = {str(port): round(e.held_at, 3) for port, e in sorted(self.seen.items())}
                for entry in self.seen.values():
                    entry.kept_held_at = entry.held_at
            try:
                if kept:
                    write_atomically(self.kept_at, json.dumps(kept))
                else:
                    self.kept_at.unlink(missing_ok=True)
            except (WriteError, OSError) as err:
                log.warning("busy ports not kept at %s (a restart forgets them): %s", self.kept_at, err)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(seconds, 0):.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _read(path: Path, now: float) -> dict[int, _Seen]:
    """The sightings a previous run kept at `path`, checked (anyone who can write there could have
    edited it): ports 1-65535, finite times, younger than FORGET_S; a time in the future (a clock
    that starts behind after a reboot) counts as now. Every wait starts again."""
    try:
        raw = live_bytes(path)
        kept = json.loads(raw) if raw is not None else {}
    except (WriteError, ValueError, RecursionError) as err:
        log.warning("busy ports at %s not read (%s); starting with none", path, err)
        return {}
    seen: dict[int, _Seen] = {}
    for port, held_at in kept.items() if isinstance(kept, dict) else ():
        if not (isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5):
            continue
        if not 0 < int(port) < 65536 or not isinstance(held_at, int | float) or isinstance(held_at, bool):
            continue
        try:
            when = min(float(held_at), now)
        except OverflowError:
            continue
        if math.isfinite(when) and now - when < FORGET_S:
            seen[int(port)] = _Seen(when, kept_held_at=when)
    return seen
