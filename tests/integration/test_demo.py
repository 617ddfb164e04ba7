"""`make demo` as a user runs it: it starts, takes an instance in and out, and leaves nothing behind."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lab.demo import RUN
from lab.processes import wait_until

pytestmark = pytest.mark.integration


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab.demo", *args], capture_output=True, text=True, timeout=60)


def process_state(pid: int) -> str | None:
    """The kernel's state letter of `pid` (Z: a zombie nobody reaped), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def started(proc: subprocess.Popen[bytes], log: Path) -> bool:
    """The demo printed its banner; an AssertionError at once (with its output) if it exited."""
    if proc.poll() is not None:
        raise AssertionError(f"the demo exited ({proc.returncode}) before starting:\n{diagnosis(log)}")
    return "Ctrl-C stops everything" in log.read_text()


def diagnosis(log: Path) -> str:
    """The demo's output and the last lines of the logs it writes, for a failure's message."""
    parts = [f"--- demo output:\n{log.read_text()[-3000:]}"]
    for name in ("once.log", "renderer.log", "consul.log"):
        path = RUN / name
        if path.exists():
            parts.append(f"--- {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


@pytest.mark.timeout(180)
def test_demo_reaps_removed_instances_and_leaves_no_lock_or_socket(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lab.demo"], stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until(lambda: started(proc, log), 120, "the demo to start")
        except TimeoutError as err:  # say what the demo and its first render said
            raise AssertionError(f"{err}\n{diagnosis(log)}") from None
        pid = int((RUN / "web-3.pid").read_text())
        removed = demo("remove", "web-3")
        assert removed.returncode == 0, removed.stderr
        wait_until(lambda: process_state(pid) is None, 20, "web-3 reaped (no zombie)")
        assert list(RUN.rglob(".*.lock")), "the renderer holds its destination lock while it runs"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith("demo stopped: all ") and "have exited" in lines[-1], lines[-3:]
    leftovers = [p.name for p in [*RUN.rglob("*.sock"), *RUN.rglob(".*.lock"), *RUN.glob("*.pid")]]
    assert leftovers == [], leftovers
