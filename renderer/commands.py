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

# A background run's nice value. A check that runs behind changes HAProxy already runs (the
# write-behind) takes a core for ~0.5 s at 10,000 servers; at the normal priority it competed with
# HAProxy and with the renderer applying the next change. Not the lowest (19): against one busy
# thread per core, nice 10 still gets ~10 % of a core (19: ~1.5 %), so a flush that waits for the
# check (a structural change behind it, shutdown) waits seconds, not tens of seconds.
BACKGROUND_NICE = 10


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
    that takes longer than `timeout` (it is killed) or cannot start raises `error` naming `what`; a
    non-zero exit is returned for the caller to judge (`Finished.ok`).

    `background`: no change waits for it, so it runs at a lower CPU priority (BACKGROUND_NICE), set
    right after it starts (a shell line's first children may keep the normal one). One that runs
    out of time there, on a CPU too busy to give it any, is run again at the normal priority before
    anything is concluded: a busy machine never turns into a failed check."""
    if background:
        finished = _run(cmd, timeout, error, what, lowered=True)
        if finished is not None:
            return finished
        log.warning(
            "%s took longer than %.0fs at low priority (the CPU is busy): running it again at normal priority",
            what, timeout,
        )  # fmt: skip
    finished = _run(cmd, timeout, error, what, lowered=False)
    if finished is None:
        raise error(f"{what} took longer than {timeout:.0f}s")
    return finished


def _run(cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, lowered: bool) -> Finished | None:
    """`cmd` run to completion, or None when it took longer than `timeout` (killed, as
    `subprocess.run` does: a background process it started may keep running)."""
    started = time.monotonic()
    try:
        with subprocess.Popen(
            cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            if lowered:
                _lower_priority(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()  # not communicate(): a process it left running may hold the pipes open
                return None
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _lower_priority(pid: int) -> None:
    """Lower `pid`'s CPU priority to BACKGROUND_NICE (lowering one's own child needs no
    privilege); a process already gone, or a system that refuses, leaves it as it is."""
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
