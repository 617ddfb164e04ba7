"""A port another program held is not taken by a catalog listener the moment it is seen free.

The bind pre-check (`haproxy.control.check_new_binds`) leaves out a TCP listener whose port
another process holds, and the quarantine tries it again every 5 minutes. A try that fell in that
program's restart bound the port, and the program could not start again: an attacker's review
did it end to end to a Consul agent (then its ports were reserved), and any other daemon of the
load balancer's host whose port lies within `tcp_ports` stayed open to it; twelve registrations 5 s
apart caught a 6 s restart (each new section is probed at once).

So each destination remembers the ports it saw held by another process (`BusyPorts`), and a
listener section (a catalog service's) may bind one only after it was seen free at two probes at
least FREE_FOR_S apart with no sighting of it held in between: a restart (seconds) is never that
long, the quarantine's next try (RECHECK_S) comes after it. A frontend's bind (the template's
own) is judged as before: it cannot be left out, and holding it back would reject the whole file.
The memory is kept beside the output (`.NAME.busy-ports.json`, wall-clock times), so a restart of
the renderer, say the host's reboot with HAProxy up before the daemon, does not forget it.
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

from renderer.deliver.write import live_bytes, write_atomically
from renderer.errors import WriteError
from renderer.haproxy.control import IN_USE

log = logging.getLogger(__name__)

FREE_FOR_S = 240.0  # seen free this long (two probes apart) before a listener may take the port
FORGET_S = 30 * 86400.0  # a port not seen held for this long is forgotten (its program is gone)
_KEPT_AGAIN_S = 3600.0  # a sighting that only moves `held_at` is kept to disk at most this often


@dataclass
class _Seen:
    held_at: float  # (wall clock) the last probe that found it held by another process
    free_since: float | None = None  # (wall clock) the first probe since then that found it free


@dataclass
class BusyPorts:
    """The ports one destination's probes found held by another process (see the module's text)."""

    seen: dict[int, _Seen] = field(default_factory=dict)
    kept_at: Path | None = None
    clock: Callable[[], float] = time.time
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _kept: dict[int, tuple[int, float | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_destination(cls, destination: Path, clock: Callable[[], float] = time.time) -> BusyPorts:
        kept_at = destination.with_name(f".{destination.name}.busy-ports.json")
        found = cls(seen=_read(kept_at, clock()), kept_at=kept_at, clock=clock)
        found._kept = found._snapshot()
        return found

    def judge(self, kind: str, port: int, in_use: bool) -> str | None:
        """Why a `kind` section ("listen", "frontend") may not bind `port` now (None: it may);
        `in_use`: the probe found it held by another process. Called from the check's thread."""
        with self._lock:
            why = self._judge(kind, port, in_use, self.clock())
            self._keep()
        return why

    def _judge(self, kind: str, port: int, in_use: bool, now: float) -> str | None:
        entry = self.seen.get(port)
        if in_use:
            if entry is None or entry.free_since is not None or now - entry.held_at >= _KEPT_AGAIN_S:
                self.seen[port] = _Seen(now)
            else:
                entry.held_at = now  # in memory; kept to disk when it moved an hour (`_snapshot`)
            return IN_USE
        if entry is None or kind != "listen":
            return None
        if entry.free_since is None or entry.free_since > now:  # first seen free (or the clock stepped back)
            entry.free_since = now
        free = now - entry.free_since
        if free >= FREE_FOR_S:
            del self.seen[port]
            log.info("port %d, held by another process until %.0f s ago, is free now: a listener may bind it",
                     port, now - entry.held_at)  # fmt: skip
            return None
        return (
            f"was held by another process {_ago(now - entry.held_at)} and has been seen free for {free:.0f} s "
            f"only; a catalog service takes a port another program held once it has stayed free for "
            f"{FREE_FOR_S:.0f} s (a program restarting must find its port free): give this service another "
            "port (meta haproxy_port), or wait for the next try"
        )

    def _snapshot(self) -> dict[int, tuple[int, float | None]]:
        return {port: (int(e.held_at // _KEPT_AGAIN_S), e.free_since) for port, e in self.seen.items()}

    def _keep(self) -> None:
        """Keep the memory beside the output when it changed (not for each sighting of a held port)."""
        if self.kept_at is None:
            return
        snapshot = self._snapshot()
        if snapshot == self._kept:
            return
        kept = {str(port): [round(e.held_at, 3), e.free_since] for port, e in sorted(self.seen.items())}
        try:
            if kept:
                write_atomically(self.kept_at, json.dumps(kept))
            else:
                self.kept_at.unlink(missing_ok=True)
        except (WriteError, OSError) as err:
            log.warning("busy ports not kept at %s (a restart forgets them): %s", self.kept_at, err)
            return
        self._kept = snapshot


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _read(path: Path, now: float) -> dict[int, _Seen]:
    """What a previous run kept at `path`, checked (anyone who can write there could have edited
    it): ports 1-65535, finite times not in the future, sightings younger than FORGET_S."""
    try:
        raw = live_bytes(path)
        kept = json.loads(raw) if raw is not None else {}
    except (WriteError, ValueError, RecursionError) as err:
        log.warning("busy ports at %s not read (%s); starting with none", path, err)
        return {}
    seen: dict[int, _Seen] = {}
    for port, entry in kept.items() if isinstance(kept, dict) else ():
        if not (isinstance(port, str) and port.isascii() and port.isdigit() and len(port) <= 5):
            continue
        if not (0 < int(port) < 65536 and isinstance(entry, list) and len(entry) == 2):
            continue
        held_at, free_since = (_time(value, now) for value in entry)
        if held_at is not None and now - held_at < FORGET_S:
            seen[int(port)] = _Seen(held_at, free_since)
    return seen


def _time(value: object, now: float) -> float | None:
    """A kept wall-clock time, or None when it is not one (or lies in the future: a clock stepped
    back, or an edit that would shorten a wait)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        found = float(value)
    except OverflowError:
        return None
    return found if math.isfinite(found) and 0 <= found <= now else None
