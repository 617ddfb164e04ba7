"""One registrant's storms, and what they cost everyone else, end to end (`make bench`'s hostile part).

Whoever may register (Consul without ACLs: anyone who reaches the agent) can ask the renderer for a
reload again and again. The renderer holds a flapping service at that service (its settings and its
departures: renderer/render/flaps.py), counts every service's reloads (past a burst, a storm: the
changes wait for turns of 30 s), keeps settings most registrations do not carry out of a storm, and
paces HAProxy's reloads (`ReloadPace`). This part makes the attacks those answer, all at once, on a
real Consul agent, HAProxy and renderer:

- `evil` toggles its own `lb` tag every 100 ms (one service flapping in the listing);
- SETTINGS_NAMES names, each with three registrations of which two turn critical, flip the passing
  one's `haproxy_balance` every 15 s between `first` (a value most registrations do not carry) and
  the agreed `leastconn`, each name at its own offset (settings flapping, and an attacker's value on
  a service others own);
- LISTING_NAMES names toggle their `lb` tag in turn, one every 1.2 s (a storm no one name's hold stops);

while the steady service `web` (three instances) carries constant load. Measured: `web`'s failed
requests; the reloads in each minute and HAProxy's reload gap (the renderer's /status, each second);
the most names serving the attacker's `first` at once (haproxy.cfg, every 2 s); then, the storms
still running, a server added to `web` (a cold change, through the Runtime API) and BRAND_NEW
brand-new services (each a new backend: a reload), each timed from its registration call returning
to its first answer through HAProxy.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.churn import PROBE_GAP_S
from bench.convergence import consul_put, start_backend
from bench.load import Probe, constant_load
from bench.timing import first_response
from lab.processes import ConsulPorts, ManagedProcess, get_json, start_consul_dev, wait_until
from lab.stack import LocalStack, start_local_stack

STORM_S = 180.0  # the storms run this long before the timed changes; the first minute is the storm's start
SETTINGS_NAMES = 20
LISTING_NAMES = 50
BRAND_NEW = 3
TAG_FLIP_S = 0.1  # `evil`'s lb tag
SETTINGS_FLIP_S = 15.0  # each settings name's `first` / `leastconn` period half
LISTING_TOGGLE_S = 1.2  # one listing name toggled this often
SEEN_WITHIN_S = 30.0  # a timed change not answered by then counts as not seen (None)
DEAD_CHECK = {"HTTP": "http://127.0.0.1:1/health", "Interval": "10s", "Timeout": "1s"}  # critical for good


@dataclass
class HostileResult:
    """What the storms cost the others. Times in ms from the registration call returning to the first
    answer through HAProxy (None: not seen within SEEN_WITHIN_S)."""

    storm_s: float
    settings_names: int
    listing_names: int
    attacker_registrations: int  # register calls the attacker made until the timed changes ended
    reloads_per_minute: list[int]  # the storm's whole minutes, the first included
    reload_gap_max_s: float | None  # HAProxy's reload gap, the largest /status gave during the storm
    reload_gap_steady_max_s: float | None  # … after the storm's first minute
    unbacked_served_max: int | None  # the most settings names serving the attacker's `first` at once
    unbacked_samples: int
    spare_added_ms: float | None  # a server added to the steady `web`
    brand_new_ms: list[float | None] = field(default_factory=list)
    load_tool: str = ""
    load_requests: int = 0
    failed_requests: int | None = None  # `web`'s, under constant load from the storms' start to the end


@dataclass
class Samples:
    """The sampler's readings: (seconds into the storm, reloads so far, reload gap) and the unbacked counts."""

    status: list[tuple[float, int, float]] = field(default_factory=list)
    unbacked: list[int] = field(default_factory=list)


def register(http_port: int, name: str, port: int, sid: str | None = None, **extra: object) -> None:
    body = {"Name": name, "ID": sid or name, "Address": "127.0.0.1", "Port": port, "Tags": ["lb"], **extra}
    consul_put(http_port, "/v1/agent/service/register", body)


def settings_name(i: int) -> str:
    return f"st{i:02d}"


def listing_name(i: int) -> str:
    return f"ls{i:02d}"


def register_settings_names(http_port: int, app_port: int, critical: bool) -> None:
    """Each settings name: `-0` at the attacker's app, `-1` and `-2` nowhere (critical when asked)."""
    for i in range(SETTINGS_NAMES):
        name, meta = settings_name(i), {"haproxy_balance": "leastconn"}
        register(http_port, name, app_port, f"{name}-0", Meta=meta)
        for r in (1, 2):
            check = {"Check": DEAD_CHECK} if critical else {}
            register(http_port, name, 41000 + 3 * i + r, f"{name}-{r}", Meta=meta, **check)


def passing(http_port: int, name: str) -> int:
    answer = get_json(f"http://127.0.0.1:{http_port}/v1/health/service/{name}?passing")
    return len(answer) if isinstance(answer, list) else -1


class Attacker:
    """The three storms, each on a thread of its own, until `stop`. Each storm makes its register
    calls and says how many it made and how long to pause."""

    def __init__(self, http_port: int, app_port: int) -> None:
        self.http_port, self.app_port = http_port, app_port
        self.calls = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        storms = (self._flip_tag, self._flip_settings, self._toggle_listing)
        self._threads = [threading.Thread(target=self._loop, args=(s,), daemon=True) for s in storms]

    def _flip_tag(self, k: int) -> tuple[int, float]:
        register(self.http_port, "evil", self.app_port, Tags=["lb"] if k % 2 else [])
        return 1, TAG_FLIP_S

    def _flip_settings(self, k: int) -> tuple[int, float]:
        now = time.monotonic()
        for i in range(SETTINGS_NAMES):
            first = int((now + 1.5 * i) // SETTINGS_FLIP_S) % 2 == 0
            meta = {"haproxy_balance": "first" if first else "leastconn"}
            register(self.http_port, settings_name(i), self.app_port, f"{settings_name(i)}-0", Meta=meta)
        return SETTINGS_NAMES, 0.5

    def _toggle_listing(self, k: int) -> tuple[int, float]:
        name, listed = listing_name(k % LISTING_NAMES), (k // LISTING_NAMES) % 2 == 1
        register(self.http_port, name, self.app_port, Tags=["lb"] if listed else [])
        return 1, LISTING_TOGGLE_S

    def _loop(self, storm: Callable[[int], tuple[int, float]]) -> None:
        k = 0
        while not self._stop.is_set():
            try:
                made, pause = storm(k)
            except OSError:  # the agent busy for a moment: the storm goes on
                made, pause = 0, 0.1
                with self._lock:
                    self.errors += 1
            with self._lock:
                self.calls += made
            k += 1
            self._stop.wait(pause)

    def start(self) -> Attacker:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def sample(stack: LocalStack, started: float, samples: Samples, stop: threading.Event) -> None:
    """At once and then each second, /status (reloads, gap); every other time the settings names
    serving the attacker's `first`."""
    first = re.compile(r"^backend st\d\d\n    balance first$", re.M)
    k = 0
    while True:
        status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
        if isinstance(status, dict):
            reloads = int(status.get("applies", {}).get("reload", 0))
            samples.status.append((time.monotonic() - started, reloads, float(status.get("reload_gap_s", 0.0))))
        if k % 2 == 0:
            samples.unbacked.append(len(first.findall(stack.config_path.read_text())))
        k += 1
        if stop.wait(1.0):
            return


def per_minute(status: list[tuple[float, int, float]], storm_s: float) -> list[int]:
    """Reloads in each whole minute of the storm, from the samples: the last reading at or before
    each minute's end against the one at the minute's start (the first: at the storm's start). A
    minute with no reading within 2 s of its end is not whole, and ends the list."""
    counts, base = [], status[0][1] if status else 0
    for minute in range(1, int(storm_s // 60) + 1):
        end = minute * 60
        upto = [r for t, r, _ in status if t <= end]
        if not upto or not any(end - 2 <= t <= end for t, _, _ in status):
            break
        counts.append(upto[-1] - base)
        base = upto[-1]
    return counts


def time_answer(stack: LocalStack, service: str, instance: str, change: Callable[[], None]) -> float | None:
    """ms from `change` (a registration call) returning to `instance`'s first answer through HAProxy
    at `/service/`, timed by the bench's probe (bench/timing.py); None past SEEN_WITHIN_S."""
    probe = Probe("127.0.0.1", stack.http_port, path=f"/{service}/", gap_s=PROBE_GAP_S).start()
    try:
        change()
        seconds = first_response(probe, instance, time.monotonic(), SEEN_WITHIN_S)
    finally:
        probe.stop()
    return None if seconds is None else round(seconds * 1000, 1)


def timed_changes(stack: LocalStack, http_port: int, apps: dict[str, int]) -> tuple[float | None, list[float | None]]:
    """A server added to `web`, then the brand-new services one by one."""
    spare = time_answer(stack, "web", "web-spare", lambda: register(http_port, "web", apps["web-spare"], "web-spare"))
    brand_new: list[float | None] = []
    for name in (f"nw{k}" for k in range(BRAND_NEW)):
        brand_new.append(time_answer(stack, name, name, functools.partial(register, http_port, name, apps[name])))
        time.sleep(2)
    return spare, brand_new


def prepare(
    workdir: Path, consul_bin: str, haproxy_bin: str, started: list[ManagedProcess]
) -> tuple[int, dict[str, int], LocalStack]:
    """The agent, the web apps, the registrations before the storms, and the stack serving them."""
    ports = ConsulPorts.free()
    started.append(start_consul_dev(consul_bin, workdir / "consul.log", ports))
    apps: dict[str, int] = {}
    for app in ("web-0", "web-1", "web-2", "web-spare", "evil", *(f"nw{k}" for k in range(BRAND_NEW))):
        proc, apps[app] = start_backend(workdir, app)
        started.append(proc)
    for n in range(3):
        register(ports.http, "web", apps[f"web-{n}"], f"web-{n}")
    register(ports.http, "evil", apps["evil"])
    for i in range(LISTING_NAMES):
        register(ports.http, listing_name(i), apps["evil"])
    register_settings_names(ports.http, apps["evil"], critical=False)
    stack = start_local_stack(workdir, f"127.0.0.1:{ports.http}", haproxy_bin)
    started.extend(stack.processes)
    last = f"backend {settings_name(SETTINGS_NAMES - 1)}\n    balance leastconn"
    wait_until(lambda: last in stack.config_path.read_text(), 60, "the settings names' agreed leastconn")
    register_settings_names(ports.http, apps["evil"], critical=True)  # two of three critical from now on
    names = [settings_name(i) for i in range(SETTINGS_NAMES)]
    wait_until(lambda: all(passing(ports.http, n) == 1 for n in names), 30, "two of three critical")
    return ports.http, apps, stack


def run(workdir: Path, consul_bin: str, haproxy_bin: str, storm_s: float = STORM_S) -> HostileResult:
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[ManagedProcess] = []
    try:
        http_port, apps, stack = prepare(workdir, consul_bin, haproxy_bin, started)
        load = constant_load("127.0.0.1", stack.http_port, "/web/").start()
        attacker, samples, stop = Attacker(http_port, apps["evil"]).start(), Samples(), threading.Event()
        begun = time.monotonic()
        sampler = threading.Thread(target=sample, args=(stack, begun, samples, stop), daemon=True)
        sampler.start()
        try:
            while (left := storm_s - (time.monotonic() - begun)) > 0:
                print(f"\r  hostile: storms {storm_s - left:.0f}/{storm_s:.0f} s", end="", file=sys.stderr, flush=True)
                time.sleep(min(10.0, left))
            print(file=sys.stderr)
            stop.set()
            sampler.join(10)
            spare, brand_new = timed_changes(stack, http_port, apps)
        finally:
            stop.set()
            attacker.stop()
            loaded = load.stop()
        return HostileResult(
            storm_s=storm_s,
            settings_names=SETTINGS_NAMES,
            listing_names=LISTING_NAMES,
            attacker_registrations=attacker.calls,
            reloads_per_minute=per_minute(samples.status, storm_s),
            reload_gap_max_s=max((g for _, _, g in samples.status), default=None),
            reload_gap_steady_max_s=max((g for t, _, g in samples.status if t > 60), default=None),
            unbacked_served_max=max(samples.unbacked, default=None),
            unbacked_samples=len(samples.unbacked),
            spare_added_ms=spare,
            brand_new_ms=brand_new,
            load_tool=loaded.tool,
            load_requests=loaded.requests,
            failed_requests=loaded.failed,
        )
    finally:
        for proc in reversed(started):
            proc.stop()


def table(r: HostileResult) -> str:
    """The hostile part in a few lines."""
    shown = ", ".join("-" if ms is None else f"{ms:g}" for ms in r.brand_new_ms) or "-"
    return "\n".join(
        [
            f"hostile: {r.storm_s:g} s of storms ({r.attacker_registrations} registrations: `evil`'s tag, "
            f"{r.settings_names} names' settings, {r.listing_names} names' listing)",
            f"  reloads per minute {r.reloads_per_minute}; reload gap at most {r.reload_gap_max_s} s, "
            f"{r.reload_gap_steady_max_s} s past the first minute",
            f"  names serving the attacker's value: at most {r.unbacked_served_max} ({r.unbacked_samples} samples)",
            f"  server added to web: {r.spare_added_ms} ms; brand-new services: {shown} ms",
            f"  web under load ({r.load_tool}): {r.load_requests} requests, {r.failed_requests} failed",
        ]
    )
