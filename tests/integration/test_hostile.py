"""Hostile registrations against the real stack (Consul, HAProxy, the renderer) under load.

Each registration below once took production down (a paused frontend, a dead renderer, a file
rejected for every later change). Here each is made, one after another, through the agent's HTTP
API while a load runs, and after each a new good instance must be served: 0 failed requests, the
renderer and HAProxy alive at the end, the frontend never paused.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ManagedProcess, get_json, http_get, spawn, wait_until
from lab.webapp import WebApp, start_webapp
from tests.helpers import Load, Pace, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def routed(url: str, host: str) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def served_by(url: str, host: str) -> str:
    """The instance that answered a request for `host` ("" for an error status)."""
    status, body = routed(url, host)
    return body.strip() if status == 200 else ""


def put(agent: ManagedProcess, path: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        f"http://{agent.extra['http_addr']}{path}", data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def service(sid: str, name: str, address: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"ID": sid, "Name": name, "Address": address, "Port": port, "Tags": ["lb"], **extra}


@pytest.fixture
def v6_app() -> Iterator[WebApp]:
    app = start_webapp("web-v6", host="::1")
    yield app
    app.stop()


def test_hostile_registrations_leave_the_rest_serving_under_load(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    v6_app: WebApp,
) -> None:
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: http_get(stack.url)[0] == 200, 30, "the first instance served")
    load = Load(stack.url).start()
    register_agent = "/v1/agent/service/register"
    hostile: list[tuple[str, Callable[[], None]]] = [
        ("an address whose zone id carries CLI commands", lambda: put(consul_agent, register_agent, service(
            "evil-zone", "web", 'fe80::1%x";@1 disable frontend http;@1 shutdown sessions server web/web-0;"', 80))),
        ("an address with an unmatched quote", lambda: put(consul_agent, register_agent, service(
            "evil-quote", "web", 'fe80::1%a"', 80))),
        ("meta weight 257", lambda: put(consul_agent, register_agent, service(
            "heavy", "web", "127.0.0.1", 1, Meta={"weight": "257"}))),
        ("meta health_path with a quote", lambda: put(consul_agent, register_agent, service(
            "api-1", "api", "127.0.0.1", 1, Meta={"health_path": "/x'"}))),
        ("two services named alike once made safe", lambda: [
            put(consul_agent, register_agent, service(sid, name, "127.0.0.1", 1))
            for sid, name in (("bang", "api!"), ("what", "api?"))
        ] and None),
        ("a service named like the stats section", lambda: put(consul_agent, register_agent, service(
            "stats-1", "stats", "127.0.0.1", 1))),
        ("a legitimate instance on ::1", lambda: put(consul_agent, register_agent, service(
            "web-v6", "web", "::1", v6_app.port))),
        ("two nodes web_1 and web~1, each with instance id x", lambda: [
            put(consul_agent, "/v1/catalog/register", {
                "Node": node, "Address": "127.0.0.1",
                "Service": {"ID": "x", "Service": "web", "Address": "127.0.0.1", "Port": app.port, "Tags": ["lb"]},
            })
            for node, app in (("web_1", backends("web_1-x")), ("web~1", backends("web~1-x")))
        ] and None),
        ("a 64 KB tag", lambda: put(consul_agent, register_agent, dict(
            service("big-tag", "web", "127.0.0.1", 1), Tags=["lb", "t" * 65536]))),
        ("an unspecified address (HAProxy would connect back to itself)", lambda: put(
            consul_agent, "/v1/catalog/register", {  # the agent endpoint refuses it; the catalog's does not
                "Node": "zero", "Address": "0.0.0.0",  # a service address 0.0.0.0 is refused; the node's is not
                "Service": {"ID": "zero", "Service": "web", "Port": stack.http_port},
            })),
        ("an instance pointing at the frontend itself", lambda: put(consul_agent, register_agent, service(
            "loop-1", "loop", "127.0.0.1", stack.http_port, Meta={"health_path": "/"}))),
        ("a service named '.'", lambda: put(consul_agent, register_agent, service("dot", ".", "127.0.0.1", 1))),
        ("a case variant of web", lambda: put(consul_agent, register_agent, service(
            "evil-web", "Web", "127.0.0.1", backends("evil-web").port))),
        ("a node whose name squats web-0's server name", lambda: put(consul_agent, "/v1/catalog/register", {
            "Node": "dev_web", "Address": "127.0.0.1",
            "Service": {"ID": "0", "Service": "api", "Address": "127.0.0.1", "Port": 1, "Tags": ["lb"]},
        })),
        ("a service name Consul answers 400 for (a newline)", lambda: put(consul_agent, register_agent, service(
            "evil-nl", "evil\nname", "127.0.0.1", 1))),
        ("a service name Consul answers 400 for (a zero-width space)", lambda: put(
            consul_agent, register_agent, service("evil-zw", "we\u200bb", "127.0.0.1", 1))),
        ("a service name a URL must encode (a space)", lambda: put(consul_agent, register_agent, service(
            "spaced-1", "sp ace", "127.0.0.1", 1))),
        ("meta timeout_server past HAProxy's most", lambda: put(consul_agent, register_agent, service(
            "slow-1", "slow", "127.0.0.1", 1, Meta={"haproxy_timeout_server": "2147484s"}))),
    ]  # fmt: skip
    try:
        for n, (what, make) in enumerate(hostile, start=1):
            make()
            fresh = backends(f"web-good-{n}")
            register(consul_agent, fresh, check=False)
            try:
                load.wait_for(fresh.state.instance_id, timeout=20)
            except TimeoutError as err:
                raise AssertionError(f"after {what}: a new good instance was not served") from err
        looped = wait_until(lambda: routed(stack.url, "loop")[0] == 502 or None, 20, "the loop refused")
        assert looped, "a request that comes back around is refused, never looped"
        load.wait_for("web-v6")  # the ::1 instance is served, bracketed
        load.wait_for("web_1-x")
        load.wait_for("web~1-x")  # both nodes served under two distinct server names
        # A new backend waits out min_reload_interval after the reload before it: the file has the last
        # ones a moment after the good instances registered since were served through the Runtime API.
        last = ("\nbackend slow\n", "\nbackend sp_ace_")
        wait_until(lambda: all(b in stack.config_path.read_text() for b in last), 20, "the last backends in the file")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.seen["evil-web"] == 0  # Consul answers web with Web's instances too: never served
    assert load.ok > 0
    assert stack.renderer.alive() and stack.haproxy.alive()
    log = stack.renderer.log_text(10**8)
    assert "Paused" not in stack.haproxy.log_text(10**7)
    assert "disable frontend" not in log.split("left out")[0]  # never sent: named only where left out
    config = stack.config_path.read_text()
    assert "[::1]:" in config and "fe80" not in config and "weight 257" not in config and "/x'" not in config
    reasons = (
        "carries an IPv6 zone id", "is not an IPv4 or IPv6 address", "weight '257'", 'path "/x\'"',
        "is an unspecified address", "cannot be asked of Consul's health endpoint", "Consul answers 400 for it",
        "'2147484s' is not a time from 1us to 24d",
    )  # fmt: skip
    for reason in reasons:
        assert reason in log, reason
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    assert "IPv6 zone id" in json.dumps(status)  # the left-out instances are on the status page
    backends_named = [line for line in config.splitlines() if line.startswith("backend ")]
    assert len(backends_named) == len(set(backends_named))
    assert sum(line.startswith("backend api__") for line in backends_named) == 2  # api! and api?, apart
    assert any(line.startswith("backend stats_") for line in backends_named)  # not the stats section
    spaced = config.split("\nbackend sp_ace_", 1)[1].split("\nbackend ", 1)[0]
    assert "\n    server " in spaced, spaced  # read once-quoted: its instance, not an empty backend
    slow = config.split("\nbackend slow\n", 1)[1].split("\nbackend ", 1)[0]
    assert "\n    server " in slow and "2147484s" not in config  # the setting ignored, the servers kept


def test_a_restart_while_a_service_redeploys_gives_its_name_to_no_case_variant(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """An attacker's re-review (/tmp/rev20): `Payments` out of the catalog for a redeploy, the
    renderer killed (a crash, an upgrade) and started again, and the variant `payments` waiting took
    the backend and Host `payments` for good: the hold lived in the process, and the live config no
    longer named `Payments`. The hold is kept beside the output (`.haproxy.cfg.memory.json`)."""
    victim = backends("Payments-1")
    register(consul_agent, victim, name="Payments", check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    url = f"http://127.0.0.1:{stack.http_port}/"
    wait_until(lambda: served_by(url, "payments") == "Payments-1", 30, "Payments served")
    put(consul_agent, f"/v1/agent/service/deregister/{victim.state.instance_id}", {})  # a redeploy: all gone first
    wait_until(lambda: "backend Payments" not in stack.config_path.read_text(), 30, "Payments out of the file")
    memory = stack.config_path.with_name(f".{stack.config_path.name}.memory.json")
    # Written behind the loop within WRITE_GAP_S of the hold's start (a crash before it forgets it).
    wait_until(lambda: json.loads(memory.read_text())["holders"]["payments"][2] is not None, 10, "the hold kept")
    stack.renderer.popen.kill()
    stack.renderer.popen.wait(10)
    register(consul_agent, backends("evil-1"), name="payments", check=False)  # the variant waits
    again = track(spawn("renderer-again", list(stack.renderer.popen.args), tmp_path / "renderer-again.log"))
    ready = f"http://127.0.0.1:{stack.status_port}/ready"
    wait_until(lambda: again.alive() and http_get(ready)[0] == 200, 30, "the restarted renderer ready")
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    held = [why for items in status["left_out"].values() for why in items if "had until" in why]
    assert held and served_by(url, "payments") != "evil-1", (held, status["left_out"])
    register(consul_agent, victim, name="Payments", check=False)  # back
    wait_until(lambda: served_by(url, "payments") == "Payments-1", 30, "Payments served again")


def test_a_service_named_like_an_address_takes_no_request_sent_by_address(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    pace: Pace,
) -> None:
    """helper-142 (/tmp/rev88, test_rev88_ip_name.py, _octet_name.py): a service named `127.0.0.1`
    took every request with Host 127.0.0.1 (clients and health checks that come by address) from the
    default backend, and one named `127` every Host 127.*. Through the real HAProxy: a Host that is
    an address (or localhost: helper-145) is routed by no service's name; the names still route
    names, and paths."""
    register(consul_agent, backends("web-0"), check=False)
    register(consul_agent, backends("evil-ip"), name="127.0.0.1", check=False)
    register(consul_agent, backends("evil-octet"), name="127", check=False)
    register(consul_agent, backends("evil-localhost"), name="localhost", check=False)  # helper-145
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    url = f"http://127.0.0.1:{stack.http_port}/"
    wait_until(lambda: served_by(f"{url}127/x", "other.example") == "evil-octet", pace(30), "the services rendered")
    for host in (
        "127.0.0.1",
        f"127.0.0.1:{stack.http_port}",
        "127.1.2.3",
        "10.0.0.1",
        "[::1]",
        f"[::1]:{stack.http_port}",
        "localhost",
        f"LocalHost:{stack.http_port}",
        "app.localhost",
    ):
        assert served_by(url, host) == "web-0", host
    assert served_by(url, "127.example") == "evil-octet"  # a name, not an address
    assert served_by(f"{url}127/x", "127.0.0.1") == "evil-octet"  # its path still routes it
