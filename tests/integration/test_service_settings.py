"""Per-service settings from meta, and TCP services, against real Consul and HAProxy.

A TCP service is added, scaled and removed through Consul under load with 0 failed connections and
no reload after its listener exists; settings are not only in the file but in effect (stickiness
keeps a client on one server, `balance first` fills the first server, a health check that expects
another status takes the servers out).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ManagedProcess, free_port, get_json, http_get, wait_until
from lab.webapp import WebApp
from tests.helpers import Load, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
Backends = Callable[[str], WebApp]


def reloads(status_port: int) -> int:
    status = get_json(f"http://127.0.0.1:{status_port}/status")
    assert isinstance(status, dict)
    return int(status["applies"].get("reload", 0))


def ask(url: str, host: str, cookie: str | None = None) -> tuple[int, str, str]:
    """(status, body, Set-Cookie) of one GET with a Host header (and a cookie)."""
    headers = {"Host": host, **({"Cookie": cookie} if cookie else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as answer:
            return answer.status, answer.read().decode().strip(), answer.headers.get("Set-Cookie") or ""
    except urllib.error.HTTPError as err:
        return err.code, "", ""


def test_a_tcp_service_is_added_scaled_and_removed_under_load_without_a_failed_connection(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    port = free_port()
    meta = {"haproxy_mode": "tcp", "haproxy_port": str(port)}
    for name in ("tcp-a", "tcp-b"):
        register(consul_agent, backends(name), name="pg", meta=meta)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: http_get(url)[0] == 200, 30, "the TCP listener serving")
    assert "listen pg\n" in stack.config_path.read_text()
    before = reloads(stack.status_port)
    load = Load(url).start()
    try:
        load.wait_for("tcp-a")
        load.wait_for("tcp-b")
        register(consul_agent, backends("tcp-c"), name="pg", meta=meta)  # scaled up
        load.wait_for("tcp-c")
        consul = consul_agent.extra["http_addr"]
        urllib.request.urlopen(
            urllib.request.Request(f"http://{consul}/v1/agent/service/deregister/tcp-a", method="PUT"), timeout=5
        ).close()
        load.wait_gone("tcp-a")  # removed: its app keeps running, so a late server would show
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 100
    assert reloads(stack.status_port) == before  # membership of a TCP service: Runtime API only
    assert "acl host_pg" not in stack.config_path.read_text()  # no HTTP route to a TCP service


def test_settings_from_meta_take_effect(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-0"))
    sticky = {"haproxy_sticky": "true"}
    for name in ("s1", "s2", "s3"):
        register(consul_agent, backends(name), name="sticky", meta=sticky)
    for name in ("f1", "f2"):
        register(consul_agent, backends(name), name="first", meta={"haproxy_balance": "first"})
    register(consul_agent, backends("x1"), name="picky", meta={"haproxy_check_status": "204"})
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    config: dict[str, Any] = {}

    def ready() -> bool:
        config["text"] = stack.config_path.read_text() if stack.config_path.exists() else ""
        return "backend picky" in config["text"] and ask(stack.url, "sticky")[0] == 200

    wait_until(ready, 30, "the three services served")
    # Stickiness: the cookie HAProxy sets keeps a client on its server.
    status, first_body, cookie = ask(stack.url, "sticky")
    assert status == 200 and cookie.startswith("SERVERID="), cookie
    pinned = cookie.split(";", 1)[0]
    assert {ask(stack.url, "sticky", pinned)[1] for _ in range(12)} == {first_body}
    assert len({ask(stack.url, "sticky")[1] for _ in range(12)}) > 1  # without it: round robin
    # balance first: every request to the first server while it has room.
    wait_until(lambda: ask(stack.url, "first")[0] == 200, 20, "first served")
    assert {ask(stack.url, "first")[1] for _ in range(12)} == {"f1"}
    # check_status 204: the app answers its check with 200, so HAProxy takes it out.
    assert "http-check expect status 204" in config["text"]
    wait_until(lambda: ask(stack.url, "picky")[0] == 503, 20, "the picky backend's server down")
