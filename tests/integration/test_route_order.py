"""Routing by Host against real Consul and HAProxy: the most specific name wins, whatever the order.

Service `api` routes Host `api` and `api.<anything>`, so it also matches `api.v2.example.com`; a
service named `api.v2` must still get that request (HAProxy takes the first rule that matches, and
the routing map looked up the first label only). Both ways of routing are tried: the routing map
(the lab's stack) and the template's ACLs (no `routes_map`).
"""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, free_port, start_haproxy, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command
from lab.webapp import WebApp
from tests.helpers import consul_client, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
Backends = Callable[[str], WebApp]

# Host header → the instance (GET / answers its id) that must serve it.
EXPECTED = {
    "api.v2.example.com": "specific-1",
    "api.v2": "specific-1",
    "API.V2.example.com:8080": "specific-1",
    "api.example.com": "broad-1",
    "api": "broad-1",
}


def ask(url: str, host: str) -> tuple[int, str]:
    """(status, body) of one GET with a Host header."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=5) as answer:
            return answer.status, answer.read().decode().strip()
    except urllib.error.HTTPError as err:
        return err.code, ""


def register_broad_then_specific(agent: ManagedProcess, backends: Backends) -> None:
    """The unfavourable order: the broad name first (it also sorts first)."""
    register(agent, backends("broad-1"), name="api")
    register(agent, backends("specific-1"), name="api.v2")
    client = consul_client(agent)
    for name in ("api", "api.v2"):
        wait_until(partial(lambda n: client.health.service(n, passing=True)[1], name), 20, f"{name} passing")


def served(url: str) -> dict[str, str]:
    return {host: ask(url, host)[1] for host in EXPECTED}


def test_with_the_routing_map_a_specific_host_reaches_its_service(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    register_broad_then_specific(consul_agent, backends)
    wait_until(lambda: ask(stack.url, "api.example.com")[1] == "broad-1", 30, "api served")
    wait_until(lambda: served(stack.url) == EXPECTED, 30, f"every host served by its service: {EXPECTED}")


def render_once(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, *flags: str
) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    """`run --once` with the default template's ACLs (no routing map), then HAProxy on the file:
    (the run, the file, the frontend's URL)."""
    config = tmp_path / "haproxy.cfg"
    http_port = free_port()
    ports = ("--var", f"http_port={http_port}", "--var", f"stats_port={free_port()}", "--var", "bind_address=127.0.0.1")
    once = subprocess.run(
        renderer_command(
            "run", "--once", "--consul-addr", str(consul_agent.extra["http_addr"]), "--template",
            f"{DEFAULT_TEMPLATE}:{config}", "--haproxy-bin", haproxy_bin, *flags, *ports,
        ),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert once.returncode == 0, once.stderr
    track(start_haproxy(haproxy_bin, config, tmp_path / "master.sock", tmp_path / "haproxy.log"))
    return once, config, f"http://127.0.0.1:{http_port}/"


def test_with_acls_a_specific_host_reaches_its_service(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register_broad_then_specific(consul_agent, backends)
    _, config, url = render_once(tmp_path, consul_agent, haproxy_bin, track)
    assert "acl sub_api.v2 " in config.read_text() and "routes_map" not in config.read_text()
    wait_until(lambda: served(url) == EXPECTED, 30, f"every host served by its service: {EXPECTED}")


def test_a_service_outside_serve_services_takes_no_host(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """The takeover above, refused: with `--serve-services web,api*` (a wildcard matches no dot) the
    later registration `api.v2` gets neither a backend nor a route, and every Host it would have
    taken stays with `api`."""
    register_broad_then_specific(consul_agent, backends)
    once, config, url = render_once(tmp_path, consul_agent, haproxy_bin, track, "--serve-services", "web,api*")
    assert "api.v2" not in config.read_text() and "backend api\n" in config.read_text()
    assert "service 'api.v2': not among serve_services (web,api*)" in once.stderr
    everything_to_api = dict.fromkeys(EXPECTED, "broad-1")
    wait_until(lambda: served(url) == everything_to_api, 30, f"every host served by api: {everything_to_api}")
