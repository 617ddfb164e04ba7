"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
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


@dataclass
class Hurry:
    """A background run's handle for whoever comes to wait for it (an asyncio task, while the run
    goes on in a worker thread): `hurry()` has the run, and every later one through this handle,
    done at the normal priority from then on. The low-priority process is killed and the command
    run again: raising a priority back needs a privilege a container's root does not have
    (CAP_SYS_NICE), and one path everywhere is one path tested."""

    _urgent: threading.Event = field(default_factory=threading.Event, repr=False)

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
    a long wait for whoever needs its result."""
    if background is not None and not background.urgent:
        finished = _run_lowered(cmd, timeout, error, what, background)
        if finished is not None:
            return finished
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
    """`cmd` run at BACKGROUND_NICE to completion, or None (killed) when it must be run again at
    the normal priority: hurried, starved (`_Progress`), out of time, or ended by a signal (the
    kernel's OOM killer, say: not a verdict on the file). Whatever it left running (a shell line's
    children, a `timeout` in it) is not waited for then."""
    started = time.monotonic()
    with _started(cmd, error, what) as proc:
        _lower_priority(proc.pid)
        watch = _Progress(proc.pid, started)
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            why = "is waited for" if hurry.urgent else watch.why_again(timeout)
            if why is not None:
                proc.kill()
                proc.wait()
                level = logging.DEBUG if hurry.urgent else logging.INFO
                log.log(level, "%s %s: running it again at normal priority", what, why)
                hurry.hurry()  # the job's later runs too: someone waits, or the CPU is that busy
                return None
    if proc.returncode < 0:
        log.info("%s ended by signal %d at low priority: running it again at normal priority", what, -proc.returncode)
        return None
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _started(cmd: list[str] | str, error: type[RendererError], what: str) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err


@dataclass
class _Progress:
    """How much CPU a low-priority run got, looked at every BACKGROUND_GRACE_S."""

    pid: int
    since: float
    cpu_s: float = 0.0

    def why_again(self, timeout: float) -> str | None:
        """Why the run must be run again at the normal priority now, if it must."""
        now = time.monotonic()
        if now - self.since >= timeout:
            return f"took longer than {timeout:.0f}s at low priority"
        if now - self.since < BACKGROUND_GRACE_S:
            return None
        cpu_s = _cpu_seconds(self.pid)
        if cpu_s is None or cpu_s - self.cpu_s < STARVED_SHARE * (now - self.since):
            return f"got too little of the CPU in {now - self.since:.1f}s at low priority (the CPU is busy)"
        self.since, self.cpu_s = now, cpu_s  # slow, not starved: it goes on, looked at again later
        return None


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time `pid` has used (Linux /proc; None elsewhere, or when it is gone). A shell
    line's running children are not in it: such a run counts as starved at the grace."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


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
