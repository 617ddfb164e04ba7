"""`make bench`: every set-up side by side, JSON in bench/results/, a short table on stdout.

python -m bench [--events 50] [--only ours-auto,dns-tuned] [--sizes 10,100,1000] [--skip-scale]
                [--scale-events 30] [--soak 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.catalog import CatalogResult, measure
from bench.catalog import table as scale_table
from bench.convergence import SetupResult, run_setup
from bench.load import WrkLoad
from bench.setups import SETUPS
from lab.processes import consul_version, find_consul
from renderer.haproxy.binaries import find_haproxy, haproxy_version, wheel_haproxy

RESULTS = Path(__file__).resolve().parent / "results"


def table(results: list[SetupResult]) -> str:
    head = f"{'set-up':<12} {'add med/p95/max ms':>22} {'remove med/p95/max ms':>24} {'failed':>7} {'reqs':>8} {'reloads':>8} {'procs':>6}"  # noqa: E501
    rows = [head, "-" * len(head)]
    for r in results:
        add = f"{r.add.median_ms:.0f}/{r.add.p95_ms:.0f}/{r.add.max_ms:.0f}"
        rem = f"{r.remove.median_ms:.0f}/{r.remove.p95_ms:.0f}/{r.remove.max_ms:.0f}"
        rows.append(
            f"{r.name:<12} {add:>22} {rem:>24} {r.failed_requests:>7} {r.requests:>8} {r.reloads:>8} "
            f"{r.haproxy_processes_at_end:>6}"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50, help="add+remove events per set-up (2 changes each)")
    parser.add_argument("--only", help="comma-separated set-up names")
    parser.add_argument("--sizes", default="10,100,1000", help="catalog sizes: services of 10 instances each")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--scale-events", type=int, default=30, help="events per size (4 changes each)")
    parser.add_argument("--acl-routing", action="store_true", help="scale: route with ACLs, not the routing map")
    parser.add_argument("--soak", type=int, default=1000, help="membership changes of the soak at the largest size")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs) and print its path")
    args = parser.parse_args()
    consul_bin = find_consul()
    haproxy_bin = wheel_haproxy() or find_haproxy()
    chosen = [s for s in SETUPS if not args.only or s.name in args.only.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="consul-renderer-bench-"))
    results: list[SetupResult] = []
    scale: list[CatalogResult] = []
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    base = {
        "machine": {"cpus": os.cpu_count() or 0, "platform": platform.platform(), "python": platform.python_version()},
        "consul": consul_version(consul_bin),
        "haproxy": haproxy_version(haproxy_bin),
        "load": "wrk -t1 -c4 (keep-alive)" if WrkLoad.available() else "python threads",
        "events_per_setup": args.events,
    }

    def save() -> None:
        """After every stage: a failure later never loses what was measured."""
        report = {**base, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        report |= {"convergence": [asdict(r) for r in results], "scale": [asdict(r) for r in scale]}
        out.write_text(json.dumps(report, indent=2) + "\n")

    try:
        for setup in chosen:
            print(f"{setup.name}: {setup.description}", file=sys.stderr, flush=True)
            results.append(run_setup(setup, workdir / setup.name, consul_bin, haproxy_bin, args.events))
            save()
        if not args.skip_scale:
            sizes = [int(s) for s in args.sizes.split(",")]
            for size in sizes:
                print(f"scale: {size} services × 10 instances", file=sys.stderr, flush=True)
                soak = args.soak if size == max(sizes) else 0
                scale.append(
                    measure(
                        size,
                        workdir / f"scale-{size}",
                        consul_bin,
                        haproxy_bin,
                        args.scale_events,
                        soak,
                        not args.acl_routing,
                    )
                )
                save()
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if results:
        print(table(results))
    if scale:
        print()
        print(scale_table(scale))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
