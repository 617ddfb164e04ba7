"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

from renderer.errors import RendererError

log = logging.getLogger(__name__)

# A background run's nice value and how long it may run at it. A check that runs behind changes
# HAProxy already runs (the write-behind) takes a core for ~0.2 s at 1,000 services × 10 and ~0.5 s
# at 10,000 servers; at the normal priority, or even at nice 10 (~10 % of a core against one busy
# thread per core), it competed with HAProxy, the agent and the renderer applying the next change.
# At 19 (~1.5 %) it takes what the others leave. What bounds the wait for it instead: someone who
# comes to wait for the run (`Hurry`: a reload or a structural change behind it, shutdown) has it
# run again at the normal priority at once, and so does a run still going after BACKGROUND_GRACE_S.
BACKGROUND_NICE = 19
BACKGROUND_GRACE_S = 5.0


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
    (CAP_SYS_NICE), and one path everywhere is one path tested. A low-priority run has a process
    group of its own, killed whole: a shell line's children must not hold its output open."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _urgent: bool = False
    _running: subprocess.Popen[str] | None = field(default=None, repr=False)

    @property
    def urgent(self) -> bool:
        return self._urgent

    def hurry(self) -> None:
        with self._lock:
            self._urgent = True
            if self._running is not None:
                _kill_group(self._running)

    def lower(self, proc: subprocess.Popen[str]) -> bool:
        """Lower `proc`'s priority and hold it until `release`; False (left as it is) when the
        run is urgent already."""
        with self._lock:
            if self._urgent:
                return False
            self._running = proc
        _lower_priority(proc.pid)
        return True

    def release(self) -> None:
        with self._lock:
            self._running = None


def run_command(
    cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, background: Hurry | None = None
) -> Finished:
    """Run `cmd` (an argument list, or a shell line) to completion and return how it ended. One
    that takes longer than `timeout` (it is killed) or cannot start raises `error` naming `what`; a
    non-zero exit is returned for the caller to judge (`Finished.ok`).

    `background`: no change waits for it, so it runs at a lower CPU priority (BACKGROUND_NICE), set
    right after it starts (a shell line's first children may keep the normal one). One still
    running after BACKGROUND_GRACE_S there (a CPU too busy to give it any), or hurried meanwhile
    (`Hurry`), is run again at the normal priority before anything is concluded: a busy machine
    never turns into a failed check, nor into a long wait for whoever needs its result (a shell
    line's children may hold its output open after it was killed: that wait ends at the grace)."""
    if background is not None and not background.urgent:
        grace = min(timeout, BACKGROUND_GRACE_S)
        finished = _run(cmd, grace, error, what, background)
        if finished is not None:
            return finished
        if background.urgent:
            log.debug("%s is waited for: running it again at normal priority", what)
        else:
            log.info(
                "%s took longer than %.1fs at low priority (the CPU is busy): running it again at normal priority",
                what, grace,
            )  # fmt: skip
    finished = _run(cmd, timeout, error, what, None)
    if finished is None:
        raise error(f"{what} took longer than {timeout:.0f}s")
    return finished


def _run(
    cmd: list[str] | str, timeout: float, error: type[RendererError], what: str, lowered: Hurry | None
) -> Finished | None:
    """`cmd` run to completion, or None when it took longer than `timeout` (killed, as
    `subprocess.run` does: a background process it started may keep running) or, run `lowered`,
    was killed to be hurried."""
    started = time.monotonic()
    try:
        with subprocess.Popen(
            cmd,
            shell=isinstance(cmd, str),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=lowered is not None,
        ) as proc:
            if lowered is not None and not lowered.lower(proc):
                _kill_group(proc)  # hurried before it started: run at the normal priority instead
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                if lowered is not None:
                    _kill_group(proc)
                else:
                    proc.kill()
                proc.wait()  # not communicate(): a process it left running may hold the pipes open
                return None
            finally:
                if lowered is not None:
                    lowered.release()
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err
    if lowered is not None and lowered.urgent and proc.returncode == -signal.SIGKILL:
        return None
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the process group `proc` leads (a session of its own), unless it was waited for."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


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
