"""The Docker registrator against a real Docker engine (our own dockerd) and a real Consul agent."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

import docker
from lab.processes import ManagedProcess, free_port, wait_until
from renderer.config import ConsulSettings
from renderer.registration.register import Registrar
from renderer.registration.registrator import HOST_KEY, OWNER, OWNER_KEY, DockerRegistrator
from tests.docker_engine import IMAGE, Engine, start_engine, unavailable_reason
from tests.helpers import consul_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    running = start_engine(tmp_path_factory.mktemp("docker"))
    yield running
    for cid in running.docker("ps", "-aq").split():
        running.docker("rm", "-f", cid)
    running.process.stop(timeout=20)


def run_web(engine: Engine, name: str, port: int, *labels: str) -> str:
    args = ["run", "-d", "--network", "host", "--name", name]
    for label in ("consul.service=web", f"consul.port={port}", "consul.tags=lb", *labels):
        args += ["--label", label]
    return engine.docker(*args, IMAGE, "/bin/busybox", "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www")


def registrar(agent: ManagedProcess) -> Registrar:
    return Registrar(ConsulSettings(addr=str(agent.extra["http_addr"])), retry_for=10)


def web_ids(agent: ManagedProcess) -> set[str]:
    return set(consul_client(agent).agent.services())


def test_sync_registers_running_removes_own_ghosts_keeps_foreign(
    engine: Engine, consul_agent: ManagedProcess, caplog: pytest.LogCaptureFixture
) -> None:
    c = consul_client(consul_agent)
    port = free_port()
    container = run_web(engine, "web-sync", port, "consul.meta.weight=5", "consul.check.http=/health")
    # A ghost of ours (its container is gone) and someone else's registration.
    c.agent.service.register("web", service_id="web-ghost", port=1, meta={OWNER_KEY: OWNER, HOST_KEY: "test-host"})
    c.agent.service.register("web", service_id="web-foreign", port=2)
    client = docker.DockerClient(base_url=engine.url)
    with caplog.at_level(logging.WARNING):
        added, removed = DockerRegistrator(client, registrar(consul_agent), host="test-host").sync()
    # Consul 1.8.7 refuses DisableRedirects (helper-141's F1): registered without it, said once.
    assert caplog.text.count("cannot stop HTTP checks from following redirects") == 1
    services = c.agent.services()
    sid = f"web-{container[:12]}"
    assert added == [sid] and removed == ["web-ghost"]
    assert "web-foreign" in services and "web-ghost" not in services
    assert services[sid]["Port"] == port and services[sid]["Meta"]["weight"] == "5"
    wait_until(lambda: c.health.service("web", passing=True)[1], 30, "the container's check to pass")
    # What Consul answers for our registration compares equal to what the container asks for: the
    # periodic sync registers nothing again (each registration moves every load balancer's catalog).
    assert DockerRegistrator(client, registrar(consul_agent), host="test-host").sync() == ([], [])
    # One left behind with another port (its container restarted while no registrator ran) is mended.
    meta = services[sid]["Meta"]
    c.agent.service.register("web", service_id=sid, address=services[sid]["Address"], port=1, meta=meta)
    assert DockerRegistrator(client, registrar(consul_agent), host="test-host").sync() == ([sid], [])
    assert c.agent.services()[sid]["Port"] == port
    engine.docker("rm", "-f", container)


def test_events_follow_container_lifecycle(engine: Engine, consul_agent: ManagedProcess) -> None:
    client = docker.DockerClient(base_url=engine.url)
    registrator = DockerRegistrator(client, registrar(consul_agent), host="test-host")
    thread = threading.Thread(target=registrator.run, daemon=True)
    thread.start()
    try:
        container = run_web(engine, "web-events", free_port())
        sid = f"web-{container[:12]}"
        wait_until(lambda: sid in web_ids(consul_agent), 30, "registration on start")
        engine.docker("stop", "-t", "1", container)
        wait_until(lambda: sid not in web_ids(consul_agent), 30, "deregistration on stop")
        engine.docker("start", container)
        wait_until(lambda: sid in web_ids(consul_agent), 30, "registration on restart")
        engine.docker("rm", "-f", container)
        wait_until(lambda: sid not in web_ids(consul_agent), 30, "deregistration on removal")
    finally:
        registrator.stop()
        thread.join(timeout=15)
    assert not thread.is_alive()


def test_docker_restart_reconnects_resyncs_and_follows_the_new_daemon(
    engine: Engine, consul_agent: ManagedProcess
) -> None:
    client = docker.DockerClient(base_url=engine.url)
    registrator = DockerRegistrator(client, registrar(consul_agent), host="test-host")
    thread = threading.Thread(target=registrator.run, daemon=True)
    thread.start()
    try:
        container = run_web(engine, "web-restart", free_port())
        sid = f"web-{container[:12]}"
        wait_until(lambda: sid in web_ids(consul_agent), 30, "registration")
        engine.restart()  # the container dies with the daemon: no ghost may stay
        wait_until(lambda: sid not in web_ids(consul_agent), 60, "the dead container's registration gone")
        assert thread.is_alive()  # survived losing Docker
        engine.docker("start", container)  # events of the new daemon are followed
        wait_until(lambda: sid in web_ids(consul_agent), 60, "registration after the daemon restart")
        engine.docker("rm", "-f", container)
    finally:
        registrator.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_hostile_labels_and_refused_registrations_skip_only_their_own_container(
    engine: Engine, consul_agent: ManagedProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = docker.DockerClient(base_url=engine.url)
    registrator = DockerRegistrator(client, registrar(consul_agent), host="test-host")
    thread = threading.Thread(target=registrator.run, daemon=True)
    thread.start()
    started: list[str] = []
    try:
        with caplog.at_level(logging.WARNING, logger="renderer.registration.registrator"):
            started.append(run_web(engine, "web-url-check", free_port(), "consul.check.http=http://169.254.169.254/"))
            started.append(run_web(engine, "web-wide-port", free_port(), "consul.port=８０"))
            # Passes our checks, but Consul refuses an HTTP check at interval 0: a 400, not retried. (Its
            # meta prefix `consul-` served here before helper-143; the label refuses that one now.)
            started.append(
                run_web(engine, "web-refused", free_port(), "consul.check.http=/health", "consul.check.interval=0s")
            )
            started.append(good := run_web(engine, "web-good", free_port()))
            wait_until(lambda: f"web-{good[:12]}" in web_ids(consul_agent), 30, "the good container's registration")
            wait_until(lambda: "not registered" in caplog.text, 10, "Consul's refusal to be logged")
        assert web_ids(consul_agent) & {f"web-{cid[:12]}" for cid in started[:3]} == set()
        assert f"container {started[0][:12]}: label consul.check.http='http://169.254.169.254/'" in caplog.text
        assert f"container {started[1][:12]}: label consul.port='８０'" in caplog.text
        assert f"container {started[2][:12]}: service web not registered: " in caplog.text
        assert thread.is_alive()
    finally:
        registrator.stop()
        thread.join(timeout=15)
        for cid in started:
            engine.docker("rm", "-f", cid)
    assert not thread.is_alive()
