"""Helpers for integration tests: Consul registration, an HTTP load loop, the renderer as a process,
what HAProxy and the renderer hold while a test runs (sampled throughout), and the machine's pace."""

from __future__ import annotations

import collections
import hashlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import consul

from lab import CHECKOUT
from lab import servers as server_state
from lab.processes import ManagedProcess, get_json, http_get, spawn, wait_until
from lab.stack import DEFAULT_TEMPLATE, LocalStack, start_local_stack
from lab.webapp import WebApp
from renderer.commands import BACKGROUND_NICE
from renderer.haproxy.control import MasterCLI


def loopback_ports() -> tuple[str, ...]:
    """--var flags that put the default template's frontend and stats on free loopback ports."""
    from lab.processes import free_port

    return (
        "--var",
        f"http_port={free_port()}",
        "--var",
        f"stats_port={free_port()}",
        "--var",
        "bind_address=127.0.0.1",
    )


def consul_client(agent: ManagedProcess) -> consul.Consul:
    host, port = str(agent.extra["http_addr"]).split(":")
    return consul.Consul(host=host, port=int(port))


def register(
    agent: ManagedProcess,
    app: WebApp,
    name: str = "web",
    tags: tuple[str, ...] = ("lb",),
    meta: dict[str, str] | None = None,
    check: bool = True,
) -> str:
    """Register a backend with the agent, with an HTTP check on /health every second."""
    service_id = app.state.instance_id
    check_def = None
    if check:
        check_def = {"HTTP": f"http://127.0.0.1:{app.port}/health", "Interval": "1s", "Timeout": "1s"}
    consul_client(agent).agent.service.register(
        name, service_id=service_id, address="127.0.0.1", port=app.port, tags=list(tags), meta=meta, check=check_def
    )
    return service_id


@dataclass
class Load:
    """A background loop of GETs against one URL, counting answers per instance and every failure."""

    url: str
    seen: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    ok: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _mark: int = 0

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = http_get(self.url, timeout=5)
            except OSError as err:
                self.failures.append(repr(err))
                continue
            if status == 200:
                self.ok += 1
                self.seen[body.strip()] += 1
            else:
                self.failures.append(f"HTTP {status}: {body.strip()[:80]}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def reset_seen(self) -> None:
        self.seen.clear()

    def wait_for(self, instance: str, timeout: float = 20) -> None:
        self.reset_seen()
        wait_until(lambda: self.seen[instance] > 0, timeout, f"responses from {instance}")

    def wait_gone(self, instance: str, timeout: float = 20, settle: int = 50) -> None:
        """Wait until `settle` consecutive-ish answers came without `instance`."""

        def gone() -> bool:
            if self.seen[instance] > 0:
                self.reset_seen()
                return False
            return sum(self.seen.values()) >= settle

        self.reset_seen()
        wait_until(gone, timeout, f"{instance} to get no traffic")


def start_stack(
    tmp_path: Path,
    agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    template: Path = DEFAULT_TEMPLATE,
    extra: tuple[str, ...] = (),
) -> LocalStack:
    """HAProxy + the renderer (real processes, debug logs) on `agent`, every process tracked."""
    args = ("--wait", "20ms:100ms", "--log-level", "debug", *extra)
    return start_local_stack(
        tmp_path, str(agent.extra["http_addr"]), haproxy_bin, template, extra_args=args, on_start=track
    )


def wait_log(proc: ManagedProcess, text: str, timeout: float = 20) -> None:
    wait_until(lambda: text in proc.log_text(10**7), timeout, f"{text!r} in the log of {proc.name}")


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def reloads(stack: LocalStack) -> int:
    """How many reloads the stack's renderer has done (its `/status`)."""
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    return int(status["applies"].get("reload", 0))


def applies(stack: LocalStack) -> int:
    """How many changes the stack's renderer has applied, by runtime or reload (its `/status`)."""
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    return sum(int(count) for count in status["applies"].values())


def served_servers(stack: LocalStack, backend: str) -> set[str]:
    """The server names the renderer reports as applied in `backend` of the stack's config."""
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    for served in status["served"].values():
        for listed in served["listing"]:
            if listed["name"] == backend:
                return {server["name"] for server in listed["servers"]}
    return set()


def settled_reloads(stack: LocalStack, backend: str, servers: set[str], timeout: float = 20) -> int:
    """The reload count once the renderer reports `backend` applied with exactly `servers`:
    a request through HAProxy can succeed a moment before the renderer counts the reload."""
    wait_until(lambda: served_servers(stack, backend) == servers, timeout, f"{backend} applied with {sorted(servers)}")
    return reloads(stack)


def runtime_servers(stack: LocalStack, backend: str, stats_socket: Path | None = None) -> set[str]:
    """The servers HAProxy itself has in `backend` now (`show servers state`), whatever the file
    or the renderer says: through `stats_socket` when given, else the master CLI's `@1`."""
    if stats_socket is not None:
        return set(server_state.read(str(stats_socket), backend))
    answer = MasterCLI(str(stack.master_socket)).worker_command(f"show servers state {backend}")
    return set(server_state.servers_in(answer, backend))


@dataclass
class ServerStateSampler:
    """`show servers state BACKEND` read back to back from start to stop by a process of its own
    (`lab.servers`): every change of HAProxy's own server list with its time (monotonic), so a
    test can tell what HAProxy held at any moment, not only at the end."""

    stack: LocalStack
    backend: str
    stats_socket: Path | None = None
    _proc: ManagedProcess | None = None

    def start(self, track: Callable[[ManagedProcess], ManagedProcess]) -> ServerStateSampler:
        socket_path = str(self.stats_socket) if self.stats_socket is not None else str(self.stack.master_socket)
        cmd = [sys.executable, "-m", "lab.servers", socket_path, self.backend]
        cmd += [] if self.stats_socket is not None else ["--master"]
        log = self.stack.config_path.parent.parent / f"servers-{self.backend}.log"
        self._proc = track(spawn(f"servers of {self.backend}", cmd, log, cwd=CHECKOUT))
        wait_until(lambda: self.timeline, 10, f"the first sample of {self.backend}'s servers")
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()

    @property
    def _changes(self) -> list[server_state.Change]:
        return server_state.parse(self._proc.log_path) if self._proc is not None else []

    @property
    def timeline(self) -> list[tuple[float, frozenset[str]]]:
        """(when, every server HAProxy held) at each change."""
        return [(c.at, c.servers) for c in self._changes if c.servers is not None]

    @property
    def active_timeline(self) -> list[tuple[float, frozenset[str]]]:
        """(when, the servers HAProxy held out of maintenance: those that may get traffic)."""
        return [(c.at, c.servers - c.maintenance) for c in self._changes if c.servers is not None]

    @property
    def samples(self) -> int:
        changes = self._changes
        return changes[-1].samples if changes else 0

    def held(self, server: str, active: bool = False) -> list[tuple[float, float]]:
        """The spans (start, end; monotonic) during which HAProxy held `server` (`active`: out of
        maintenance); an open span ends now."""
        spans: list[tuple[float, float]] = []
        began: float | None = None
        for at, held in self.active_timeline if active else self.timeline:
            if server in held and began is None:
                began = at
            elif server not in held and began is not None:
                spans.append((began, at))
                began = None
        if began is not None:
            spans.append((began, time.monotonic()))
        return spans

    def now(self, active: bool = False) -> frozenset[str]:
        """What HAProxy held at the last sample (`active`: out of maintenance)."""
        timeline = self.active_timeline if active else self.timeline
        return timeline[-1][1] if timeline else frozenset()


@dataclass
class ConnectionSampler:
    """The established TCP connections each watched process holds to local `port`, read with `ss`
    every `interval` from start to stop: the peak over the whole run, not one reading at the end.

    `watch` takes a process as soon as it exists (pass it as a stack's `on_start`), so the renderer
    is sampled from its first render on, when it opens the most queries."""

    port: int
    interval: float = 0.02
    peak: dict[str, int] = field(default_factory=dict)  # process name → most connections seen at once
    samples: int = 0
    first_sample: float = 0.0  # monotonic
    last_sample: float = 0.0
    _pids: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch(self, proc: ManagedProcess) -> ManagedProcess:
        with self._lock:
            self._pids[proc.pid] = proc.name
            self.peak.setdefault(proc.name, 0)
        return proc

    def start(self) -> ConnectionSampler:
        """Start sampling; returns once the first sample is taken."""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: self.samples, 10, "the first sample of connections")
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            held = connections_by_pid(self.port)
            with self._lock:
                for pid, name in self._pids.items():
                    self.peak[name] = max(self.peak[name], held.get(pid, 0))
            now = time.monotonic()
            self.first_sample = self.first_sample or now
            self.last_sample = now
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)


def connections_by_pid(port: int) -> dict[int, int]:
    """Established TCP connections to local `port`, counted per client process (`ss -p`; root)."""
    cmd = ["ss", "-tnpH", "state", "established", "dport", "=", f":{port}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout
    counts: collections.Counter[int] = collections.Counter()
    for line in out.splitlines():
        for pid in {int(found) for found in re.findall(r"pid=(\d+),", line)}:
            counts[pid] += 1
    return dict(counts)


# The pace of this machine, now, against the one the tests' time bounds were measured on: a fixed
# CPU workload (pure Python plus hashing, as the renderer's own work is) and a Python process
# start (the tests start renderers, `haproxy -c` and Consul calls as processes). Medians of a few
# runs. The reference figures are the slower end of what the 2-core machine the bounds were set on
# measured at rest (2026-12-01: CPU 36-58 ms; a Python start 64 or 115 ms, in two modes), so
# the factor is 1 there at rest and grows only when a machine is slower or busier.
REFERENCE_CPU_S = 0.060
REFERENCE_SPAWN_S = 0.120
PACE_ENV = "CONSUL_RENDERER_TEST_PACE"  # a number forces the factor (CI on a known slow runner)


@dataclass(frozen=True)
class Pace:
    """How many times slower than the reference machine this one runs now (never below 1): a
    time bound in a test is `pace(seconds)`, so a slow or busy machine stretches the bound
    instead of failing the promise, and a fast one never tightens it."""

    factor: float
    cpu_s: float
    spawn_s: float
    forced: bool = False

    def __call__(self, seconds: float) -> float:
        return seconds * self.factor

    def describe(self) -> str:
        how = f"forced by {PACE_ENV}" if self.forced else "measured"
        return (
            f"pace {self.factor:.2f} ({how}; CPU workload {self.cpu_s * 1000:.0f} ms vs {REFERENCE_CPU_S * 1000:.0f},"
            f" a Python start {self.spawn_s * 1000:.0f} ms vs {REFERENCE_SPAWN_S * 1000:.0f})"
        )


def _cpu_workload() -> float:
    started = time.perf_counter()
    total = 0
    for i in range(600_000):
        total += i * i % 7
    hashlib.sha256(b"x" * 8_000_000).digest()
    return time.perf_counter() - started


def _python_start() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import asyncio, json, logging"], check=True, timeout=60)
    return time.perf_counter() - started


def measure_pace(runs: int = 5) -> Pace:
    cpu = statistics.median(_cpu_workload() for _ in range(runs))
    spawn = statistics.median(_python_start() for _ in range(runs))
    forced = os.environ.get(PACE_ENV)
    if forced:
        return Pace(max(1.0, float(forced)), cpu, spawn, forced=True)
    return Pace(max(1.0, cpu / REFERENCE_CPU_S, spawn / REFERENCE_SPAWN_S), cpu, spawn)


def normal_nice() -> str:
    """This process's nice value, as /proc shows it: the priority a run not lowered keeps."""
    return str(os.getpriority(os.PRIO_PROCESS, 0))


def record_nice(runs: Path, lowered: bool = True) -> str:
    """A shell line that appends its nice value to `runs`. `lowered`: the first run is expected
    at the low priority, which the renderer sets right after the shell starts; a busy machine may
    run the shell's first commands before (the CI failure of stop 60: "0" recorded, not "19"), so
    that run first waits (at most 5 s) for its priority to leave the normal one."""
    nice = "cut -d' ' -f19 /proc/$$/stat"
    if not lowered or str(BACKGROUND_NICE) == normal_nice():
        return f"{nice} >> {runs}"
    first_and_normal = f'[ ! -s {runs} ] && [ "$({nice})" = {normal_nice()} ]'
    waits = f"i=0; while {first_and_normal} && [ $i -lt 250 ]; do sleep 0.02; i=$((i+1)); done"
    return f"{waits}; {nice} >> {runs}"
