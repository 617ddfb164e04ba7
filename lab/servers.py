"""HAProxy's own server list, read back to back by a process of its own: what HAProxy held when.

`python -m lab.servers SOCKET BACKEND [INTERVAL]` sends `show servers state BACKEND` on SOCKET (a
stats socket; with `--master`, a master CLI, through `@1`) every INTERVAL seconds (default 2 ms).
It prints one line per change, and one every 100th sample: `MONOTONIC SAMPLES name,name!,…`
(`!`: in maintenance; CLOCK_MONOTONIC, which every process on the host shares), and
`MONOTONIC SAMPLES end` when stopped by SIGTERM or SIGINT. A process of its own, so that a test's
other threads (a load loop) never slow its sampling down.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from renderer.haproxy.control import send_command

# srv_admin_state bits that mean "in maintenance, no traffic" (HAProxy 2.8 include/haproxy/server-t.h:
# SRV_ADMF_FMAINT 0x01, IMAINT 0x02, CMAINT 0x04, RMAINT 0x20, HMAINT 0x40; drain 0x08/0x10 is not).
MAINTENANCE = 0x01 | 0x02 | 0x04 | 0x20 | 0x40


def servers_in(answer: str, backend: str) -> dict[str, bool]:
    """The servers of `backend` in a `show servers state` answer, each with whether it is in
    maintenance (none if HAProxy has no such backend)."""
    rows = [line.split() for line in answer.splitlines()[1:] if line.strip() and not line.startswith("#")]
    return {row[3]: bool(int(row[6]) & MAINTENANCE) for row in rows if len(row) > 6 and row[1] == backend}


def read(socket_path: str, backend: str, master: bool = False) -> dict[str, bool]:
    prefix = "@1 " if master else ""
    return servers_in(send_command(socket_path, f"{prefix}show servers state {backend}", timeout=5), backend)


@dataclass(frozen=True)
class Change:
    at: float  # monotonic
    samples: int  # samples taken until then
    servers: frozenset[str] | None  # every server HAProxy held; None: the sampler's last line (it stopped)
    maintenance: frozenset[str] = frozenset()  # those of them in maintenance (no traffic)


def parse(log: Path) -> list[Change]:
    """The lines a sampler wrote so far (a line being written is skipped)."""
    changes = []
    text = log.read_text() if log.exists() else ""
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            at = float(parts[0])
        except ValueError:
            continue
        if parts[2] == "end":
            changes.append(Change(at, int(parts[1]), None))
            continue
        names = [name for name in parts[2].split(",") if name]
        held = frozenset(name.removesuffix("!") for name in names)
        changes.append(Change(at, int(parts[1]), held, frozenset(n.removesuffix("!") for n in names if n[-1] == "!")))
    return changes


def main(argv: list[str]) -> int:
    master = "--master" in argv
    args = [arg for arg in argv if arg != "--master"]
    socket_path, backend = args[0], args[1]
    interval = float(args[2]) if len(args) > 2 else 0.002

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    samples, last = 0, None
    try:
        while True:
            try:
                servers = read(socket_path, backend, master)
            except OSError:
                time.sleep(interval)
                continue
            samples += 1
            if servers != last or samples % 100 == 0:  # a change, or a sign of life
                names = ",".join(f"{name}!" if maint else name for name, maint in sorted(servers.items()))
                print(f"{time.monotonic():.6f} {samples} {names}", flush=True)
                last = servers
            time.sleep(interval)
    finally:
        print(f"{time.monotonic():.6f} {samples} end", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
