"""Running a program to completion: the one place for its timeout, captured output and error text.

Used for `haproxy -c`, templates' check commands and commands, and version probes.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from renderer.errors import RendererError


@dataclass(frozen=True)
class Finished:
    returncode: int
    output: str  # stdout then stderr, stripped
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_command(cmd: list[str] | str, timeout: float, error: type[RendererError], what: str) -> Finished:
    """Run `cmd` (an argument list, or a shell line) to completion and return how it ended. One
    that takes longer than `timeout` or cannot start raises `error` naming `what`; a non-zero exit
    is returned for the caller to judge (`Finished.ok`)."""
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise error(f"{what} took longer than {timeout:.0f}s") from err
    except OSError as err:
        raise error(f"cannot run {what}: {err}") from err
    return Finished(proc.returncode, (proc.stdout + proc.stderr).strip(), time.monotonic() - started)


def probe(cmd: list[str], timeout: float = 20.0) -> str:
    """What a program prints (stdout), or "" when it cannot run or takes too long: for version
    and capability probes, where "unknown" is an answer."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
