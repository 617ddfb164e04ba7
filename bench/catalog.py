"""End to end on a large catalog: real Consul (default limits), the real renderer process, real HAProxy.

For each size (services × 10 instances; fillers point at a closed port, the measured services
each have one live instance): start → complete file and → serving; then changes spread over the
first, middle and last service, each timed from the Consul call returning to the first (or last)
response through HAProxy: an instance added (a TTL check registered passing), its check failed,
passed again, and the instance deregistered. Also: connections the renderer holds to the agent
(`ss`), requests it sends to Consul (its /metrics) per change and per idle minute, its RSS and
idle CPU, and requests per second through the frontend (wrk). A soak runs membership changes
under wrk load and counts failed requests and reloads.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.convergence import Stats, consul_put, gone, start_backend
from bench.load import Probe, WrkLoad
from lab.processes import ManagedProcess, free_port, http_get, spawn, start_consul_dev, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command, routing_args
from renderer.haproxy.control import MasterCLI

INSTANCES = 10
CLOSED_PORT = 9  # discard: nothing listens on loopback here


@dataclass
class CatalogResult:
    services: int
    instances: int
    start_to_file_s: float
    start_to_serving_s: float
    connections_to_agent: int
    add: Stats
    check_fail: Stats
    check_pass: Stats
    remove: Stats
    all_changes: Stats
    timeouts: int
    consul_requests_per_change: float
    consul_requests_per_idle_minute: float
    renderer_rss_mb: float
    renderer_idle_cpu_percent: float
    frontend_rps: float
    routing: str
    refusals_in_log: int
    soak: dict[str, float] = field(default_factory=dict)


def service_name(i: int) -> str:
    return f"svc-{i:04d}"


def fill_catalog(http_port: int, services: int, live: dict[str, tuple[str, int]]) -> None:
    """services × INSTANCES on made-up nodes; instance 0 of a service in `live` is that live app."""
    url = f"http://127.0.0.1:{http_port}/v1/catalog/register"

    def one(i: int, j: int) -> None:
        name = service_name(i)
        sid, port = live[name] if name in live and j == 0 else (f"{name}-{j}", CLOSED_PORT)
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


def connections(pid: int, port: int) -> int:
    out = subprocess.run(["ss", "-tnpH", "state", "established"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if f":{port} " in line and f"pid={pid}," in line)


def consul_requests(status_port: int) -> int:
    _, text = http_get(f"http://127.0.0.1:{status_port}/metrics")
    match = re.search(r"^consul_renderer_consul_requests_total (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return round(int(match.group(1)) / 1024, 1) if match else 0.0


def frontend_rps(url: str, seconds: float = 5.0) -> float:
    if not WrkLoad.available():
        return float("nan")
    load = WrkLoad(url, connections=8).start()
    time.sleep(seconds)
    result = load.stop()
    return round(result.requests / result.duration_s)


@dataclass
class Timings:
    add: list[float] = field(default_factory=list)
    check_fail: list[float] = field(default_factory=list)
    check_pass: list[float] = field(default_factory=list)
    remove: list[float] = field(default_factory=list)
    timeouts: int = 0

    def first(self, probe: Probe, instance: str, since: float, into: list[float]) -> None:
        try:
            wait_until(lambda: instance in probe.first_seen, 15, f"{instance} answering", interval=0.001)
            into.append(probe.first_seen[instance] - since)
        except TimeoutError:
            self.timeouts += 1

    def last(self, probe: Probe, instance: str, since: float, into: list[float]) -> None:
        try:
            wait_until(lambda: gone(probe, instance, since, 0.3), 30, f"{instance} gone", interval=0.01)
            into.append(max(0.0, probe.last_seen.get(instance, since) - since))
        except TimeoutError:
            self.timeouts += 1


def churn(consul_http: int, probes: dict[str, Probe], spares: dict[str, int], events: int) -> Timings:
    """Each event, on the next measured service: add (TTL check passing), fail, pass, deregister."""
    timings = Timings()
    targets = list(probes)
    for n in range(events):
        service, spare = targets[n % len(targets)], list(spares)[n % len(spares)]
        probe = probes[service]
        for other in probes.values():
            if other is not probe:
                other.pause()  # only the measured service is probed: the probes' load is not the renderer's
        probe.resume()
        probe.forget(spare)
        check = {"CheckID": f"ttl-{spare}", "Name": "ttl", "TTL": "10m", "Status": "passing"}
        consul_put(consul_http, "/v1/agent/service/register", {
            "Name": service, "ID": spare, "Address": "127.0.0.1", "Port": spares[spare], "Tags": ["lb"], "Check": check,
        })  # fmt: skip
        timings.first(probe, spare, time.monotonic(), timings.add)
        consul_put(consul_http, f"/v1/agent/check/fail/ttl-{spare}")
        timings.last(probe, spare, time.monotonic(), timings.check_fail)
        probe.forget(spare)
        consul_put(consul_http, f"/v1/agent/check/pass/ttl-{spare}")
        timings.first(probe, spare, time.monotonic(), timings.check_pass)
        consul_put(consul_http, f"/v1/agent/service/deregister/{spare}")
        timings.last(probe, spare, time.monotonic(), timings.remove)
        print(f"\r  event {n + 1}/{events}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return timings


def soak(consul_http: int, url: str, probe: Probe, service: str, spares: dict[str, int], changes: int,
         master: MasterCLI) -> dict[str, float]:  # fmt: skip
    """`changes` membership changes (add/remove pairs) on one service under wrk load."""
    before = master.show_proc().reloads
    probe.resume()
    load = WrkLoad(url, connections=16).start()
    failures_before = len(probe.failures)
    started = time.monotonic()
    names = list(spares)
    for n in range(changes // 2):
        spare = names[n % len(names)]
        probe.forget(spare)
        consul_put(consul_http, "/v1/agent/service/register", {
            "Name": service, "ID": spare, "Address": "127.0.0.1", "Port": spares[spare], "Tags": ["lb"],
        })  # fmt: skip
        wait_until(lambda s=spare: s in probe.first_seen, 15, f"{spare} answering", interval=0.001)  # type: ignore[misc]
        consul_put(consul_http, f"/v1/agent/service/deregister/{spare}")
        time.sleep(0.02)
        print(f"\r  soak: {2 * (n + 1)}/{changes} changes", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    result = load.stop()
    return {
        "changes": float(changes),
        "seconds": round(time.monotonic() - started, 1),
        "requests": float(result.requests),
        "requests_per_second": round(result.requests / result.duration_s),
        "failed_requests": float(result.failed + len(probe.failures) - failures_before),
        "reloads": float(master.show_proc().reloads - before),
    }


def measure(
    services: int, workdir: Path, consul_bin: str, haproxy_bin: str, events: int, soak_changes: int, maps: bool = True
) -> CatalogResult:
    """One catalog size; `maps`: route through the routing map (else three ACLs per service)."""
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[ManagedProcess] = []
    probes: dict[str, Probe] = {}
    try:
        agent = start_consul_dev(consul_bin, workdir / "consul.log")
        started.append(agent)
        http = int(str(agent.extra["http_addr"]).rsplit(":", 1)[1])
        measured = [service_name(i) for i in sorted({0, services // 2, services - 1})]
        live: dict[str, tuple[str, int]] = {}
        for name in measured:
            proc, port = start_backend(workdir, f"{name}-live")
            started.append(proc)
            live[name] = (f"{name}-live", port)
        spares: dict[str, int] = {}
        for n in (1, 2):
            proc, port = start_backend(workdir, f"spare-{n}")
            started.append(proc)
            spares[f"spare-{n}"] = port
        print(f"  registering {services} × {INSTANCES} instances", file=sys.stderr, flush=True)
        fill_catalog(http, services, live)

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
        wait_until(lambda: config.exists(), 60, "the first file", interval=0.005)
        to_file = time.monotonic() - t0
        first_url = f"http://127.0.0.1:{http_port}/{measured[0]}/"
        wait_until(lambda: http_get(first_url)[1].strip() == live[measured[0]][0], 60, "serving", interval=0.005)
        to_serving = time.monotonic() - t0
        # Let HAProxy's checks mark the closed-port fillers down before timing anything.
        time.sleep(5)
        for name in measured:
            probes[name] = Probe("127.0.0.1", http_port, path=f"/{name}/").start()
            probes[name].pause()  # idle figures and rps without the probes' load; churn resumes one
        held = connections(renderer.pid, http)
        idle_window = 20.0
        r0, c0 = consul_requests(status_port), cpu_seconds(renderer.pid)
        time.sleep(idle_window)
        r1, c1 = consul_requests(status_port), cpu_seconds(renderer.pid)
        # The last service: the worst case for ACL routing (every rule before it is evaluated).
        rps = frontend_rps(f"http://127.0.0.1:{http_port}/{measured[-1]}/")
        timings = churn(http, probes, spares, events)
        r2 = consul_requests(status_port)
        changes = 4 * events
        master = MasterCLI(str(master_socket))
        soaked = {}
        if soak_changes:
            soaked = soak(http, first_url, probes[measured[0]], measured[0], spares, soak_changes, master)
        log = renderer.log_text(10**8)
        everything = timings.add + timings.check_fail + timings.check_pass + timings.remove
        return CatalogResult(
            services=services,
            instances=INSTANCES,
            start_to_file_s=round(to_file, 2),
            start_to_serving_s=round(to_serving, 2),
            connections_to_agent=held,
            add=Stats.of(timings.add),
            check_fail=Stats.of(timings.check_fail),
            check_pass=Stats.of(timings.check_pass),
            remove=Stats.of(timings.remove),
            all_changes=Stats.of(everything),
            timeouts=timings.timeouts,
            consul_requests_per_change=round((r2 - r1) / changes, 1),
            consul_requests_per_idle_minute=round((r1 - r0) * 60 / idle_window, 1),
            renderer_rss_mb=rss_mb(renderer.pid),
            renderer_idle_cpu_percent=round(100 * (c1 - c0) / idle_window, 2),
            frontend_rps=rps,
            routing="map" if maps else "acl",
            refusals_in_log=log.count("http_max_conns_per_client"),
            soak=soaked,
        )
    finally:
        for probe in probes.values():
            probe.stop()
        for proc in reversed(started):
            proc.stop()


def table(results: list[CatalogResult]) -> str:
    head = (
        f"{'services':>8} {'file s':>6} {'serve s':>7} {'conns':>5} {'add p50/p95/max':>16} {'fail':>14} "
        f"{'pass':>14} {'remove':>14} {'req/chg':>7} {'req/idle min':>12} {'RSS MB':>6} {'idle CPU%':>9} {'rps':>6}"
    )
    rows = [head, "-" * len(head)]

    def s(stats: Stats) -> str:
        return f"{stats.median_ms:.0f}/{stats.p95_ms:.0f}/{stats.max_ms:.0f}"

    for r in results:
        rows.append(
            f"{r.services:>8} {r.start_to_file_s:>6} {r.start_to_serving_s:>7} {r.connections_to_agent:>5} "
            f"{s(r.add):>16} {s(r.check_fail):>14} {s(r.check_pass):>14} {s(r.remove):>14} "
            f"{r.consul_requests_per_change:>7} {r.consul_requests_per_idle_minute:>12} {r.renderer_rss_mb:>6} "
            f"{r.renderer_idle_cpu_percent:>9} {r.frontend_rps:>6}"
        )
    for r in results:
        if r.soak:
            rows.append(f"soak at {r.services} services: {json.dumps(r.soak)}")
    return "\n".join(rows) + f"\n(× {INSTANCES} instances each; times in ms from the Consul call to HAProxy)"


def as_dict(result: CatalogResult) -> dict[str, object]:
    return asdict(result)
