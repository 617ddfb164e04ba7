"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass

from renderer.errors import RendererError

BACKGROUND_NICENESS = 19


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
    is returned for the caller to judge (`Finished.ok`). `background`: work nobody waits for (a
    check behind changes HAProxy already runs) runs at the lowest CPU priority, so that it never
    slows the next change on a busy machine."""
    started = time.monotonic()
    try:
        with subprocess.Popen(
            cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            if background:
                with contextlib.suppress(OSError):  # it may have finished already
                    os.setpriority(os.PRIO_PROCESS, proc.pid, BACKGROUND_NICENESS)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as err:
                proc.kill()
                proc.communicate()
                raise error(f"{what} took longer than {timeout:.0f}s") from err
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err
    return Finished(proc.returncode, (stdout + stderr).strip(), time.monotonic() - started)


def probe(cmd: list[str], timeout: float = 20.0) -> str:
    """What a program prints (stdout), or "" when it cannot run or takes too long: for version
    and capability probes, where "unknown" is an answer."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
