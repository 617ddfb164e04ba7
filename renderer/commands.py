"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from renderer.errors import RendererError

log = logging.getLogger(__name__)

# A background run's nice value and how it is watched. A check that runs behind changes HAProxy
# already runs (the write-behind) takes a core for ~0.2 s at 1,000 services × 10 and ~0.5 s at
# 10,000 servers; at the normal priority, or even at nice 10 (~10 % of a core against one busy
# thread per core), it competed with HAProxy, the agent and the renderer applying the next change.
# At 19 (~1.5 %) it takes what the others leave. What bounds the wait for it instead: someone who
# comes to wait for the run (`Hurry`: a reload or a structural change behind it, shutdown) has it
# run again at the normal priority at once, and so does a run that got less than STARVED_SHARE of a
# core over a BACKGROUND_GRACE_S (a check that is merely slow goes on at the low priority).
BACKGROUND_NICE = 19
BACKGROUND_GRACE_S = 5.0
STARVED_SHARE = 0.25
POLL_S = 0.02  # how often a low-priority run looks whether it was hurried


@dataclass(frozen=True)
class Finished:
    returncode: int
    output: str  # stdout then stderr, stripped
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class Superseded(Exception):
    """A low-priority run was stopped (hurried, starved, out of time) and its result is no longer
    wanted (`Hurry.wanted`): it is not run again."""


def _always() -> bool:
    return True


@dataclass
class Hurry:
    """A background run's handle for whoever comes to wait for it (an asyncio task, while the run
    goes on in a worker thread): `hurry()` has the run, and every later one through this handle,
    done at the normal priority from then on. The low-priority process is killed and the command
    run again: raising a priority back needs a privilege a container's root does not have
    (CAP_SYS_NICE), and one path everywhere is one path tested. `wanted`: whether the current run's
    result is still wanted (called from the run's thread); a stopped run that is not is not run
    again (`Superseded`): a write-behind whose content was replaced meanwhile checks the newest."""

    _urgent: threading.Event = field(default_factory=threading.Event, repr=False)
    wanted: Callable[[], bool] = field(default=_always, repr=False)

    @property
    def urgent(self) -> bool:
        return self._urgent.is_set()

    def hurry(self) -> None:
        self._urgent.set()


def run_command(
    cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, background: Hurry | None = None
) -> Finished:
    """Run `cmd` (an argument list, or a shell line) to completion and return how it ended. One
    that takes longer than `timeout` (it is killed) or cannot start raises `error` naming `what`; a
    non-zero exit is returned for the caller to judge (`Finished.ok`).

    `background`: no change waits for it, so it runs at a lower CPU priority (BACKGROUND_NICE), set
    right after it starts (a shell line's first children may keep the normal one). One hurried
    (`Hurry`), starved of the CPU, out of time or ended by a signal there is run again at the normal
    priority before anything is concluded: a busy machine never turns into a failed check, nor into
    a long wait for whoever needs its result; unless its result is no longer wanted then
    (`Hurry.wanted`): Superseded."""
    if background is not None and not background.urgent:
        finished = _run_lowered(cmd, timeout, error, what, background)
        if finished is not None:
            return finished
        if not background.wanted():
            raise Superseded(f"{what}: stopped at low priority, and its result is no longer wanted")
    return _run(cmd, timeout, error, what)


def _run(cmd: list[str] | str, timeout: float, error: type[RendererError], what: str) -> Finished:
    """`cmd` run to completion at the normal priority; killed past `timeout`, as `subprocess.run`
    does (a background process it started may keep running)."""
    started = time.monotonic()
    with _started(cmd, error, what) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()  # not communicate(): a process it left running may hold the pipes open
            raise error(f"{what} took longer than {timeout:.0f}s") from None
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _run_lowered(
    cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, hurry: Hurry
) -> Finished | None:
    """`cmd` run at BACKGROUND_NICE to completion, or None when it must be run again at the normal
    priority: hurried, starved (`_Progress`), out of time, or ended by a signal (the kernel's OOM
    killer, say: not a verdict on the file; for a shell line, an exit status above 128, which is
    how a shell reports its command's signal). A run stopped here is killed with every process
    under it (a shell line's check is the shell's child: /bin/sh need not exec it), and the job's
    later runs skip the low priority."""
    started = time.monotonic()
    with _started(cmd, error, what) as proc:
        _lower_priority(proc.pid)
        watch = _Progress(proc.pid, started, started)
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            why = "is waited for" if hurry.urgent else watch.why_again(timeout)
            if why is not None:
                _kill_tree(proc)
                level = logging.DEBUG if hurry.urgent else logging.INFO
                log.log(level, "%s %s: running it again at normal priority", what, why)
                hurry.hurry()  # the job's later runs too: someone waits, or the CPU is that busy
                return None
    if proc.returncode < 0 or (isinstance(cmd, str) and proc.returncode > 128):
        log.info(
            "%s ended by a signal (%d) at low priority: running it again at normal priority", what, proc.returncode
        )
        hurry.hurry()  # a check that crashes every time: once more each, not twice
        return None
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _started(cmd: list[str] | str, error: type[RendererError], what: str) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill `proc` and every process under it (found before the kill: a `timeout` in a check
    leaves the process group, not the tree); a process that double-forked away is not found."""
    under = _tree(proc.pid)[1:]
    proc.kill()  # Popen: no signal to a process already waited for
    for pid in under:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()  # not what it left: a process it started may hold the pipes open


@dataclass
class _Progress:
    """How much CPU a low-priority run (with every process under it) got, looked at every
    BACKGROUND_GRACE_S; `started`: when the run began (its timeout counts from there)."""

    pid: int
    started: float
    window: float  # when the current grace window began
    cpu_s: float = 0.0  # the run's CPU time then

    def why_again(self, timeout: float) -> str | None:
        """Why the run must be run again at the normal priority now, if it must."""
        now = time.monotonic()
        if now - self.started >= timeout:
            return f"took longer than {timeout:.0f}s at low priority"
        if now - self.window < BACKGROUND_GRACE_S:
            return None
        cpu_s = _cpu_seconds(_tree(self.pid))
        if cpu_s is None or cpu_s - self.cpu_s < STARVED_SHARE * (now - self.window):
            return f"got too little of the CPU in {now - self.window:.1f}s at low priority (the CPU is busy)"
        self.window, self.cpu_s = now, cpu_s  # slow, not starved: it goes on, looked at again later
        return None


def _tree(pid: int) -> list[int]:
    """`pid` and the processes under it, parents first (Linux /proc; `pid` alone elsewhere)."""
    found, i = [pid], 0
    while i < len(found):
        for children in glob.glob(f"/proc/{found[i]}/task/*/children"):
            try:
                with open(children, "rb") as listed:
                    found.extend(int(child) for child in listed.read().split())
            except (OSError, ValueError):
                continue
        i += 1
    return found


def _cpu_seconds(pids: list[int]) -> float | None:
    """The CPU time `pids` have used, each with its children already waited for (Linux /proc;
    None elsewhere, or when the first is gone)."""
    total = 0.0
    for n, pid in enumerate(pids):
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            total += sum(int(field) for field in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            if n == 0:
                return None
    return total / os.sysconf("SC_CLK_TCK")


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
