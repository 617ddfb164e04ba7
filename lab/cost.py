"""What the renderers cost the Consul servers, by number of load balancers (issue #20, item 4).

    python -m lab.cost --balancers 2                the lab with 2 load balancers (renderers on HTTPS, HTTP/2)
    python -m lab.cost --balancers 6
    python -m lab.cost --balancers 2 --plain-http   the renderers on their agent's plain HTTP port

Starts the lab (lab.cluster, root) with N load balancers, adds F filler services of I instances
each through the catalog API (made-up nodes, closed ports on the idle client host: HAProxy marks
them down, the file stays valid), waits until every balancer has every server and serves `web`,
then counts over two phases of slots of `cadence` seconds (6.2 s):

  1. idle (50 slots, 310 s): nothing changes;
  2. changes (K = 20 slots): at the start of each slot an instance is registered, or
     deregistered again, through web1's agent, alternately of `web` (the same, busy service) and
     of a filler (each time another, quiet one), and waited for in every balancer's file.

Counted per slot: on each server, Consul's own counters (`GET /v1/agent/metrics
?format=prometheus`: cumulative, unlike the JSON form, which holds only the current 10 s
interval; the agents get `telemetry { prometheus_retention_time }` for it); on each balancer, its
agent's `client.rpc` and the HTTP requests it answered, by endpoint (counted when answered: a
blocking query when it returns), the renderer's `consul_renderer_consul_requests` (counted when
sent) and the bytes on the host's loopback (renderer <-> agent); the bytes on each server's link
(raft and gossip included).

At rest the renderers' cost is their blocking queries coming back empty and being sent again:
every watched key once per wait plus Consul's jitter of up to wait/16, i.e. ~619 s over HTTP/2
(renderer.source.h2.BLOCK_WAIT_S) and ~62 s over HTTP/1.1 (where, past 62 keys, only a few
catalog-wide queries are held, and a full re-read runs every `reconcile_interval`, 5 min). The
fillers' watches all start when the fillers appear, so those re-sends come in one wave. The idle
phase runs from 150 s to 460 s after the fillers appeared: five periods over HTTP/1.1, and no
wave over HTTP/2 in either phase (the first comes at 600-638 s, after the run; with 5-minute
waits, before 42b53cd, the idle phase held one): over HTTP/2, add one wave per ~10 minutes to the
idle rate. Per minute comes from the whole idle phase; per change from medians of slots (a slot
that catches a wave moves the mean, not the median), set against the idle slots' median.
Writes .run/lab/cost-N<n>-<proto>.json and prints a table; every process and namespace is gone
at the end (the JSON says so).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from lab import CHECKOUT
from lab.cluster import STATUS_AUTH, Agent, Balancer, Cluster, run_as_lab_script
from lab.processes import consul_version, find_consul, http_get, wait_until
from renderer.haproxy.binaries import find_haproxy, wheel_haproxy

RUN = CHECKOUT / ".run" / "lab"
TELEMETRY = 'telemetry { prometheus_retention_time = "1h" disable_hostname = true }'
SERVER_COUNTERS = {  # our name -> Prometheus series, on each server
    "rpc.request": "consul_rpc_request",  # RPCs it served on its RPC port (a forwarded read: on both hops)
    "rpc.query": "consul_rpc_query",  # reads it ran itself (blocking or not)
    "rpc.consistentRead": "consul_rpc_consistentRead_count",  # leader reads that checked leadership
    "raft.apply": "consul_raft_apply",  # writes (leader)
    "rpc.request_error": "consul_rpc_request_error",
}
# Blocking queries in flight, as Consul sets it: only when one starts, never when one ends, so a
# server that gets no new ones (its agents moved to another server) keeps showing its old number.
SERVER_GAUGES = {"rpc.queries_blocking": "consul_rpc_queries_blocking"}
AGENT_COUNTERS = {"agent.client.rpc": "consul_client_rpc", "agent.client.rpc.failed": "consul_client_rpc_failed"}
# One summary per method and path: every HTTP answer but ours (the metrics read for this count).
AGENT_HTTP = re.compile(r"consul_http_[A-Z]+_(?!v1_agent_metrics_count)\S*_count")
RENDERER_COUNTER = "consul_renderer_consul_requests_total"
CLOSED_PORT_BASE = 20000  # fillers "listen" on the client host, where nothing does
FILLER_NODE = "filler-node-{k}"


# --- what is counted -------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Counter values per host (servers; balancers: agent, renderer, loopback bytes). A sample
    holds readings, `since()` turns two samples into the deltas of the time between them."""

    seconds: float
    servers: dict[str, dict[str, float]]
    balancers: dict[str, dict[str, float]]

    def since(self, earlier: Counts) -> Counts:
        def minus(now: dict[str, dict[str, float]], then: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
            return {
                host: {k: v if k in SERVER_GAUGES else v - then[host].get(k, 0.0) for k, v in values.items()}
                for host, values in now.items()
            }

        return Counts(
            self.seconds - earlier.seconds,
            minus(self.servers, earlier.servers),
            minus(self.balancers, earlier.balancers),
        )

    def hosts(self, group: str) -> dict[str, dict[str, float]]:
        return self.servers if group == "servers" else self.balancers

    def total(self, group: str, key: str) -> float:
        return sum(values.get(key, 0.0) for values in self.hosts(group).values())


def prometheus_values(text: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                continue
    return values


def get_text(url: str, login: str | None = None) -> str:
    headers = {"Authorization": f"Basic {base64.b64encode(login.encode()).decode()}"} if login else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        return str(resp.read().decode())


def link_bytes(link: str) -> tuple[float, float]:
    """(into the host, out of it) on its veth, read on the root (switch) side."""
    stats = Path("/sys/class/net") / link / "statistics"
    return float((stats / "tx_bytes").read_text()), float((stats / "rx_bytes").read_text())


def loopback_bytes(namespace: str) -> float:
    out = subprocess.run(["ip", "-n", namespace, "-s", "-j", "link", "show", "lo"], capture_output=True, timeout=10)
    return float(json.loads(out.stdout)[0]["stats64"]["tx"]["bytes"])


def sample(cluster: Cluster) -> Counts:
    servers: dict[str, dict[str, float]] = {}
    for server in cluster.servers:
        found = prometheus_values(get_text(f"{server.http}/v1/agent/metrics?format=prometheus"))
        values = {key: found.get(series, 0.0) for key, series in {**SERVER_COUNTERS, **SERVER_GAUGES}.items()}
        values["bytes.in"], values["bytes.out"] = link_bytes(server.host.link)
        servers[server.host.name] = values
    balancers: dict[str, dict[str, float]] = {}
    for lb in cluster.balancers:
        found = prometheus_values(get_text(f"{lb.agent.http}/v1/agent/metrics?format=prometheus"))
        values = {key: found.get(series, 0.0) for key, series in AGENT_COUNTERS.items()}
        answered = {name: v for name, v in found.items() if AGENT_HTTP.fullmatch(name)}
        values["agent.http"] = sum(answered.values())
        values.update({f"http:{name[len('consul_http_') : -len('_count')]}": v for name, v in answered.items()})
        values["renderer.requests"] = prometheus_values(get_text(f"{lb.status_url}/metrics", STATUS_AUTH))[
            RENDERER_COUNTER
        ]
        values["lo.bytes"] = loopback_bytes(lb.host.namespace)
        balancers[lb.host.name] = values
    return Counts(time.monotonic(), servers, balancers)


# --- the lab with counters and a catalog ----------------------------------------------------


@dataclass
class MeteredCluster(Cluster):
    """The lab, every agent keeping cumulative Prometheus counters for `/v1/agent/metrics`."""

    def agent_command(self, agent: Agent) -> list[str]:
        return [*super().agent_command(agent), "-hcl", TELEMETRY]


def register_fillers(cluster: Cluster, services: int, instances: int) -> None:
    """`services` services `filler-001`… tagged `lb`, instance k on node filler-node-k, no checks."""
    assert cluster.client is not None
    for s in range(1, services + 1):
        for k in range(1, instances + 1):
            name = f"filler-{s:03d}"
            service = {"ID": f"{name}-{k}", "Service": name, "Tags": ["lb"], "Port": CLOSED_PORT_BASE + s}
            body = {"Node": FILLER_NODE.format(k=k), "Address": cluster.client.address, "Service": service}
            cluster.servers[0].put("/v1/catalog/register", body)


def has_servers(lb: Balancer, servers: int) -> bool:
    return lb.servers_in_file() == servers


def serving(lb: Balancer, servers: int) -> bool:
    return has_servers(lb, servers) and http_get(lb.url)[0] == 200


@dataclass(frozen=True)
class Change:
    service: str
    instance: str
    register: bool


def plan_changes(count: int, fillers: int) -> list[Change]:
    """Pairs (register, deregister), alternately of `web` and of the next filler."""
    changes: list[Change] = []
    for pair in range(math.ceil(count / 2)):
        service = "web" if pair % 2 == 0 or fillers == 0 else f"filler-{(pair // 2) % fillers + 1:03d}"
        instance = f"{service}-cost-{pair}"
        changes += [Change(service, instance, True), Change(service, instance, False)]
    return changes[:count]


def make_change(cluster: Cluster, change: Change, port: int) -> None:
    web1 = cluster.web_hosts[0]
    if change.register:
        body = {"Name": change.service, "ID": change.instance, "Address": web1.host.address, "Port": port}
        web1.agent.put("/v1/agent/service/register", {**body, "Tags": ["lb"]})
    else:
        web1.deregister(change.instance)


# --- the phases ------------------------------------------------------------------------------


@dataclass
class Slot:
    """`cadence` seconds of a phase: its counts, and the change made at its start, if any."""

    counts: Counts
    change: Change | None = None
    reach_ms: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Phase:
    """Idle or changes: the counts of the whole phase and of each slot."""

    total: Counts
    slots: list[Slot]


@dataclass
class Run:
    balancers: int
    proto: str
    settings: dict[str, object]
    consul: str
    load_before: tuple[float, ...]
    load_after: tuple[float, ...] = ()
    start_s: float = 0.0
    total_s: float = 0.0
    catalog: dict[str, int] = field(default_factory=dict)
    idle: Phase | None = None
    changes: Phase | None = None
    namespaces_left: list[str] = field(default_factory=list)


def run_phase(cluster: Cluster, changes: list[Change | None], base: int, cadence: float) -> Phase:
    """One slot of `cadence` seconds per entry, counted from just before its change (None: idle)
    to the start of the next; a change is waited for in every balancer's file (up to 30 s)."""
    slots = []
    first = before = sample(cluster)
    for n, change in enumerate(changes):
        began = time.monotonic()
        reach: dict[str, float | None] = {}
        if change is not None:
            make_change(cluster, change, CLOSED_PORT_BASE - 1 - n)
            want = base + (1 if change.register else 0)
            for lb in cluster.balancers:
                try:
                    wait_until(partial(has_servers, lb, want), 30, f"{lb.host.name}: {change}", 0.05)
                    reach[lb.host.name] = round((time.monotonic() - began) * 1000, 1)
                except TimeoutError:
                    reach[lb.host.name] = None
        time.sleep(max(0.0, began + cadence - time.monotonic()))
        after = sample(cluster)
        slots.append(Slot(after.since(before), change, reach))
        before = after
    return Phase(before.since(first), slots)


# --- the report ------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str]] = [  # label, group, key
    ("servers: rpc.request (sum of 3)", "servers", "rpc.request"),
    ("servers: rpc.query (sum of 3)", "servers", "rpc.query"),
    ("servers: raft.apply", "servers", "raft.apply"),
    ("servers: kB in (sum of links)", "servers", "bytes.in"),
    ("servers: kB out (sum of links)", "servers", "bytes.out"),
    ("lb agents: client.rpc (sum)", "balancers", "agent.client.rpc"),
    ("lb agents: HTTP answered (sum)", "balancers", "agent.http"),
    ("renderers: requests (sum)", "balancers", "renderer.requests"),
    ("renderers: kB on lo (sum)", "balancers", "lo.bytes"),
]


def figures(run: Run) -> dict[str, dict[str, float | None]]:
    """Per row: per idle minute (the whole phase); the idle slots' median and maximum (the wave);
    the change slots' median and mean (a slot that caught a wave moves the mean, not the median)
    and the medians of the `web` changes and of the filler changes apart."""
    assert run.idle is not None and run.changes is not None
    idle = run.idle
    rows: list[tuple[str, str, str]] = [*ROWS]
    rows += [(f"  renderer {lb}", "balancers", f"renderer.requests@{lb}") for lb in idle.total.balancers]
    rows += [(f"  {srv}: rpc.request", "servers", f"rpc.request@{srv}") for srv in idle.total.servers]
    table: dict[str, dict[str, float | None]] = {}
    for label, group, key in rows:
        quiet = [value(slot.counts, group, key) for slot in idle.slots]
        changed = [(slot, value(slot.counts, group, key)) for slot in run.changes.slots]
        table[label] = {
            "idle_per_min": round(value(idle.total, group, key) * 60 / idle.total.seconds, 1),
            "idle_median": rounded(statistics.median, quiet),
            "idle_max": rounded(max, quiet),
            "change_median": rounded(statistics.median, [v for _, v in changed]),
            "change_mean": rounded(statistics.fmean, [v for _, v in changed]),
            "median_web": rounded(statistics.median, [v for slot, v in changed if is_web(slot)]),
            "median_filler": rounded(statistics.median, [v for slot, v in changed if not is_web(slot)]),
        }
    return table


def is_web(slot: Slot) -> bool:
    return slot.change is not None and slot.change.service == "web"


def endpoints(slots: list[Slot]) -> dict[str, float]:
    """The lb agents' HTTP answers per slot by endpoint, summed over balancers: medians, non-zero."""
    keys = sorted({k for slot in slots for v in slot.counts.balancers.values() for k in v if k.startswith("http:")})
    medians = {k[5:]: statistics.median(slot.counts.total("balancers", k) for slot in slots) for k in keys}
    return {k: v for k, v in medians.items() if v}


def value(counts: Counts, group: str, key: str) -> float:
    """`key` summed over the group's hosts, or `key@host` for one; bytes in kB."""
    scale = 1 / 1024 if "bytes" in key else 1.0
    if "@" in key:
        key, host = key.split("@")
        return counts.hosts(group)[host].get(key, 0.0) * scale
    return counts.total(group, key) * scale


def rounded(stat: Callable[[list[float]], float], values: list[float]) -> float | None:
    return round(stat(values), 1) if values else None


def report(run: Run) -> tuple[dict[str, object], str]:
    assert run.idle is not None and run.changes is not None
    table = figures(run)
    web = [slot for slot in run.changes.slots if is_web(slot)]
    filler = [slot for slot in run.changes.slots if not is_web(slot)]
    reach = [ms for slot in run.changes.slots for ms in slot.reach_ms.values()]
    reached = [ms for ms in reach if ms is not None]
    series = {
        "servers": SERVER_COUNTERS | SERVER_GAUGES,
        "lb agents": {**AGENT_COUNTERS, "agent.http": AGENT_HTTP.pattern},
    }
    data = {
        **asdict(run),
        "series": {**series, "renderers": {"renderer.requests": RENDERER_COUNTER}},
        "table": table,
        "endpoints_per_slot": {"idle": endpoints(run.idle.slots), "web": endpoints(web), "filler": endpoints(filler)},
    }
    held = ", ".join(f"{h} {v['rpc.queries_blocking']:.0f}" for h, v in run.idle.total.servers.items())
    lines = [
        f"N={run.balancers} load balancers, renderers over {run.proto}; catalog {run.catalog}; Consul {run.consul}",
        f"{len(run.idle.slots)} idle slots, then {len(run.changes.slots)} with a change each, "
        f"{run.settings['cadence']} s each (idle {run.idle.total.seconds:.1f} s from {run.settings['idle_from']} s "
        f"after the fillers, "
        f"changes {run.changes.total.seconds:.1f} s); "
        f"a change in every balancer's file after median {rounded(statistics.median, reached)} ms, "
        f"max {max(reached, default=None)} ms; {len(reach) - len(reached)} never",
        f"rpc.queries_blocking at the end of idle (as of each server's latest blocking query): {held}",
        f"lb agents' HTTP answers per slot by endpoint (medians, all balancers): idle {endpoints(run.idle.slots)}; "
        f"a web change {endpoints(web)}; a filler change {endpoints(filler)}",
        f"{'per slot':34} {'idle/min':>9} {'idle med':>8} {'idle max':>8} {'chg med':>8} {'chg avg':>8} "
        f"{'med web':>8} {'med fill':>8}",
    ]
    for label, row in table.items():
        cells = [f"{c:8.1f}" if c is not None else f"{'-':>8}" for c in row.values()]
        lines.append(f"{label:34} {cells[0]:>9} {' '.join(cells[1:])}")
    lines.append(
        f"load average before {run.load_before}, after {run.load_after}; start {run.start_s} s, total {run.total_s} s"
    )
    return data, "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, progress: Callable[[str], None]) -> Run:
    proto = "http" if args.plain_http else "h2"
    workdir = RUN / f"cost-N{args.balancers}-{proto}"
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh cluster: no raft data of an earlier run
    workdir.mkdir(parents=True)
    consul_bin = find_consul()
    settings = {k: v for k, v in vars(args).items() if k != "balancers"}
    run = Run(args.balancers, proto, settings, consul_version(consul_bin), os.getloadavg())
    began = time.monotonic()
    cluster = MeteredCluster(
        workdir,
        consul_bin,
        wheel_haproxy() or find_haproxy(),
        apps_per_host=args.apps_per_host,
        balancer_count=args.balancers,
        web_host_count=args.web_hosts,
        renderer_https=not args.plain_http,
    )
    try:
        cluster.start(progress)
        progress(f"fillers: {args.fillers} services x {args.instances} instances through the catalog API")
        register_fillers(cluster, args.fillers, args.instances)
        registered = time.monotonic()
        base = len(cluster.all_apps()) + args.fillers * args.instances
        run.catalog = {"services": args.fillers + 1, "instances": base}
        for lb in cluster.balancers:
            wait_until(partial(serving, lb, base), 180, f"{lb.host.name} to serve {base} servers", 0.2)
            on_h2 = "over HTTP/2" in lb.renderer_log()
            if on_h2 == args.plain_http:
                raise RuntimeError(f"{lb.host.name}: the renderer is {'' if on_h2 else 'not '}on HTTP/2")
        run.start_s = round(time.monotonic() - began, 1)
        progress(f"every balancer serves {base} servers; idle from {args.idle_from} s after the fillers")
        time.sleep(max(0.0, registered + args.idle_from - time.monotonic()))
        progress(f"idle: {args.idle_slots} slots of {args.cadence} s")
        run.idle = run_phase(cluster, [None] * args.idle_slots, base, args.cadence)
        progress(f"{args.changes} changes, one per {args.cadence} s")
        run.changes = run_phase(cluster, [*plan_changes(args.changes, args.fillers)], base, args.cadence)
    finally:
        progress("stopping every process and removing every namespace")
        cluster.stop()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    run.namespaces_left = [line.split()[0] for line in listed.splitlines() if line.startswith("crl-")]
    run.load_after = os.getloadavg()
    run.total_s = round(time.monotonic() - began, 1)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--balancers", type=int, default=2, help="load balancers (1-10)")
    parser.add_argument("--plain-http", action="store_true", help="renderers on the agents' plain HTTP port")
    parser.add_argument("--fillers", type=int, default=100, help="filler services (tagged lb)")
    parser.add_argument("--instances", type=int, default=3, help="instances per filler service")
    parser.add_argument("--web-hosts", type=int, default=3)
    parser.add_argument("--apps-per-host", type=int, default=2)
    parser.add_argument("--changes", type=int, default=20, help="K changes (register/deregister pairs)")
    parser.add_argument("--cadence", type=float, default=6.2, help="seconds per change")
    parser.add_argument("--idle-slots", type=int, default=50, help="idle slots (50 x 6.2 s: one HTTP/2 wait)")
    parser.add_argument("--idle-from", type=float, default=150.0, help="idle phase start, s after the fillers")
    args = parser.parse_args(argv)
    run = run_as_lab_script(partial(measure, args))
    if run is None:
        return 1
    data, table = report(run)
    out = RUN / f"cost-N{run.balancers}-{run.proto}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(table)
    print(f"written: {out}" + (f"; NAMESPACES LEFT: {run.namespaces_left}" if run.namespaces_left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
