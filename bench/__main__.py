"""`make bench`: every set-up side by side, JSON in bench/results/, a short table on stdout.

python -m bench [--events 50] [--only ours-auto,dns-tuned] [--sizes 10,100,1000] [--skip-scale]
                [--scale-events 30] [--cold-changes 40] [--soak 1000] [--protocols http,h2] [--idle-seconds 65]
                [--hostile-seconds 180] [--skip-hostile]

Every figure separates cold changes (the service's first change in the run) from hot ones, and
counts timeouts instead of dropping them; JSON has no NaN (null where nothing was measured).
The scale part runs each size once per protocol: plain HTTP/1.1, and HTTP/2 on an HTTPS agent.
The JSON's `targets` holds issue #20's targets with their verdicts (bench/targets.py), also
printed; the exit status is 1 when any is MISSED ("not measured" does not fail a run).
The hostile part (bench/hostile.py) runs one registrant's storms and times what they cost the
other services; its promises are judged with the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.agent import parse_protocols
from bench.catalog import IDLE_S, CatalogResult, measure
from bench.churn import PROBE_GAP_S
from bench.convergence import SetupResult, run_setup
from bench.hostile import STORM_S, HostileResult
from bench.hostile import run as run_hostile
from bench.hostile import table as hostile_table
from bench.load import WrkLoad
from bench.scale_table import table as scale_table
from bench.setups import SETUPS
from bench.stats import finite, ms_cell
from bench.targets import Target, check, exit_code
from bench.targets import table as targets_table
from lab.processes import consul_version, find_consul
from renderer.haproxy.binaries import find_haproxy, haproxy_version, wheel_haproxy

RESULTS = Path(__file__).resolve().parent / "results"


def table(results: list[SetupResult]) -> str:
    head = (
        f"{'set-up':<12} {'cold ms':>8} {'hot add p50/p95/max':>20} {'hot remove p50/p95/max':>23} {'t/o':>4} "
        f"{'failed':>7} {'reqs':>8} {'reloads':>8} {'procs':>6}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        first = ms_cell(r.first_change.max_ms, r.first_change.count)
        rows.append(
            f"{r.name:<12} {first:>8} {r.add.hot.cell():>20} {r.remove.hot.cell():>23} {r.timeouts:>4} "
            f"{r.failed_requests:>7} {r.requests:>8} {r.reloads:>8} {r.haproxy_processes_at_end:>6}"
        )
    return "\n".join(rows) + "\n(cold: the first change after start; times in ms; TO: a timeout falls there)"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50, help="add+remove events per set-up (2 changes each)")
    parser.add_argument("--only", help="comma-separated set-up names")
    parser.add_argument("--sizes", default="10,100,1000", help="catalog sizes: services of 10 instances each")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-events", type=int, default=30, help="hot events per size (4 changes each)")
    parser.add_argument(
        "--cold-changes", type=int, default=40, help="cold changes per size, one per untouched service (at most)"
    )
    parser.add_argument("--acl-routing", action="store_true", help="scale: route with ACLs, not the routing map")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=IDLE_S,
        help="scale: the idle window (requests and RPCs per idle minute, idle CPU); under 64 s it misses the "
        "expiry of the blocking queries",
    )
    parser.add_argument(
        "--soak", type=int, default=1000, help="membership changes of the soak at the largest size (each protocol)"
    )
    parser.add_argument(
        "--protocols",
        default="http,h2",
        type=parse_protocols,
        help="scale: how the renderer talks to the agent, each size once per protocol: http (HTTP/1.1 on the "
        "agent's HTTP port), h2 (HTTP/2 on its HTTPS port)",
    )
    parser.add_argument(
        "--probe-gap-ms",
        type=float,
        default=PROBE_GAP_S * 1000,
        help="scale: each timing probe thread's pause between requests (0: back to back, as before 2026-12-01)",
    )
    parser.add_argument(
        "--block-wait",
        default="",
        help="scale: the renderer's --block-wait and the agent's max_query_time to match, e.g. 2h (default: "
        "both unset: 60s over HTTP/1.1, 10m over HTTP/2)",
    )
    parser.add_argument("--skip-hostile", action="store_true", help="skip the hostile part (one registrant's storms)")
    parser.add_argument(
        "--hostile-seconds",
        type=float,
        default=STORM_S,
        help="hostile: how long the storms run before the timed changes",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) and print its path")
    args = parser.parse_args()
    # A stop (a CI timeout, `kill`) goes through every `finally`: Consul, HAProxy, the renderer and
    # wrk were left running when the bench was killed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    consul_bin = find_consul()
    haproxy_bin = wheel_haproxy() or find_haproxy()
    chosen = [s for s in SETUPS if not args.only or s.name in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="consul-renderer-bench-"))
    results: list[SetupResult] = []
    scale: list[CatalogResult] = []
    hostile: list[HostileResult] = []
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    base = {
        "machine": {"cpus": os.cpu_count() or 0, "platform": platform.platform(), "python": platform.python_version()},
        "consul": consul_version(consul_bin),
        "haproxy": haproxy_version(haproxy_bin),
        "load": "wrk -t1 -c4 (keep-alive)" if WrkLoad.available() else "python threads",
        "events_per_setup": args.events,
        "scale_settings": {
            "sizes": args.sizes,
            "protocols": [str(p) for p in args.protocols],
            "hot_events": args.scale_events,
            "cold_changes": args.cold_changes,
            "idle_seconds": args.idle_seconds,
            "probe_gap_ms": args.probe_gap_ms,
            "block_wait": args.block_wait or None,
        },
        "soak_changes": args.soak,
        "hostile_seconds": None if args.skip_hostile else args.hostile_seconds,
    }

    def save() -> list[Target]:
        """After every stage: a failure later never loses what was measured (nor its verdicts)."""
        report = {**base, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        report |= {"convergence": [asdict(r) for r in results], "scale": [asdict(r) for r in scale]}
        report |= {"hostile": asdict(hostile[0]) if hostile else None}
        data = json.loads(json.dumps(finite(report), allow_nan=False))  # judged as saved, as a re-check reads it
        targets = check(data)
        data["targets"] = [asdict(t) for t in targets]
        out.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
        return targets

    finished = False
    try:
        for setup in chosen:
            print(f"{setup.name}: {setup.description}", file=sys.stderr, flush=True)
            results.append(run_setup(setup, workdir / setup.name, consul_bin, haproxy_bin, args.events))
            save()
        if not args.skip_scale:
            sizes = [int(s) for s in args.sizes.split(",")]
            for size in sizes:
                for protocol in args.protocols:
                    print(f"scale: {size} services × 10 instances over {protocol}", file=sys.stderr, flush=True)
                    scale.append(
                        measure(
                            size,
                            workdir / f"scale-{size}-{protocol}",
                            consul_bin,
                            haproxy_bin,
                            args.scale_events,
                            soak_changes=args.soak if size == max(sizes) else 0,
                            maps=not args.acl_routing,
                            cold_changes=args.cold_changes,
                            protocol=protocol,
                            idle_s=args.idle_seconds,
                            probe_gap_s=args.probe_gap_ms / 1000,
                            block_wait=args.block_wait,
                        )
                    )
                    save()
        if not args.skip_hostile:
            print(f"hostile: one registrant's storms for {args.hostile_seconds:g} s", file=sys.stderr, flush=True)
            hostile.append(run_hostile(workdir / "hostile", consul_bin, haproxy_bin, args.hostile_seconds))
            save()
        finished = True
    finally:
        if args.keep or not finished:  # a failed run keeps the logs that explain it
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if results:
        print(table(results))
    if scale:
        print()
        print(scale_table(scale, args.probe_gap_ms))
    if hostile:
        print()
        print(hostile_table(hostile[0]))
    targets = save()
    print()
    print(targets_table(targets))
    print(f"\nJSON: {out}")
    return exit_code(targets)


if __name__ == "__main__":
    sys.exit(main())
