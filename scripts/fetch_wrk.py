#!/usr/bin/env python3
"""Make `wrk`, the bench's load generator, available as .tools/bin/wrk, without touching the system.

Order of preference: a `wrk` on PATH; .tools/bin/wrk from an earlier run; this machine's Debian
release's `wrk` and `libluajit-5.1-2` packages fetched with `apt-get download` (fetch_deb.py), the
binary in .tools/libexec and the library in .tools/lib/wrk, started by a small wrapper script that
points the loader there. Only `make bench` asks for it, and it is not required: when it cannot be
had this says why and exits 0, and the bench uses its Python load instead (bench/load.py), which
takes most of a core itself. Its results name the load that ran.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fetch_deb import can_fetch, debian_sources, extract_member, fetch_debs, system_suite

PACKAGES = ["wrk", "libluajit-5.1-2"]
WRAPPER = """#!/bin/sh
# wrk from Debian's package, with its LuaJIT library beside it (scripts/fetch_wrk.py)
here=$(cd "$(dirname "$0")/.." && pwd)
LD_LIBRARY_PATH="$here/lib/wrk${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/libexec/wrk" "$@"
"""
FALLBACK = "the bench will use its Python load instead (install wrk, e.g. `apt-get install wrk`, for the real one)"


def works(binary: str) -> bool:
    """`wrk -v` prints its version (and exits 1: it wants a URL)."""
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.startswith("wrk ")


def install(tools: Path, debs: list[Path]) -> Path:
    wrk_deb, luajit_deb = debs
    extract_member(wrk_deb, "usr/bin/wrk", tools / "libexec/wrk")
    extract_member(luajit_deb, "usr/lib/*/libluajit-5.1.so.2", tools / "lib/wrk/libluajit-5.1.so.2")
    target = tools / "bin/wrk"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(WRAPPER)
    target.chmod(0o755)
    return target


def main() -> int:
    tools = Path(sys.argv[1] if len(sys.argv) > 1 else ".tools").resolve()
    target = tools / "bin/wrk"
    on_path = shutil.which("wrk")
    if on_path and Path(on_path).resolve() != target.resolve() and works(on_path):
        print(f"fetch-wrk: using {on_path} from PATH")
        return 0
    if target.exists() and works(str(target)):
        return 0
    suite = system_suite()
    if not can_fetch() or suite is None:
        print(f"fetch-wrk: not a Debian machine with apt-get and dpkg-deb: {FALLBACK}", file=sys.stderr)
        return 0
    errors = []
    for source in debian_sources():
        try:
            installed = install(tools, fetch_debs(tools, source, suite, PACKAGES, "fetch-wrk"))
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, RuntimeError, OSError) as err:
            errors.append(f"{source.uri}: {err}")
            continue
        if works(str(installed)):
            print(f"fetch-wrk: {installed}")
            return 0
        errors.append(f"{source.uri}: the fetched wrk does not start")
    why = "; ".join(errors) or "no Debian mirror in /etc/apt sources"
    print(f"fetch-wrk: could not fetch Debian's wrk ({why}): {FALLBACK}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
