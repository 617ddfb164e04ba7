"""`consul-renderer register` against real Consul, HAProxy and the renderer."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, free_port, spawn, wait_until
from lab.stack import renderer_command
from lab.webapp import WebApp
from tests.helpers import Load, Pace, consul_client, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def start_registered_webapp(
    tmp_path: Path, agent: ManagedProcess, track: Track, instance: str, *extra: str
) -> ManagedProcess:
    port = free_port()
    cmd = renderer_command(
        "register", "--consul-addr", str(agent.extra["http_addr"]), "--name", "web", "--id", instance,
        "--port", str(port), "--address", "127.0.0.1", "--tag", "lb", "--check-http", "/health",
        "--check-interval", "1s", *extra,
        "--", sys.executable, "-m", "lab.webapp", "--port", str(port), "--id", instance,
    )  # fmt: skip
    return track(spawn(f"register-{instance}", cmd, tmp_path / f"register-{instance}.log"))


def instance_ids(agent: ManagedProcess, passing: bool = False) -> set[str]:
    _, nodes = consul_client(agent).health.service("web", passing=passing)
    return {n["Service"]["ID"] for n in nodes}


def test_register_child_gets_traffic_and_sigterm_deregisters(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-base"))
    wait_until(lambda: "web-base" in instance_ids(consul_agent, passing=True), 20, "web-base passing")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    load = Load(stack.url).start()
    try:
        wrapper = start_registered_webapp(tmp_path, consul_agent, track, "web-reg")
        load.wait_for("web-reg", timeout=30)
        wrapper.signal(signal.SIGTERM)
        wait_until(lambda: wrapper.popen.poll() is not None, 15, "register to exit")
        assert "web-reg" not in instance_ids(consul_agent)
        load.wait_gone("web-reg")
    finally:
        load.stop()
    assert wrapper.popen.returncode in (0, 128 + signal.SIGTERM), wrapper.log_text()
    assert "deregistered web-reg" in wrapper.log_text()
    assert load.failures == []


@pytest.mark.timeout(240)
def test_killed_instance_leaves_through_its_check_and_is_reaped(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-base"))
    wait_until(lambda: "web-base" in instance_ids(consul_agent, passing=True), 20, "web-base passing")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wrapper = start_registered_webapp(tmp_path, consul_agent, track, "web-doomed", "--deregister-critical-after", "1m")
    wait_until(lambda: "web-doomed" in stack.config_path.read_text(), 30, "web-doomed in HAProxy's config")
    os.killpg(wrapper.pid, signal.SIGKILL)  # wrapper and child die at once: nobody deregisters
    wrapper.popen.wait(5)
    wait_until(lambda: "web-doomed" not in stack.config_path.read_text(), 30, "web-doomed out through its check")
    assert "web-doomed" in instance_ids(consul_agent)  # still registered, critical
    # Consul's minimum for DeregisterCriticalServiceAfter is 1 minute; its reaper runs every ~30 s.
    wait_until(lambda: "web-doomed" not in instance_ids(consul_agent), 150, "Consul to reap web-doomed", interval=1)


def test_python_api_registers_for_the_duration_of_the_block(consul_agent: ManagedProcess) -> None:
    from renderer.config import ConsulSettings
    from renderer.registration.register import Registration, registered

    settings = ConsulSettings(addr=str(consul_agent.extra["http_addr"]))
    with registered(Registration("web", 9999, address="127.0.0.1", service_id="web-api", tags=("lb",)), settings):
        assert "web-api" in consul_client(consul_agent).agent.services()
    assert "web-api" not in consul_client(consul_agent).agent.services()


@pytest.mark.parametrize("with_command", [True, False], ids=["with-command", "without-command"])
def test_sigterm_while_consul_is_down_ends_the_retry_and_exits_promptly(
    tmp_path: Path, track: Track, with_command: bool
) -> None:
    command = ["--", sys.executable, "-c", "import time; time.sleep(60)"] if with_command else []
    cmd = renderer_command(
        "register", "--consul-addr", f"127.0.0.1:{free_port()}", "--name", "web", "--port", "8080",
        "--id", "web-nowhere", *command,
    )  # fmt: skip
    wrapper = track(spawn("register-no-consul", cmd, tmp_path / "register.log"))
    try:
        wait_until(lambda: "not ready" in wrapper.log_text(), 20, "register to retry against a dead address")
        wrapper.signal(signal.SIGTERM)
        wrapper.popen.wait(5)  # the retry's backoff reaches 5 s; the stop may not wait for it
    finally:
        if wrapper.alive():
            os.killpg(wrapper.pid, signal.SIGKILL)
    log = wrapper.log_text()
    # The documented status: the command's (SIGTERM ends it: 143), 0 without a command.
    assert wrapper.popen.returncode == (128 + signal.SIGTERM if with_command else 0), log
    assert "stopped before web-nowhere was registered" in log and "deregistered" not in log


CHILD = """
import json, signal, sys, time, urllib.request
out, consul, ignore = sys.argv[1], sys.argv[2], sys.argv[3] == "ignore"
def on_term(*_):
    with urllib.request.urlopen(f"http://{consul}/v1/agent/services", timeout=5) as answer:
        registered = "web-order" in json.load(answer)
    with open(out, "a") as f:
        f.write(json.dumps({"t": time.time(), "registered": registered}) + "\\n")
    if not ignore:
        sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("child", ["exits-7", "ignores-sigterm"])
def test_sigterm_deregisters_drains_then_signals_and_passes_the_childs_status_through(
    tmp_path: Path, consul_agent: ManagedProcess, track: Track, child: str, pace: Pace
) -> None:
    import json
    import time

    record = tmp_path / "child.jsonl"
    consul = str(consul_agent.extra["http_addr"])
    cmd = renderer_command(
        "register", "--consul-addr", consul, "--name", "web", "--id", "web-order", "--port", "8080",
        "--drain-delay", "1s", "--kill-after", "2s",
        "--", sys.executable, "-c", CHILD, str(record), consul, "ignore" if child == "ignores-sigterm" else "exit",
    )  # fmt: skip
    wrapper = track(spawn("register-order", cmd, tmp_path / "register.log"))
    wait_until(lambda: "web-order" in instance_ids(consul_agent), 20, "web-order registered")
    signalled = time.time()
    wrapper.signal(signal.SIGTERM)
    code = wrapper.popen.wait(15)
    done = time.time()
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(seen) == 1, (seen, wrapper.log_text())
    # Order: deregistered first (the child, signalled, no longer finds itself), then the drain delay.
    assert seen[0]["registered"] is False
    assert seen[0]["t"] - signalled >= 1.0, seen
    if child == "exits-7":
        assert code == 7, wrapper.log_text()  # the child's own status, passed through
    else:  # --kill-after 2s: SIGKILL once the child ignored the signal that long
        assert code == 128 + signal.SIGKILL, wrapper.log_text()
        assert 3.0 <= done - signalled < pace(8.0), done - signalled
