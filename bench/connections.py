"""Connections a process holds to one TCP port, sampled all through a run (not once at idle).

A background thread counts, every `interval_s`, the ESTABLISHED TCP connections to the agent's
port (`ss`, filtered in the kernel: a shared machine may hold ten thousand TIME_WAIT sockets, and
reading /proc/net/tcp then costs ~50 ms a sample) whose socket inode is one of the process's
(/proc/PID/fd). A sample that could not be taken is counted as failed, never as 0. Each sample
carries the phase the bench was in (startup, idle, changes, soak).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

INODE = re.compile(r"\bino:(\d+)\b")


def established(ss_output: str, inodes: set[int]) -> int:
    """Lines of `ss -tnHe state established ...` output whose socket is one of `inodes`."""
    return sum(1 for match in map(INODE.search, ss_output.splitlines()) if match and int(match[1]) in inodes)


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue  # closed between listing and reading
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def count_connections(pid: int, port: int) -> int:
    cmd = ["ss", "-tnHe", "state", "established", f"( dport = :{port} )"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=5).stdout
    return established(out, socket_inodes(pid))


@dataclass
class ConnectionStats:
    samples: int
    failed_samples: int
    peak: int | None
    median: float | None

    @classmethod
    def of(cls, counts: list[int], failed: int = 0) -> ConnectionStats:
        if not counts:
            return cls(0, failed, None, None)
        return cls(len(counts), failed, max(counts), float(statistics.median(counts)))

    def cell(self) -> str:
        return "-" if self.peak is None else f"{self.peak}/{self.median:.0f}"


@dataclass
class ConnectionSampler:
    pid: int
    port: int
    interval_s: float = 0.2
    phase: str = "startup"
    samples: list[tuple[str, int]] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ConnectionSampler:
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            phase = self.phase
            try:
                self.samples.append((phase, count_connections(self.pid, self.port)))
            except (OSError, ValueError, subprocess.SubprocessError):
                self.failed[phase] = self.failed.get(phase, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def overall(self) -> ConnectionStats:
        return ConnectionStats.of([n for _, n in self.samples], sum(self.failed.values()))

    def by_phase(self) -> dict[str, ConnectionStats]:
        phases = dict.fromkeys([p for p, _ in self.samples] + list(self.failed))
        return {p: ConnectionStats.of([n for q, n in self.samples if q == p], self.failed.get(p, 0)) for p in phases}
