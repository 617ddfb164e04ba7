"""End to end on a large catalog: real Consul (default limits), the real renderer process, real HAProxy.

For each size (services × 10 instances; fillers point at a closed port, the measured services
each have one live instance): start → complete file and → serving; then the changes of
`bench/churn.py`, hot (events on the first, middle and last service) and cold (one change on each
of up to `cold_changes` services nothing touched before), each timed from the Consul call
returning to the first (or last) response through HAProxy and reported cold apart from hot, with
their timeouts. Also: connections the renderer holds to the agent, sampled every 200 ms from its
start to the end of the soak (peak and median, per phase too), requests it sends to Consul (its
/metrics) per change and per idle minute, its RSS and idle CPU, and requests per second through
the frontend (wrk). A soak runs membership changes under load and counts failed requests,
reloads and additions not seen in time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.churn import EXTRA, LIVE, Frontend, SoakResult, cold_plan, prepare_cold, run_changes, service_name, soak
from bench.connections import ConnectionSampler, ConnectionStats
from bench.convergence import start_backend
from bench.load import Probe, WrkLoad
from bench.stats import Kind, Split, Stats, ms_cell
from lab.processes import ManagedProcess, free_port, http_get, spawn, start_consul_dev, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command, routing_args
from renderer.haproxy.control import MasterCLI

INSTANCES = 10
CLOSED_PORT = 9  # discard: nothing listens on loopback here


@dataclass
class CatalogResult:
    services: int
    instances: int
    hot_services: int
    cold_changes_planned: int
    start_to_file_s: float
    start_to_serving_s: float
    connections_to_agent: ConnectionStats  # sampled every 200 ms from start to the end of the soak
    connections_by_phase: dict[str, ConnectionStats]
    add: Split
    check_fail: Split
    check_pass: Split
    remove: Split
    all_changes: Split
    first_change: Stats  # the first change after start (a cold add)
    timeouts: int
    probe_requests: int  # the probes' requests through HAProxy while changes were timed
    probe_failed_requests: int
    probe_failure_samples: list[str]
    consul_requests_per_change: float | None
    consul_requests_per_idle_minute: float | None
    renderer_rss_mb: float | None
    renderer_idle_cpu_percent: float
    frontend_rps: float | None  # None without wrk
    routing: str
    refusals_in_log: int
    soak: SoakResult | None = None


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


def consul_requests(status_port: int) -> int | None:
    """The renderer's count of requests to Consul; None when its /metrics does not say."""
    _, text = http_get(f"http://127.0.0.1:{status_port}/metrics")
    match = re.search(r"^consul_renderer_consul_requests_total (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else None


def per(delta_of: tuple[int | None, int | None], divisor: float) -> float | None:
    before, after = delta_of
    if before is None or after is None or not divisor:
        return None
    return round((after - before) / divisor, 1)


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


def start_renderer(workdir: Path, http: int, haproxy_bin: str, maps: bool, apps: dict[str, int],
                   first_service: str, started: list[ManagedProcess]) -> Started:  # fmt: skip
    """The renderer with --exec-haproxy; the connection sampler starts with it."""
    http_port, stats_port, status_port = free_port(), free_port(), free_port()
    config = workdir / "haproxy" / "haproxy.cfg"
    config.parent.mkdir(parents=True, exist_ok=True)
    master_socket = workdir / "master.sock"
    cmd = renderer_command(
        "run", "--consul-addr", f"127.0.0.1:{http}", *(routing_args(config.parent) if maps else ()),
        "--template", f"{DEFAULT_TEMPLATE}:{config}",
        "--var", f"http_port={http_port}", "--var", f"stats_port={stats_port}", "--var", "bind_address=127.0.0.1",
        "--haproxy-bin", haproxy_bin, "--exec-haproxy", "--haproxy-master-socket", str(master_socket),
        "--status-addr", f"127.0.0.1:{status_port}",
    )  # fmt: skip
    t0 = time.monotonic()
    renderer = spawn("renderer", cmd, workdir / "renderer.log")
    started.append(renderer)
    sampler = ConnectionSampler(renderer.pid, http).start()
    wait_until(lambda: config.exists(), 60, "the first file", interval=0.005)
    to_file = time.monotonic() - t0
    first_url = f"http://127.0.0.1:{http_port}/{first_service}/"
    wait_until(lambda: http_get(first_url)[1].strip() == LIVE, 60, "serving", interval=0.005)
    to_serving = time.monotonic() - t0
    spares = {name: port for name, port in apps.items() if name.startswith("spare-")}
    frontend = Frontend(http, http_port, spares, apps[EXTRA])
    return Started(renderer, frontend, status_port, master_socket, round(to_file, 2), round(to_serving, 2), sampler)


@dataclass(frozen=True)
class Idle:
    consul_requests_per_minute: float | None
    cpu_percent: float


def idle_figures(run: Started, window_s: float = 20.0) -> Idle:
    """The renderer left alone for `window_s`: its requests to Consul and its CPU."""
    pid = run.renderer.pid
    r0, c0 = consul_requests(run.status_port), cpu_seconds(pid)
    time.sleep(window_s)
    r1, c1 = consul_requests(run.status_port), cpu_seconds(pid)
    return Idle(per((r0, r1), window_s / 60), round(100 * (c1 - c0) / window_s, 2))


def measure(
    services: int,
    workdir: Path,
    consul_bin: str,
    haproxy_bin: str,
    events: int,
    soak_changes: int,
    maps: bool = True,
    cold_changes: int = 40,
) -> CatalogResult:
    """One catalog size; `maps`: route through the routing map (else three ACLs per service)."""
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[ManagedProcess] = []
    probes: dict[str, Probe] = {}
    sampler: ConnectionSampler | None = None
    try:
        agent = start_consul_dev(consul_bin, workdir / "consul.log")
        started.append(agent)
        http = int(str(agent.extra["http_addr"]).rsplit(":", 1)[1])
        hot = sorted({0, services // 2, services - 1})
        measured = [service_name(i) for i in hot]
        plan = cold_plan(services, hot, cold_changes)
        apps = start_web_apps(workdir, started)
        print(f"  registering {services} × {INSTANCES} instances", file=sys.stderr, flush=True)
        fill_catalog(http, services, {*measured, *(c.service for c in plan)}, apps[LIVE])
        prepare_cold(http, plan, apps[EXTRA])
        run = start_renderer(workdir, http, haproxy_bin, maps, apps, measured[0], started)
        sampler = run.sampler
        # Let HAProxy's checks mark the closed-port fillers down before timing anything.
        time.sleep(5)
        for name in measured:
            probes[name] = run.frontend.probe(name).start()
            probes[name].pause()  # idle figures and rps without the probes' load; each hot event resumes one
        sampler.phase = "idle"
        idle = idle_figures(run)
        # The last service: the worst case for ACL routing (every rule before it is evaluated).
        rps = frontend_rps(f"http://127.0.0.1:{run.frontend.http_port}/{measured[-1]}/")
        sampler.phase = "changes"
        r2 = consul_requests(run.status_port)
        changes = run_changes(run.frontend, probes, plan, events)
        ledger = changes.ledger
        r3 = consul_requests(run.status_port)
        soaked = None
        if soak_changes:
            sampler.phase = "soak"
            master = MasterCLI(str(run.master_socket))
            soaked = soak(run.frontend, probes[measured[0]], measured[0], soak_changes, master)
        sampler.stop()
        return CatalogResult(
            services=services,
            instances=INSTANCES,
            hot_services=len(measured),
            cold_changes_planned=len(plan),
            start_to_file_s=run.to_file_s,
            start_to_serving_s=run.to_serving_s,
            connections_to_agent=sampler.overall(),
            connections_by_phase=sampler.by_phase(),
            add=ledger.split(Kind.ADD),
            check_fail=ledger.split(Kind.CHECK_FAIL),
            check_pass=ledger.split(Kind.CHECK_PASS),
            remove=ledger.split(Kind.REMOVE),
            all_changes=ledger.split(),
            first_change=ledger.first(),
            timeouts=ledger.timeouts,
            probe_requests=changes.probe_requests,
            probe_failed_requests=changes.probe_failures,
            probe_failure_samples=changes.failure_samples,
            consul_requests_per_change=per((r2, r3), len(ledger.changes)),
            consul_requests_per_idle_minute=idle.consul_requests_per_minute,
            renderer_rss_mb=rss_mb(run.renderer.pid),
            renderer_idle_cpu_percent=idle.cpu_percent,
            frontend_rps=rps,
            routing="map" if maps else "acl",
            refusals_in_log=run.renderer.log_text(10**8).count("http_max_conns_per_client"),
            soak=soaked,
        )
    finally:
        if sampler is not None:
            sampler.stop()
        for probe in probes.values():
            probe.stop()
        for proc in reversed(started):
            proc.stop()


def table(results: list[CatalogResult]) -> str:
    """Two tables: the catalog's figures per size, then the changes per size, cold apart from hot."""
    head = (
        f"{'services':>8} {'file s':>6} {'serve s':>7} {'conns peak/med':>14} {'first chg ms':>12} "
        f"{'failed/probe reqs':>17} {'req/chg':>7} {'req/idle min':>12} {'RSS MB':>6} {'idle CPU%':>9} {'rps':>6}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.services:>8} {r.start_to_file_s:>6} {r.start_to_serving_s:>7} {r.connections_to_agent.cell():>14} "
            f"{ms_cell(r.first_change.max_ms, r.first_change.count):>12} "
            f"{f'{r.probe_failed_requests}/{r.probe_requests}':>17} {_or_dash(r.consul_requests_per_change):>7} "
            f"{_or_dash(r.consul_requests_per_idle_minute):>12} {_or_dash(r.renderer_rss_mb):>6} "
            f"{r.renderer_idle_cpu_percent:>9} {_or_dash(r.frontend_rps):>6}"
        )
    rows += ["", changes_table(results)]
    for r in results:
        if r.soak:
            rows.append(f"soak at {r.services} services: {json.dumps(asdict(r.soak))}")
    return "\n".join(rows) + f"\n(× {INSTANCES} instances each; times in ms from the Consul call to HAProxy)"


def changes_table(results: list[CatalogResult]) -> str:
    head = (
        f"{'services':>8} {'changes':>7} {'n':>4} {'t/o':>4} {'add p50/p95/max':>16} {'check fails':>14} "
        f"{'check passes':>14} {'remove':>14} {'all':>14}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        for label in ("cold", "hot"):
            cold = label == "cold"
            kinds = [split.side(cold) for split in (r.add, r.check_fail, r.check_pass, r.remove)]
            total = r.all_changes.side(cold)
            cells = " ".join(f"{s.cell():>{w}}" for s, w in zip(kinds, (16, 14, 14, 14), strict=True))
            rows.append(f"{r.services:>8} {label:>7} {total.count:>4} {total.timeouts:>4} {cells} {total.cell():>14}")
    return "\n".join(rows)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
