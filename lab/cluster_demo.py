"""`make demo-cluster`: the production topology on this machine, in network namespaces (root).

    python -m lab                 start it; Ctrl-C stops every process and removes every namespace
    python -m lab --no-load       without the client host's constant load

3 Consul servers (UI on each), 2 load balancers (client agent + HAProxy + the renderer), 3 web
hosts (client agent + 2 web apps each), a client host sending load through both balancers. Try
what the tests do, by hand, from another shell:

    ip netns exec crl-<host> <command>       run anything on a host (e.g. `ss -tlnp`)
    ip link set crl-web3 down / up           pull / plug web3's cable
    kill -9 <pid of a server>                see the pids in the banner
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from lab import CHECKOUT
from lab.cluster import CONSUL_HTTP, CONSUL_HTTPS, HTTP_PORT, STATS_PORT, Cluster
from lab.netns import NetworkError, take_over_leftovers
from lab.observe import Window
from lab.processes import find_consul
from renderer.haproxy.binaries import find_haproxy, wheel_haproxy

RUN = CHECKOUT / ".run" / "lab" / "demo"  # its own folder: the other lab runs' figures stay


def banner(cluster: Cluster, load_log: Path | None) -> str:
    lines = ["", "  hosts (reachable from this machine over the lab bridge):"]
    for server in cluster.servers:
        pid = server.process.pid if server.process else "-"
        name, address = server.host.name, server.host.address
        lines.append(f"    {name:<7} {address:<12} Consul server, UI {server.http}/ui/ (pid {pid})")
    for lb in cluster.balancers:
        lines.append(
            f"    {lb.host.name:<7} {lb.host.address:<12} app {lb.url}  stats http://{lb.host.address}:{STATS_PORT}/"
            f"  renderer {lb.status_url}/status"
        )
    for web in cluster.web_hosts:
        lines.append(f"    {web.host.name:<7} {web.host.address:<12} agent :{CONSUL_HTTP}, apps {', '.join(web.apps)}")
    if cluster.client is not None:
        lines.append(f"    {'client':<7} {cluster.client.address:<12} load → both balancers on :{HTTP_PORT}")
    if cluster.tls is not None:
        lines.append(
            f"  every agent also serves HTTPS on :{CONSUL_HTTPS} (CA {cluster.tls.ca_file}); the renderers use it"
        )
    lines += [
        "",
        f"  logs and rendered files: {cluster.workdir}/<host>/",
        f"  load log: {load_log}" if load_log else "  no load (--no-load)",
        "  Ctrl-C stops everything. A status line follows every 5 s:",
        "",
    ]
    return "\n".join(lines)


def status_line(cluster: Cluster, load_log: Path | None, since: float) -> str:
    leader = cluster.leader() or "none (election?)"
    parts = [f"leader {leader}"]
    for lb in cluster.balancers:
        try:
            parts.append(f"{lb.host.name} {lb.servers_in_file()} servers, {lb.status()['check']}")
        except OSError as err:
            parts.append(f"{lb.host.name} unreachable ({err})")
    if load_log is not None:
        window = Window.read(load_log, since, time.time())
        parts.append(f"load {window.ok} ok / {window.failed} failed in the last 5 s")
    return time.strftime("%H:%M:%S ") + " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.splitlines()[0])
    parser.add_argument("--no-load", action="store_true", help="no constant load from the client host")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the lab needs root (network namespaces, veth, a bridge); run it with sudo", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        take_over_leftovers()  # before anything is removed: another live lab run keeps its files
    except NetworkError as err:
        print(err, file=sys.stderr)
        return 1
    shutil.rmtree(RUN, ignore_errors=True)  # a fresh cluster: no raft data of an earlier run
    RUN.mkdir(parents=True)
    cluster = Cluster(RUN, find_consul(), wheel_haproxy() or find_haproxy())
    load_log = None if args.no_load else RUN / "load.jsonl"
    try:
        began = time.monotonic()
        cluster.start(progress=lambda line: print(f"[{time.monotonic() - began:5.1f}s] {line}", flush=True))
        if load_log is not None:
            load_log.unlink(missing_ok=True)
            cluster.start_load(load_log)
        print(banner(cluster, load_log), flush=True)
        while not stop.wait(5.0):
            print(status_line(cluster, load_log, time.time() - 5), flush=True)
    except (NetworkError, RuntimeError, TimeoutError) as err:
        print(f"the lab could not start: {err}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping every process and removing every namespace ...", flush=True)
        cluster.stop()
        print(f"lab stopped; logs stay in {RUN}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
