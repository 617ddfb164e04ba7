"""The changes timed on a large catalog: hot events on the measured services, cold changes on
services nothing touched before, and the soak.

A hot event is four changes on one of the three measured services (first, middle, last): a spare
added (TTL check registered passing), its check failed, passed, the spare deregistered. Only the
first event on each of them holds a cold change (its add). So that cold changes are more than 3 in
a run, each cold change goes to a service of its own that no change touched before, spread over
the catalog in a fixed shuffled order, and its kind rotates: add, check fails, check passes,
remove. Its instance (the web app `extra`) is registered before the renderer starts: passing for a
check that will fail or an instance that will be removed, critical for a check that will pass.
Cold changes and hot events alternate, and the very first change after start is a cold add.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

from bench.convergence import consul_put
from bench.load import Probe, constant_load
from bench.stats import Kind, Ledger
from bench.timing import time_change
from lab.processes import wait_until
from renderer.haproxy.control import MasterCLI

LIVE = "live"  # the web app behind instance 0 of every measured service: answers "live"
EXTRA = "extra"  # the web app behind each cold change's instance
# Back to back, the probe's two threads, HAProxy serving them and the web app answering took ~1.2 of
# this machine's 2 cores (top, 1,000 × 10 over HTTP/2: bench 41%, web app 35%, HAProxy 45% with its
# checks): the renderer timed was then mostly waiting for a core. A request per thread every ~1 ms
# keeps a sighting within ~2 ms of the change (the new instance answers one request in two).
# `python -m bench --probe-gap-ms 0` measures with the probe of before.
PROBE_GAP_S = 0.001
COLD_KINDS = (Kind.ADD, Kind.CHECK_FAIL, Kind.CHECK_PASS, Kind.REMOVE)


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


@dataclass(frozen=True)
class Frontend:
    """Where the changes are made and seen: the agent, HAProxy's frontend, the web apps."""

    consul_http: int
    http_port: int
    spares: dict[str, int]  # spare web app id → port, for hot events
    extra_port: int
    probe_gap_s: float = PROBE_GAP_S

    def probe(self, service: str) -> Probe:
        """Two threads, each pausing `probe_gap_s` between requests (see PROBE_GAP_S)."""
        return Probe("127.0.0.1", self.http_port, path=f"/{service}/", gap_s=self.probe_gap_s)


@dataclass(frozen=True)
class ColdChange:
    service: str
    kind: Kind

    @property
    def instance(self) -> str:
        """The agent's service ID; what answers through HAProxy is always `EXTRA`."""
        return f"{EXTRA}-{self.service}"


def cold_plan(services: int, hot: list[int], count: int, seed: int = 23) -> list[ColdChange]:
    """At most `count` services outside `hot`, evenly spread over the catalog, in a shuffled order
    (so that a service's place in the catalog and its time in the run are unrelated)."""
    candidates = [i for i in range(services) if i not in hot]
    count = min(count, len(candidates))
    picked = [candidates[k * len(candidates) // count] for k in range(count)] if count else []
    random.Random(seed).shuffle(picked)
    return [ColdChange(service_name(i), COLD_KINDS[k % len(COLD_KINDS)]) for k, i in enumerate(picked)]


def register_ttl(consul_http: int, service: str, sid: str, port: int, ttl: str, status: str = "passing") -> None:
    check = {"CheckID": f"ttl-{sid}", "Name": "ttl", "TTL": ttl, "Status": status}
    consul_put(consul_http, "/v1/agent/service/register", {
        "Name": service, "ID": sid, "Address": "127.0.0.1", "Port": port, "Tags": ["lb"], "Check": check,
    })  # fmt: skip


def prepare_cold(consul_http: int, plan: list[ColdChange], extra_port: int) -> None:
    """Before the renderer starts: the instance each cold change other than an add acts on."""
    for change in plan:
        if change.kind != Kind.ADD:
            status = "critical" if change.kind == Kind.CHECK_PASS else "passing"
            register_ttl(consul_http, change.service, change.instance, extra_port, "1h", status)


def make_change(consul_http: int, kind: Kind, service: str, sid: str, port: int, ttl: str) -> float:
    """The Consul call for one change; returns the monotonic time it returned."""
    if kind == Kind.ADD:
        register_ttl(consul_http, service, sid, port, ttl)
    elif kind == Kind.REMOVE:
        consul_put(consul_http, f"/v1/agent/service/deregister/{sid}")
    else:
        consul_put(consul_http, f"/v1/agent/check/{'pass' if kind == Kind.CHECK_PASS else 'fail'}/ttl-{sid}")
    return time.monotonic()


def wall_clock(monotonic: float) -> float:
    """The Unix time of a monotonic instant of this process (for the per-change records)."""
    return time.time() - (time.monotonic() - monotonic)


def ready(probe: Probe, change: ColdChange) -> None:
    """The probe sees the service as it stands before the change (warns otherwise; the timing
    then shows what was not there as a timeout)."""
    expected = [LIVE] if change.kind.appears else [LIVE, EXTRA]
    try:
        wait_until(lambda: all(i in probe.last_seen for i in expected), 15, f"{change.service} answering")
    except TimeoutError:
        print(f"\n  warning: {change.service} never answered {expected} before its change", file=sys.stderr)
    if change.kind.appears and EXTRA in probe.first_seen:
        print(f"\n  warning: {change.service} served {EXTRA} before its {change.kind}", file=sys.stderr)


@dataclass
class ChangesRun:
    """The changes phase: every change timed, and the probes' own requests through HAProxy meanwhile
    (a failed one is a non-200 answer or a socket error)."""

    ledger: Ledger = field(default_factory=Ledger)
    probe_requests: int = 0
    probe_failures: int = 0
    failure_samples: list[str] = field(default_factory=list)

    def count(self, probes: list[Probe], sign: int = 1) -> None:
        self.probe_requests += sign * sum(p.requests for p in probes)
        self.probe_failures += sign * sum(len(p.failures) for p in probes)

    def sample_failures(self, where: str, failures: list[str]) -> None:
        self.failure_samples += [f"{where}: {f}" for f in failures[: 5 - len(self.failure_samples)]]


def cold_change(frontend: Frontend, change: ColdChange, run: ChangesRun) -> None:
    probe = frontend.probe(change.service).start()
    try:
        ready(probe, change)
        if change.kind.appears:
            probe.forget(EXTRA)
        sid, port = change.instance, frontend.extra_port
        since = make_change(frontend.consul_http, change.kind, change.service, sid, port, "1h")
        seconds = time_change(probe, EXTRA, change.kind, since)
        run.ledger.record(change.service, change.kind, seconds, wall_clock(since))
    finally:
        probe.stop()
        run.count([probe])
        run.sample_failures(f"{change.kind} on {change.service}", probe.failures)


def hot_event(frontend: Frontend, probes: dict[str, Probe], n: int, ledger: Ledger) -> None:
    """On the next measured service: a spare added, its check failed, passed, the spare removed."""
    service = list(probes)[n % len(probes)]
    spare = list(frontend.spares)[n % len(frontend.spares)]
    probe = probes[service]
    probe.resume()  # only the measured service is probed: the probes' load is not the renderer's
    try:
        for kind in (Kind.ADD, Kind.CHECK_FAIL, Kind.CHECK_PASS, Kind.REMOVE):
            if kind.appears:
                probe.forget(spare)
            since = make_change(frontend.consul_http, kind, service, spare, frontend.spares[spare], "10m")
            ledger.record(service, kind, time_change(probe, spare, kind, since), wall_clock(since))
    finally:
        probe.pause()


def run_changes(frontend: Frontend, probes: dict[str, Probe], plan: list[ColdChange], events: int) -> ChangesRun:
    """Cold changes and hot events, alternating, a cold one first."""
    run = ChangesRun()
    run.count(list(probes.values()), sign=-1)  # what the hot probes did before is not this phase's
    before = {name: len(p.failures) for name, p in probes.items()}
    for n in range(max(events, len(plan))):
        if n < len(plan):
            cold_change(frontend, plan[n], run)
        if n < events:
            hot_event(frontend, probes, n, run.ledger)
        cold, hot = min(n + 1, len(plan)), min(n + 1, events)
        print(f"\r  cold changes {cold}/{len(plan)}, hot events {hot}/{events}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    run.count(list(probes.values()))
    for name, probe in probes.items():
        run.sample_failures(f"hot events on {name}", probe.failures[before[name] :])
    return run


@dataclass
class SoakResult:
    changes: int
    seconds: float
    load_tool: str
    requests: int
    requests_per_second: float
    failed_requests: int
    reloads: int
    timeouts: int  # additions not seen within 15 s (the soak goes on)


def soak(frontend: Frontend, probe: Probe, service: str, changes: int, master: MasterCLI) -> SoakResult:
    """`changes` membership changes (add/remove pairs) on one service under load."""
    before = master.show_proc().reloads
    probe.gap_s = 0.0  # back to back: the soak counts failed requests, the more requests the better
    probe.resume()
    load = constant_load("127.0.0.1", frontend.http_port, f"/{service}/", connections=16).start()
    failures_before, timeouts = len(probe.failures), 0
    started = time.monotonic()
    names = list(frontend.spares)
    for n in range(changes // 2):
        spare = names[n % len(names)]
        probe.forget(spare)
        consul_put(frontend.consul_http, "/v1/agent/service/register", {
            "Name": service, "ID": spare, "Address": "127.0.0.1", "Port": frontend.spares[spare], "Tags": ["lb"],
        })  # fmt: skip
        try:
            wait_until(lambda s=spare: s in probe.first_seen, 15, f"{spare} answering", interval=0.001)  # type: ignore[misc]
        except TimeoutError:
            timeouts += 1
        consul_put(frontend.consul_http, f"/v1/agent/service/deregister/{spare}")
        time.sleep(0.02)
        print(f"\r  soak: {2 * (n + 1)}/{changes} changes", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    result = load.stop()
    probe.pause()
    return SoakResult(
        changes=changes,
        seconds=round(time.monotonic() - started, 1),
        load_tool=result.tool,
        requests=result.requests,
        requests_per_second=round(result.requests / result.duration_s),
        failed_requests=result.failed + len(probe.failures) - failures_before,
        reloads=master.show_proc().reloads - before,
        timeouts=timeouts,
    )
