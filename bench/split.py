"""Where each bench change's time went: `python -m bench.split RESULT.json RENDERER.log`.

The bench times a change from its Consul call returning to the first (or last) response through
HAProxy. With the renderer's debug log of the same run (`CONSUL_RENDERER_LOG_LEVEL=debug python
-m bench ... --keep` prints the work dir; the log is `scale-<size>-<protocol>/renderer.log`), each
change is cut at the renderer's own lines: the service's answer arrives ("watch
health.service(S): new data"), haproxy.cfg's render starts and ends, its Runtime API commands
start and end ("runtime: … (N commands, X ms)"). Printed: the median of each part, for cold and
hot changes and per kind. Changes whose lines cannot be found (a structural change, a timeout)
are left out and counted. The debug log itself costs a few ms per change under load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ANSWER = re.compile(r"watch health\.service\((?P<service>[^)]+)\): new data")
RENDER = re.compile(r"rendered haproxy\.cfg\.j2 in (?P<ms>[\d.]+) ms")
COMMANDS = re.compile(r"runtime: \S+ (?P<service>[^/\s]+)/.*\(\d+ commands, (?P<ms>[\d.]+) ms\)")
PARTS = ("Consul → answer", "answer → render", "render", "render → commands", "commands", "commands → seen", "total")


@dataclass(frozen=True)
class Line:
    kind: str  # answer, render, commands
    at: float  # Unix time of the log line
    service: str | None
    ms: float  # what the line says it took (render, commands), else 0


def log_time(line: str) -> float:
    """The Unix time of a renderer log line (its timestamps are UTC, to the millisecond)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC).timestamp()


def read_log(path: Path) -> list[Line]:
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        for kind, pattern in (("answer", ANSWER), ("render", RENDER), ("commands", COMMANDS)):
            if match := pattern.search(text):
                found = match.groupdict()
                lines.append(Line(kind, log_time(text), found.get("service"), float(found.get("ms") or 0)))
                break
    return lines


def split(change: dict[str, Any], lines: list[Line]) -> tuple[float, ...] | None:
    """The change's parts in ms (see PARTS), or None when its lines are not all there."""
    if not change.get("seconds") or not change.get("at"):
        return None
    called, seen = change["at"], change["at"] + change["seconds"]
    start = next((i for i, line in enumerate(lines) if line.kind == "answer" and line.service == change["service"]
                  and line.at >= called - 0.002), None)  # fmt: skip
    if start is None:
        return None
    answer = lines[start]
    render = next((line for line in lines[start:] if line.kind == "render"), None)
    commands = next((ln for ln in lines[start:] if ln.kind == "commands" and ln.service == change["service"]), None)
    if render is None or commands is None or render.at > commands.at or commands.at > seen + 0.01:
        return None
    render_start, commands_start = render.at - render.ms / 1000, commands.at - commands.ms / 1000
    marks = (called, answer.at, render_start, render.at, commands_start, commands.at, seen)
    return (*((b - a) * 1000 for a, b in itertools.pairwise(marks)), (seen - called) * 1000)


def report(changes: list[dict[str, Any]], lines: list[Line]) -> str:
    rows = [(c["cold"], c["kind"], parts) for c in changes if (parts := split(c, lines)) is not None]
    out = [f"{len(rows)} of {len(changes)} changes found in the log; medians in ms",
           f"{'':22}" + "".join(f"{part:>18}" for part in PARTS)]  # fmt: skip
    for cold in (True, False):
        for kind in (None, "add", "check_fail", "check_pass", "remove"):
            chosen = [parts for is_cold, k, parts in rows if is_cold == cold and kind in (None, k)]
            if chosen:
                label = f"{'cold' if cold else 'hot'} {kind or 'all'} n={len(chosen)}"
                medians = (statistics.median(p[i] for p in chosen) for i in range(len(PARTS)))
                out.append(f"{label:22}" + "".join(f"{m:18.1f}" for m in medians))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="the bench's JSON (bench/results/bench-*.json)")
    parser.add_argument("log", type=Path, help="the renderer's debug log of the same run")
    parser.add_argument("--row", type=int, default=0, help="which scale row of the JSON (default: the first)")
    args = parser.parse_args()
    changes = json.loads(args.result.read_text())["scale"][args.row]["changes"]
    print(report(changes, read_log(args.log)))


if __name__ == "__main__":
    main()
