"""What an operator sees in the Consul UI, in a real browser: the renderer passing, saying what it serves."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, wait_until
from lab.webapp import WebApp
from tests.browser import Session
from tests.helpers import consul_client, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def test_consul_ui_shows_the_renderer_passing_and_what_it_serves(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    browser: Session,
) -> None:
    for name in ("web-a", "web-b", "web-c"):
        register(consul_agent, backends(name), check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    c = consul_client(consul_agent)

    def output() -> str:
        checks = [ch for ch in c.agent.checks().values() if ch["ServiceName"] == "consul-renderer"]
        return str(checks[0]["Output"]) if checks and checks[0]["Status"] == "passing" else ""

    wait_until(lambda: "3 server(s)" in output(), 30, "the renderer's check passing with what it serves")
    ui = f"http://{consul_agent.extra['http_addr']}/ui/dc1"

    web = browser.text_of(f"{ui}/services/web/instances", until="web-c")
    assert all(instance in web for instance in ("web-a", "web-b", "web-c"))

    service_id = f"consul-renderer-{socket.gethostname()}"
    page = browser.text_of(f"{ui}/services/consul-renderer/instances/dev/{service_id}/health-checks", until="server(s)")
    assert f"{stack.config_path.name}: 1 backend(s), 3 server(s)" in page
    listing = browser.text_of(f"{ui}/services/consul-renderer/instances", until=service_id)
    assert "All service checks passing" in listing
