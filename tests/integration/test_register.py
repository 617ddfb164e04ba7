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
from tests.helpers import Load, consul_client, register, start_stack

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
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], object]
) -> None:
    register(consul_agent, backends("web-base"))  # type: ignore[arg-type]
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
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], object]
) -> None:
    register(consul_agent, backends("web-base"))  # type: ignore[arg-type]
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
