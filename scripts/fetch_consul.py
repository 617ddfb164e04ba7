#!/usr/bin/env python3
"""Make a Consul agent binary available in .tools/bin/consul, without touching the system.

Order of preference:
1. A `consul` on PATH whose version is 1.8 or newer: nothing to do.
2. .tools/bin/consul already extracted by an earlier run: nothing to do (no download).
3. Debian 11's `consul` package (Consul 1.8.7, a real agent with its web UI), fetched with
   `apt-get download` from the Debian mirror this machine's own apt sources use, with the suite
   `bullseye`, through a private sources list and private lists/cache directories (fetch_deb.py).

It never writes the system's apt state and never names a mirror itself: the mirror comes from the
machine's apt configuration. When nothing works it says what is missing and how to get it, exit 3.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from fetch_deb import can_fetch, debian_sources, extract_member, fetch_debs

MIN_VERSION = (1, 8)
SUITE = "bullseye"
HELP = (
    "Install Consul 1.8 or newer and put `consul` on PATH (https://developer.hashicorp.com/consul/install), "
    "or run this on a Debian/Ubuntu machine whose apt sources include a Debian mirror."
)


def consul_version(binary: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"Consul v(\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def main() -> int:
    tools = Path(sys.argv[1] if len(sys.argv) > 1 else ".tools").resolve()
    target = tools / "bin/consul"
    on_path = shutil.which("consul")
    if on_path and (consul_version(on_path) or (0, 0)) >= MIN_VERSION:
        print(f"fetch-consul: using {on_path} from PATH")
        return 0
    if target.exists() and consul_version(str(target)):
        return 0
    if not can_fetch():
        print(f"fetch-consul: no consul >= 1.8 on PATH and no apt-get/dpkg-deb here. {HELP}", file=sys.stderr)
        return 3
    sources = debian_sources()
    if not sources:
        print(f"fetch-consul: no Debian mirror in /etc/apt sources. {HELP}", file=sys.stderr)
        return 3
    errors = []
    for source in sources:
        try:
            (deb,) = fetch_debs(tools, source, SUITE, ["consul"], "fetch-consul")
            extract_member(deb, "usr/bin/consul", target)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
            errors.append(f"{source.uri}: {err}")
            continue
        print(f"fetch-consul: {target} ({'.'.join(map(str, consul_version(str(target)) or ()))})")
        return 0
    print("fetch-consul: could not fetch Debian's consul package: " + "; ".join(errors), file=sys.stderr)
    print(HELP, file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
