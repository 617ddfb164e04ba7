"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from dataclasses import dataclass

from renderer.errors import RendererError

log = logging.getLogger(__name__)

# A background run's nice value: the lowest priority. A check that runs behind changes HAProxy
# already runs (the write-behind) takes a core for ~0.5 s at 10,000 servers; at the normal priority
# it competed with HAProxy and with the renderer applying the next change (measured at 1,000 × 10 on
# 2 cores: a ~1 ms render took 4-7 ms while checks ran).
BACKGROUND_NICE = 19


@dataclass(frozen=True)
class Finished:
    returncode: int
    output: str  # stdout then stderr, stripped
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_command(
    cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, background: bool = False
) -> Finished:
    """Run `cmd` (an argument list, or a shell line) to completion and return how it ended. One
    that takes longer than `timeout` or cannot start raises `error` naming `what`; a non-zero exit
    is returned for the caller to judge (`Finished.ok`). `background`: nothing waits for it on a
    change's path, so it runs at the lowest CPU priority (BACKGROUND_NICE): it never delays HAProxy
    or the next change, and takes longer only when the CPU is busy with them."""
    started = time.monotonic()
    try:
        with subprocess.Popen(
            cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            if background:
                _lower_priority(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                proc.kill()
                proc.communicate()
                raise error(f"{what} took longer than {timeout:.0f}s") from err
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _lower_priority(pid: int) -> None:
    """Give `pid` the lowest CPU priority (lowering one's own child needs no privilege); a process
    already gone, or a system that refuses, leaves it as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, BACKGROUND_NICE)
    except OSError as err:
        log.debug("could not lower the priority of pid %d: %s", pid, err)


def probe(cmd: list[str], timeout: float = 20.0) -> str:
    """What a program prints (stdout), or "" when it cannot run or takes too long: for version
    and capability probes, where "unknown" is an answer."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
