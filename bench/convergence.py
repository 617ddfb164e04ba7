"""Convergence and failed requests during membership churn, for one set-up.

Each event registers a spare instance (no Consul check, so it is passing from the moment the agent
accepts it), times its first response through HAProxy, then deregisters it and times its last
response (an instance the probe never saw, or one still answering after the deadline, is a
timeout, counted and shown, never a time). The first change after start is cold, every later one
hot (the service `web` changed before), and they are reported apart. Meanwhile wrk (or the Python
fallback) keeps a constant load on the frontend and the probe's own requests count too: every
non-2xx answer or socket error is a failed request.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import LoadResult, Probe, constant_load
from bench.setups import Running, Setup
from bench.stats import Kind, Ledger, Split, Stats
from bench.timing import first_response, last_response
from lab.processes import (
    ConsulPorts,
    ManagedProcess,
    free_port,
    http_get,
    spawn,
    start_consul_dev,
    wait_until,
)

log = logging.getLogger(__name__)
BASE_INSTANCES = 3
SPARES = 4


@dataclass
class SetupResult:
    name: str
    description: str
    events: int
    changes: int
    add: Split
    remove: Split
    all_changes: Split
    first_change: Stats
    timeouts: int
    failed_requests: int
    requests: int
    load_tool: str
    reloads: int
    haproxy_processes_at_end: int
    failure_samples: list[str] = field(default_factory=list)


def consul_put(http_port: int, path: str, body: object | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", data=data, method="PUT")
    with urllib.request.urlopen(request, timeout=5):
        pass


def register(consul_http: int, instance: str, port: int) -> None:
    consul_put(
        consul_http,
        "/v1/agent/service/register",
        {"Name": "web", "ID": instance, "Address": "127.0.0.1", "Port": port, "Tags": ["lb"]},
    )


def start_backend(workdir: Path, instance: str) -> tuple[ManagedProcess, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "lab.webapp", "--port", str(port), "--id", instance]
    proc = spawn(instance, cmd, workdir / f"{instance}.log")
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, 10, f"{instance} to listen")
    return proc, port


def run_setup(setup: Setup, workdir: Path, consul_bin: str, haproxy_bin: str, events: int) -> SetupResult:
    workdir.mkdir(parents=True, exist_ok=True)
    started: list[ManagedProcess] = []
    running: Running | None = None
    try:
        ports = ConsulPorts.free()
        hcl = ("dns_config { only_passing = true }",)
        started.append(start_consul_dev(consul_bin, workdir / "consul.log", ports, hcl=hcl))
        backends = {}
        for n in range(1, BASE_INSTANCES + SPARES + 1):
            name = f"base-{n}" if n <= BASE_INSTANCES else f"spare-{n - BASE_INSTANCES}"
            proc, port = start_backend(workdir, name)
            started.append(proc)
            backends[name] = port
        for name, port in backends.items():
            if name.startswith("base-"):
                register(ports.http, name, port)
        running = setup.start(workdir / setup.name, f"127.0.0.1:{ports.http}", ports.dns, haproxy_bin)
        probe = Probe("127.0.0.1", running.http_port).start()
        wait_until(lambda: len(probe.last_seen) >= BASE_INSTANCES, 60, "all base instances answering")
        before = running.master.show_proc()
        load = constant_load("127.0.0.1", running.http_port).start()
        ledger = churn(probe, ports.http, backends, events, setup.name)
        result: LoadResult = load.stop()
        probe.stop()
        after = running.master.show_proc()
        return SetupResult(
            name=setup.name,
            description=setup.description,
            events=events,
            changes=2 * events,
            add=ledger.split(Kind.ADD),
            remove=ledger.split(Kind.REMOVE),
            all_changes=ledger.split(),
            first_change=ledger.first(),
            timeouts=ledger.timeouts,
            failed_requests=result.failed + len(probe.failures),
            requests=result.requests + probe.requests,
            load_tool=result.tool,
            reloads=after.reloads - before.reloads,
            haproxy_processes_at_end=1 + len(after.workers),
            failure_samples=probe.failures[:5],
        )
    finally:
        if running is not None:
            running.stop()
        for proc in reversed(started):
            proc.stop()


def churn(probe: Probe, consul_http: int, backends: dict[str, int], events: int, label: str) -> Ledger:
    """Every change is on the one service `web`: the first (an add) is cold, all others hot."""
    spares = [name for name in backends if name.startswith("spare-")]
    ledger = Ledger()
    for n in range(events):
        instance = spares[n % len(spares)]
        probe.forget(instance)
        register(consul_http, instance, backends[instance])
        t0 = time.monotonic()
        ledger.record("web", Kind.ADD, first_response(probe, instance, t0, 30))
        consul_put(consul_http, f"/v1/agent/service/deregister/{instance}")
        t1 = time.monotonic()
        ledger.record("web", Kind.REMOVE, last_response(probe, instance, t1, 60, quiet_s=0.5))
        print(f"\r  {label}: event {n + 1}/{events}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return ledger
