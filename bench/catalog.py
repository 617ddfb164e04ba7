"""End to end on a large catalog: real Consul (default limits), the real renderer process, real HAProxy.

For each size (services × 10 instances; fillers point at a closed port, the measured services
each have one live instance) and each protocol the renderer speaks to the agent (`bench/agent.py`:
plain HTTP/1.1, or HTTP/2 on the agent's HTTPS port): start → complete file and → serving; then
the changes of `bench/churn.py`, hot (events on the first, middle and last service) and cold (one
change on each of up to `cold_changes` services nothing touched before), each timed from the
Consul call returning to the first (or last) response through HAProxy and reported cold apart
from hot, with their timeouts. Also: connections the renderer holds to the agent's port it uses,
sampled every 200 ms from its start to the end of the soak (peak and median, per phase too),
requests it sends to Consul (its /metrics) per change and per idle minute, what the agent did for
it (RPCs to its server, from Consul's own telemetry, with the agent's rate before the renderer
started for reference), its RSS and idle CPU, and requests per second through the frontend (wrk).
A soak runs membership changes under load and counts failed requests, reloads and additions not
seen in time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from bench.agent import Agent, AgentCounts, Protocol, agent_counts, negotiated, renderer_counters, start_agent
from bench.churn import (
    EXTRA,
    LIVE,
    PROBE_GAP_S,
    Frontend,
    SoakResult,
    cold_plan,
    prepare_cold,
    run_changes,
    service_name,
    soak,
)
from bench.connections import ConnectionSampler, ConnectionStats
from bench.convergence import start_backend
from bench.load import Probe, WrkLoad
from bench.stats import Change, Kind, Split, Stats
from lab.processes import ManagedProcess, free_port, http_get, spawn, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command, routing_args
from renderer.haproxy.control import MasterCLI

INSTANCES = 10
CLOSED_PORT = 9  # discard: nothing listens on loopback here
# The renderer's blocking queries wait 60 s and Consul adds up to 1/16 of that: an idle window
# shorter than this misses their expiry (held queries all start together, so they expire together)
# and sees only the renderer's own check updates.
IDLE_S = 65.0


@dataclass(frozen=True)
class Counts:
    """The renderer's requests to Consul (and its answers' bytes) and the agent's counters at one moment."""

    renderer: int | None
    agent: AgentCounts
    renderer_bytes: int | None = None

    @classmethod
    def now(cls, run: Started) -> Counts:
        requests, answer_bytes = renderer_counters(run.status_port)
        return cls(requests, agent_counts(run.frontend.consul_http), answer_bytes)


@dataclass(frozen=True)
class Rates:
    """Counts from `before` to `after`, divided by changes or minutes."""

    renderer_requests: float | None
    agent_rpcs: float | None
    server_queries: float | None
    renderer_kb: float | None = None  # kB of Consul's answers to the renderer

    @classmethod
    def of(cls, before: Counts, after: Counts, divisor: float) -> Rates:
        kb = (
            (before.renderer_bytes / 1000, after.renderer_bytes / 1000)
            if before.renderer_bytes is not None and after.renderer_bytes is not None
            else (None, None)
        )
        return cls(
            per((before.renderer, after.renderer), divisor),
            per((before.agent.rpcs, after.agent.rpcs), divisor),
            per((before.agent.server_queries, after.agent.server_queries), divisor),
            per(kb, divisor),
        )


@dataclass
class AgentCost:
    """What the agent did, per change or per minute: RPCs it made to its server (`consul.client.rpc`;
    during changes this includes each change's own write, about one RPC) and reads the server ran
    (`consul.rpc.query`). `*_without_renderer`: the agent's own rate before the renderer started."""

    rpcs_per_change: float | None
    rpcs_per_idle_minute: float | None
    rpcs_per_minute_without_renderer: float | None
    server_queries_per_change: float | None
    server_queries_per_idle_minute: float | None


@dataclass
class CatalogResult:
    services: int
    protocol: Protocol  # asked for (`--protocols`)
    negotiated: str | None  # what the renderer logged it watches Consul over ("HTTP/2", "HTTP/1.1")
    instances: int
    hot_services: int
    cold_changes_planned: int
    start_to_file_s: float
    start_to_serving_s: float
    start_cost: Rates  # from the renderer's start to serving: its requests, the agent's RPCs and reads (totals)
    connections_to_agent: ConnectionStats  # sampled every 200 ms from start to the end of the soak
    connections_by_phase: dict[str, ConnectionStats]
    add: Split
    check_fail: Split
    check_pass: Split
    remove: Split
    all_changes: Split
    first_change: Stats  # the first change after start (a cold add)
    timeouts: int
    changes: list[Change]  # every timed change in order, with when its Consul call returned
    probe_requests: int  # the probes' requests through HAProxy while changes were timed
    probe_failed_requests: int
    probe_failure_samples: list[str]
    consul_requests_per_change: float | None
    consul_requests_per_idle_minute: float | None  # over `idle_seconds`
    idle_seconds: float
    agent: AgentCost
    renderer_rss_mb: float | None
    renderer_idle_cpu_percent: float
    frontend_rps: float | None  # None without wrk
    routing: str
    refusals_in_log: int
    # The machine's load average (1, 5, 15 min) when this size started and ended: a shared machine's
    # other work shows here, not in the figures.
    load_average_start: tuple[float, float, float]
    load_average_end: tuple[float, float, float]
    soak: SoakResult | None = None
    # kB of Consul's answers to the renderer per change and per idle minute, against one service's
    # own answer (/v1/health/service of a measured service, 10 instances): the target is ≤ 2×.
    consul_answer_kb_per_change: float | None = None
    consul_answer_kb_per_idle_minute: float | None = None
    service_answer_kb: float | None = None


def fill_catalog(http_port: int, services: int, live: set[str], live_port: int) -> None:
    """services × INSTANCES on made-up nodes; instance 0 of a service in `live` is the live app."""
    url = f"http://127.0.0.1:{http_port}/v1/catalog/register"

    def one(i: int, j: int) -> None:
        name = service_name(i)
        sid, port = (f"{name}-{LIVE}", live_port) if name in live and j == 0 else (f"{name}-{j}", CLOSED_PORT)
        body = {
            "Node": f"filler-{j}",
            "Address": "127.0.0.1",
            "Service": {"ID": sid, "Service": name, "Tags": ["lb"], "Address": "127.0.0.1", "Port": port},
            "Checks": [{"CheckID": f"c-{sid}", "Name": "c", "Status": "passing", "ServiceID": sid}],
        }
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
        with urllib.request.urlopen(request, timeout=30):
            pass

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda ij: one(*ij), [(i, j) for i in range(services) for j in range(INSTANCES)]))


def per(delta_of: tuple[float | None, float | None], divisor: float) -> float | None:
    before, after = delta_of
    if before is None or after is None or not divisor:
        return None
    return round((after - before) / divisor, 1)


def answer_kb(http_port: int, service: str) -> float | None:
    """The size of one service's health answer, as the renderer's query gets it."""
    status, body = http_get(f"http://127.0.0.1:{http_port}/v1/health/service/{service}")
    return round(len(body.encode()) / 1000, 1) if status == 200 else None


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float | None:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(match.group(1)) / 1024, 1) if match else None


def frontend_rps(url: str, seconds: float = 5.0) -> float | None:
    """Requests per second through HAProxy with wrk; None without wrk (a Python client would
    measure itself, not HAProxy)."""
    if not WrkLoad.available():
        return None
    load = WrkLoad(url, connections=8).start()
    time.sleep(seconds)
    result = load.stop()
    return round(result.requests / result.duration_s)


@dataclass(frozen=True)
class Started:
    """The renderer running on a filled catalog."""

    renderer: ManagedProcess
    frontend: Frontend
    status_port: int
    master_socket: Path
    to_file_s: float
    to_serving_s: float
    sampler: ConnectionSampler


def start_web_apps(workdir: Path, started: list[ManagedProcess]) -> dict[str, int]:
    """The live app, the cold changes' app and two spares: web app id → port."""
    ports: dict[str, int] = {}
    for name in (LIVE, EXTRA, "spare-1", "spare-2"):
        proc, port = start_backend(workdir, name)
        started.append(proc)
        ports[name] = port
    return ports


def start_renderer(workdir: Path, agent: Agent, haproxy_bin: str, maps: bool, apps: dict[str, int],
                   first_service: str, started: list[ManagedProcess]) -> Started:  # fmt: skip
    """The renderer with --exec-haproxy on the agent's port for the protocol; the connection
    sampler starts with it and watches that port."""
    http_port, stats_port, status_port = free_port(), free_port(), free_port()
    config = workdir / "haproxy" / "haproxy.cfg"
    config.parent.mkdir(parents=True, exist_ok=True)
    master_socket = workdir / "master.sock"
    cmd = renderer_command(
        "run", *agent.renderer_args, *(routing_args(config.parent) if maps else ()),
        "--template", f"{DEFAULT_TEMPLATE}:{config}",
        "--var", f"http_port={http_port}", "--var", f"stats_port={stats_port}", "--var", "bind_address=127.0.0.1",
        "--haproxy-bin", haproxy_bin, "--exec-haproxy", "--haproxy-master-socket", str(master_socket),
        "--status-addr", f"127.0.0.1:{status_port}",
    )  # fmt: skip
    t0 = time.monotonic()
    renderer = spawn("renderer", cmd, workdir / "renderer.log")
    started.append(renderer)
    sampler = ConnectionSampler(renderer.pid, agent.renderer_port).start()
    wait_until(lambda: config.exists(), 60, "the first file", interval=0.005)
    to_file = time.monotonic() - t0
    first_url = f"http://127.0.0.1:{http_port}/{first_service}/"
    wait_until(lambda: http_get(first_url)[1].strip() == LIVE, 60, "serving", interval=0.005)
    to_serving = time.monotonic() - t0
    spares = {name: port for name, port in apps.items() if name.startswith("spare-")}
    frontend = Frontend(agent.http_port, http_port, spares, apps[EXTRA])
    return Started(renderer, frontend, status_port, master_socket, round(to_file, 2), round(to_serving, 2), sampler)


@dataclass(frozen=True)
class Idle:
    per_minute: Rates
    cpu_percent: float


def idle_figures(run: Started, window_s: float = IDLE_S) -> Idle:
    """The renderer left alone for `window_s`: its requests to Consul, the agent's RPCs, its CPU.
    Not covered however long the window: the reconcile sweep every `reconcile_interval` (5 min)."""
    pid = run.renderer.pid
    n0, c0 = Counts.now(run), cpu_seconds(pid)
    time.sleep(window_s)
    n1, c1 = Counts.now(run), cpu_seconds(pid)
    return Idle(Rates.of(n0, n1, window_s / 60), round(100 * (c1 - c0) / window_s, 2))


def agent_rpcs_per_minute(http_port: int, window_s: float = 15.0) -> float | None:
    """The agent's own RPC rate (anti-entropy, coordinates) with no renderer, after a short settle
    for the syncs of the registrations just made. A few RPCs in the window: read it as ±4 a minute."""
    time.sleep(3)
    before = agent_counts(http_port).rpcs
    time.sleep(window_s)
    return per((before, agent_counts(http_port).rpcs), window_s / 60)


def check_negotiated(renderer: ManagedProcess, protocol: Protocol) -> str | None:
    """What the renderer negotiated; a warning when it is not what `protocol` asked for (the figures
    are then labelled with what was asked and the JSON says what it got)."""
    got = negotiated(renderer.log_text(10**8))
    if got != protocol.expected:
        print(f"\n  warning: {protocol} asked, the renderer watches Consul over {got}", file=sys.stderr)
    return got


def measure(
    services: int,
    workdir: Path,
    consul_bin: str,
    haproxy_bin: str,
    events: int,
    soak_changes: int,
    maps: bool = True,
    cold_changes: int = 40,
    protocol: Protocol = Protocol.HTTP,
    idle_s: float = IDLE_S,
    probe_gap_s: float = PROBE_GAP_S,
    block_wait: str = "",
) -> CatalogResult:
    """One catalog size over one protocol; `maps`: route through the routing map (else three ACLs
    per service); `probe_gap_s`: each probe thread's pause between requests; `block_wait`: see
    `start_agent`."""
    workdir.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    started: list[ManagedProcess] = []
    probes: dict[str, Probe] = {}
    sampler: ConnectionSampler | None = None
    try:
        agent = start_agent(consul_bin, workdir, protocol, block_wait)
        started.append(agent.process)
        http = agent.http_port
        hot = sorted({0, services // 2, services - 1})
        measured = [service_name(i) for i in hot]
        plan = cold_plan(services, hot, cold_changes)
        apps = start_web_apps(workdir, started)
        print(f"  registering {services} × {INSTANCES} instances", file=sys.stderr, flush=True)
        fill_catalog(http, services, {*measured, *(c.service for c in plan)}, apps[LIVE])
        prepare_cold(http, plan, apps[EXTRA])
        without_renderer = agent_rpcs_per_minute(http)
        before_start = Counts(0, agent_counts(http))
        run = start_renderer(workdir, agent, haproxy_bin, maps, apps, measured[0], started)
        run = replace(run, frontend=replace(run.frontend, probe_gap_s=probe_gap_s))
        start_cost = Rates.of(before_start, Counts.now(run), 1)
        sampler = run.sampler
        protocol_used = check_negotiated(run.renderer, protocol)
        # Let HAProxy's checks mark the closed-port fillers down before timing anything.
        time.sleep(5)
        for name in measured:
            probes[name] = run.frontend.probe(name).start()
            probes[name].pause()  # idle figures and rps without the probes' load; each hot event resumes one
        sampler.phase = "idle"
        idle = idle_figures(run, idle_s)
        # The last service: the worst case for ACL routing (every rule before it is evaluated).
        rps = frontend_rps(f"http://127.0.0.1:{run.frontend.http_port}/{measured[-1]}/")
        sampler.phase = "changes"
        n2 = Counts.now(run)
        changes = run_changes(run.frontend, probes, plan, events)
        ledger = changes.ledger
        per_change = Rates.of(n2, Counts.now(run), len(ledger.changes))
        soaked = None
        if soak_changes:
            sampler.phase = "soak"
            master = MasterCLI(str(run.master_socket))
            soaked = soak(run.frontend, probes[measured[0]], measured[0], soak_changes, master)
        sampler.stop()
        return CatalogResult(
            services=services,
            protocol=protocol,
            negotiated=protocol_used,
            instances=INSTANCES,
            hot_services=len(measured),
            cold_changes_planned=len(plan),
            start_to_file_s=run.to_file_s,
            start_to_serving_s=run.to_serving_s,
            start_cost=start_cost,
            connections_to_agent=sampler.overall(),
            connections_by_phase=sampler.by_phase(),
            add=ledger.split(Kind.ADD),
            check_fail=ledger.split(Kind.CHECK_FAIL),
            check_pass=ledger.split(Kind.CHECK_PASS),
            remove=ledger.split(Kind.REMOVE),
            all_changes=ledger.split(),
            first_change=ledger.first(),
            timeouts=ledger.timeouts,
            changes=ledger.changes,
            probe_requests=changes.probe_requests,
            probe_failed_requests=changes.probe_failures,
            probe_failure_samples=changes.failure_samples,
            consul_requests_per_change=per_change.renderer_requests,
            consul_requests_per_idle_minute=idle.per_minute.renderer_requests,
            idle_seconds=idle_s,
            agent=AgentCost(
                rpcs_per_change=per_change.agent_rpcs,
                rpcs_per_idle_minute=idle.per_minute.agent_rpcs,
                rpcs_per_minute_without_renderer=without_renderer,
                server_queries_per_change=per_change.server_queries,
                server_queries_per_idle_minute=idle.per_minute.server_queries,
            ),
            renderer_rss_mb=rss_mb(run.renderer.pid),
            renderer_idle_cpu_percent=idle.cpu_percent,
            frontend_rps=rps,
            routing="map" if maps else "acl",
            refusals_in_log=run.renderer.log_text(10**8).count("http_max_conns_per_client"),
            load_average_start=load_at_start,
            load_average_end=os.getloadavg(),
            soak=soaked,
            consul_answer_kb_per_change=per_change.renderer_kb,
            consul_answer_kb_per_idle_minute=idle.per_minute.renderer_kb,
            service_answer_kb=answer_kb(http, measured[1]),
        )
    finally:
        if sampler is not None:
            sampler.stop()
        for probe in probes.values():
            probe.stop()
        for proc in reversed(started):
            proc.stop()
