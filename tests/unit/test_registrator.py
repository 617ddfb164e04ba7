"""The Docker registrator's decisions, with our own seams faked (the Docker SDK client and the
Registrar); the live engine is in tests/integration/test_registrator.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from renderer.registration.register import Registration
from renderer.registration.registrator import HOST_KEY, OWNER, OWNER_KEY, DockerRegistrator, service_from_container


def container(cid: str, **labels: str) -> dict[str, Any]:
    networks = {"bridge": {"IPAddress": "172.17.0.5"}}
    return {"Id": cid, "Config": {"Labels": labels}, "NetworkSettings": {"Networks": networks}}


@dataclass
class Listed:
    attrs: dict[str, Any]


class FakeDocker:
    def __init__(self, containers: list[dict[str, Any]]) -> None:
        self.containers = self
        self._listed = [Listed(c) for c in containers]

    def list(self, filters: dict[str, str]) -> list[Listed]:
        return self._listed


class FakeRegistrar:
    def __init__(self, services: dict[str, Any]) -> None:
        self._services = services
        self.registered: list[Registration] = []
        self.deregistered: list[str] = []

    def services(self) -> dict[str, Any]:
        return self._services

    def register(self, registration: Registration) -> str:
        self.registered.append(registration)
        return registration.id

    def deregister(self, service_id: str) -> None:
        self.deregistered.append(service_id)


def test_labels_describe_the_service_and_bad_ones_skip_the_container() -> None:
    svc = service_from_container(container("a" * 64, **{"consul.service": "web", "consul.port": "8080",
                                                       "consul.tags": "lb, x", "consul.meta.weight": "5"}))  # fmt: skip
    assert svc is not None
    assert (svc.name, svc.port, svc.address, svc.tags, dict(svc.meta)) == ("web", 8080, "172.17.0.5", ("lb", "x"),
                                                                          {"weight": "5"})  # fmt: skip
    assert service_from_container(container("b" * 64, **{"consul.service": "web", "consul.port": "http"})) is None
    assert service_from_container(container("c" * 64)) is None


def test_sync_registers_what_runs_and_removes_only_its_own_ghosts() -> None:
    running = container("a" * 64, **{"consul.service": "web", "consul.port": "8080"})
    ours = {OWNER_KEY: OWNER, HOST_KEY: "h1"}
    agent = {
        "web-" + "d" * 12: {"Meta": ours},  # ours, its container is gone: a ghost
        "web-" + "e" * 12: {"Meta": {OWNER_KEY: OWNER, HOST_KEY: "h2"}},  # another host's
        "api-1": {"Meta": {}},  # registered by someone else
    }
    registrar = FakeRegistrar(agent)
    added, removed = DockerRegistrator(FakeDocker([running]), registrar, host="h1").sync()  # type: ignore[arg-type]
    assert added == ["web-" + "a" * 12] and removed == ["web-" + "d" * 12]
    assert registrar.registered[0].meta[HOST_KEY] == "h1"
