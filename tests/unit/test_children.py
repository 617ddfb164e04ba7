"""The one child supervisor: a stop signal, then SIGKILL for a child that ignores it."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import pytest

from lab.processes import wait_until
from renderer.children import Child
from renderer.errors import ConfigError

IGNORES_TERM = (
    "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"
)


def test_a_child_that_ignores_the_stop_signal_is_killed_after_the_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    child = Child.start([sys.executable, "-c", IGNORES_TERM, str(ready)], ConfigError)
    wait_until(ready.exists, 20, "the child to ignore SIGTERM")
    code = asyncio.run(asyncio.wait_for(child.stop_async(signal.SIGTERM, kill_after=0.5), 20))
    assert code == -signal.SIGKILL and child.returncode == -signal.SIGKILL


def test_a_child_that_exits_on_the_signal_reports_it() -> None:
    child = Child.start([sys.executable, "-c", "import time; time.sleep(60)"], ConfigError)
    assert child.returncode is None
    assert child.stop(signal.SIGTERM, kill_after=10) == -signal.SIGTERM


def test_a_program_that_cannot_start_raises_the_callers_error() -> None:
    with pytest.raises(ConfigError, match="cannot start '/nonexistent/app'"):
        Child.start(["/nonexistent/app"], ConfigError)
