"""The Docker registrator: containers carrying our labels are registered in Consul while they run.

Labels on a container:
    consul.service=web            the service name (required; containers without it are ignored)
    consul.port=8080              the port the service listens on (required)
    consul.tags=lb,v2             comma-separated tags
    consul.meta.<key>=<value>     service meta, e.g. consul.meta.weight=5
    consul.check.http=/health     an HTTP check (a path on the instance, or a URL)
    consul.check.interval=2s      its interval (default 2s)
    consul.address=10.0.0.5       the address to register (default: the container's IP, or for
                                  --network host containers this host's address towards the agent)

Every registration it makes carries `Meta["registered-by"] = "consul-renderer-registrator"` and
`Meta["registrator-host"]`, and it only ever removes registrations with both marks for its own
host: registrations made by anyone else are never touched. At start (and after every reconnect
to Docker) it syncs: registers what runs, removes its own registrations whose container is gone
(no ghosts after a restart of the registrator or of Docker). Then it follows Docker events.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import docker.errors
import requests.exceptions
from tenacity import Retrying, retry_if_exception_type, stop_never, wait_random_exponential

import docker
from renderer.registration.register import Registrar, Registration

log = logging.getLogger(__name__)

OWNER_KEY = "registered-by"
OWNER = "consul-renderer-registrator"
HOST_KEY = "registrator-host"
START_EVENTS = frozenset({"start", "unpause"})
STOP_EVENTS = frozenset({"die", "stop", "destroy", "pause", "oom"})  # not "kill": -s HUP is a reload
EVENT_WINDOW_S = 1


@dataclass(frozen=True)
class ContainerService:
    """What a container's labels ask for."""

    container_id: str
    name: str
    port: int
    address: str | None
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check_http: str | None = None
    check_interval: str = "2s"

    @property
    def service_id(self) -> str:
        return f"{self.name}-{self.container_id[:12]}"

    def registration(self, host: str) -> Registration:
        meta = {**self.meta, OWNER_KEY: OWNER, HOST_KEY: host, "container-id": self.container_id[:12]}
        return Registration(
            name=self.name,
            port=self.port,
            address=self.address,
            service_id=self.service_id,
            tags=self.tags,
            meta=meta,
            check_http=self.check_http,
            check_interval=self.check_interval,
            deregister_critical_after="1m" if self.check_http else None,
        )


def service_from_container(attrs: Mapping[str, Any]) -> ContainerService | None:
    """The service a container's labels describe, or None (no labels, or labels that don't parse)."""
    labels: Mapping[str, str] = (attrs.get("Config") or {}).get("Labels") or {}
    name = labels.get("consul.service")
    if not name:
        return None
    container_id = str(attrs.get("Id", ""))
    try:
        port = int(labels.get("consul.port", ""))
    except ValueError:
        log.warning(
            "container %s: label consul.port=%r is not a port; skipped", container_id[:12], labels.get("consul.port")
        )
        return None
    meta = {k.removeprefix("consul.meta."): v for k, v in labels.items() if k.startswith("consul.meta.")}
    tags = tuple(sorted(t.strip() for t in labels.get("consul.tags", "").split(",") if t.strip()))
    return ContainerService(
        container_id=container_id,
        name=name,
        port=port,
        address=labels.get("consul.address") or _container_ip(attrs),
        tags=tags,
        meta=meta,
        check_http=labels.get("consul.check.http"),
        check_interval=labels.get("consul.check.interval", "2s"),
    )


def _container_ip(attrs: Mapping[str, Any]) -> str | None:
    networks = ((attrs.get("NetworkSettings") or {}).get("Networks") or {}).values()
    for network in networks:
        if network.get("IPAddress"):
            return str(network["IPAddress"])
    return None  # --network host or none: the registrar uses this host's address


class DockerRegistrator:
    """Keeps Consul's registrations equal to the labelled containers running on this Docker host."""

    def __init__(self, docker_client: docker.DockerClient, registrar: Registrar, host: str | None = None) -> None:
        self._docker = docker_client
        self._registrar = registrar
        self.host = host or socket.gethostname()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Ends `run()` within one event window."""
        self._stop.set()

    def owned(self) -> dict[str, Mapping[str, Any]]:
        """Our registrations on the agent: id → service, for this host only."""
        services: Mapping[str, Mapping[str, Any]] = self._registrar.services()
        return {
            sid: svc
            for sid, svc in services.items()
            if (svc.get("Meta") or {}).get(OWNER_KEY) == OWNER and (svc.get("Meta") or {}).get(HOST_KEY) == self.host
        }

    def running(self) -> dict[str, ContainerService]:
        found = {}
        for container in self._docker.containers.list(filters={"label": "consul.service"}):
            service = service_from_container(container.attrs)
            if service is not None:
                found[service.service_id] = service
        return found

    def sync(self) -> tuple[list[str], list[str]]:
        """Register what runs, deregister our ghosts. Returns (registered ids, removed ids)."""
        running, owned = self.running(), self.owned()
        added = [
            self._registrar.register(svc.registration(self.host))
            for sid, svc in sorted(running.items())
            if sid not in owned
        ]
        removed = []
        for sid in sorted(set(owned) - set(running)):
            self._registrar.deregister(sid)
            removed.append(sid)
        log.info("sync: %d running, %d registered now, %d ghosts removed", len(running), len(added), len(removed))
        return added, removed

    def handle(self, event: Mapping[str, Any]) -> None:
        """Act on one Docker event."""
        action = str(event.get("status") or event.get("Action") or "")
        container_id = str(event.get("id") or (event.get("Actor") or {}).get("ID") or "")
        if action.startswith("health_status"):
            action = "start" if action.endswith("healthy") and not action.endswith("unhealthy") else "die"
        if action in START_EVENTS:
            self._on_start(container_id)
        elif action in STOP_EVENTS:
            self._on_stop(container_id)

    def _on_start(self, container_id: str) -> None:
        try:
            container = self._docker.containers.get(container_id)
        except docker.errors.NotFound:
            return
        service = service_from_container(container.attrs)
        if service is not None:
            self._registrar.register(service.registration(self.host))

    def _on_stop(self, container_id: str) -> None:
        for sid, svc in self.owned().items():
            if (svc.get("Meta") or {}).get("container-id") == container_id[:12]:
                self._registrar.deregister(sid)

    def run(self) -> None:
        """Sync, then follow events; on a lost Docker connection reconnect with backoff and sync again."""
        retrying = Retrying(
            retry=retry_if_exception_type(
                (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
            ),
            wait=wait_random_exponential(multiplier=0.5, max=15),
            stop=stop_never,
            before_sleep=lambda state: log.warning(
                "Docker unreachable (%s); reconnecting", state.outcome.exception() if state.outcome else "?"
            ),
        )
        for attempt in retrying:
            with attempt:
                if not self._stop.is_set():
                    self._follow()

    def _follow(self) -> None:
        """Sync, then read events in short windows until stopped.

        Each window is a request with `until` one second ahead, so the stream ends by itself and a
        stop takes effect within a second (closing the SDK's stream from another thread does not
        interrupt a read on a UNIX socket). Windows overlap by a second so no event is missed; an
        event seen twice is harmless, handling is idempotent.
        """
        self.sync()
        since = int(time.time())
        while not self._stop.is_set():
            until = int(time.time()) + EVENT_WINDOW_S
            events: Iterable[Mapping[str, Any]] = self._docker.events(
                decode=True, filters={"type": "container"}, since=since, until=until
            )
            for event in events:
                self.handle(event)
            since = until - 1
