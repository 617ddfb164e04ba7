"""Self-registration: put a service instance into Consul for as long as it runs, and take it out after.

`consul-renderer register --name web --port 8080 -- COMMAND …` starts COMMAND, registers the
instance with the local agent (retrying with backoff while the agent is not up), forwards signals
to COMMAND, and deregisters when COMMAND ends. On SIGTERM or SIGINT it deregisters *first*, so
load balancers stop sending traffic, and only then passes the signal on. Apps in Python can do
the same with `registered(Registration(...))` around their serving loop.

An instance that dies without deregistering (SIGKILL, a crashed host) leaves through its failing
health check, and Consul reaps it after `deregister_critical_after`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import consul
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_never, wait_random_exponential

from renderer.children import Child
from renderer.config import ConsulSettings
from renderer.errors import ConfigError, ConsulError
from renderer.source.client import raise_for_status

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Registration:
    """One service instance as the agent API takes it."""

    name: str
    port: int
    address: str | None = None  # default: the address this host uses to reach the agent
    service_id: str | None = None  # default: NAME-HOSTNAME-PORT
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check_http: str | None = None  # a path (/health) or a full URL
    check_interval: str = "2s"
    check_timeout: str = "1s"
    deregister_critical_after: str | None = None

    @property
    def id(self) -> str:
        return self.service_id or f"{self.name}-{socket.gethostname()}-{self.port}"

    def payload(self, default_address: str) -> dict[str, Any]:
        address = self.address or default_address
        body: dict[str, Any] = {
            "Name": self.name,
            "ID": self.id,
            "Address": address,
            "Port": self.port,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
        }
        if self.check_http:
            url = self.check_http
            if url.startswith("/"):
                host = f"[{address}]" if ":" in address else address
                url = f"http://{host}:{self.port}{url}"
            check: dict[str, Any] = {"HTTP": url, "Interval": self.check_interval, "Timeout": self.check_timeout}
            if self.deregister_critical_after:
                check["DeregisterCriticalServiceAfter"] = self.deregister_critical_after
            body["Check"] = check
        return body


def address_towards(host: str, port: int) -> str:
    """The local address the kernel would use to reach host:port (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class Registrar:
    """Registers and deregisters through the local agent, with retries while it is not up."""

    def __init__(self, settings: ConsulSettings, retry_for: float | None = None) -> None:
        host, port, scheme = settings.host_port_scheme
        self._client = consul.Consul(
            host=host, port=port, scheme=scheme, verify=settings.tls_verify, cert=settings.client_cert
        )
        self._client.token = settings.token  # ours, resolved by config; py-consul would prefer the env
        self._agent_host, self._agent_port = host, port
        self._retry_for = retry_for

    def _retrying(self) -> Retrying:
        return Retrying(
            retry=retry_if_exception_type((OSError, ConsulError)),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(self._retry_for) if self._retry_for is not None else stop_never,
            before_sleep=lambda state: log.warning(
                "Consul agent at %s:%s not ready (%s); retrying",
                self._agent_host,
                self._agent_port,
                state.outcome.exception() if state.outcome else "?",
            ),
            reraise=True,
        )

    def register(self, registration: Registration) -> str:
        body = registration.payload(address_towards(self._agent_host, self._agent_port))
        try:
            for attempt in self._retrying():
                with attempt:
                    self._put("/v1/agent/service/register", body)
        except (OSError, ConsulError) as err:
            raise ConsulError(f"could not register {registration.id} with the agent: {err}") from err
        log.info("registered %s (%s:%s)", registration.id, body["Address"], body["Port"])
        return registration.id

    def services(self) -> dict[str, Any]:
        """The agent's services: id → service definition (with Meta)."""
        for attempt in self._retrying():
            with attempt:
                path = "/v1/agent/services"
                services: dict[str, Any] = self._client.http.get(_checked(path), path, headers=self._headers())
                return services
        raise AssertionError("unreachable")

    def deregister(self, service_id: str) -> None:
        try:
            self._put(f"/v1/agent/service/deregister/{service_id}", None)
            log.info("deregistered %s", service_id)
        except (OSError, ConsulError) as err:
            log.error("could not deregister %s (its health check will take it out): %s", service_id, err)

    def _put(self, path: str, body: Mapping[str, Any] | None) -> None:
        data = json.dumps(body) if body is not None else ""
        self._client.http.put(_checked(path), path, data=data, headers=self._headers())

    def _headers(self) -> dict[str, str] | None:
        return {"X-Consul-Token": self._client.token} if self._client.token else None


def _checked(path: str) -> Callable[[Any], Any]:
    """py-consul's response callback, through the one status → error mapping (source/client.py)."""

    def decode(response: Any) -> Any:
        raise_for_status(response.code, response.body, path)
        return json.loads(response.body) if response.body else None

    return decode


@contextlib.contextmanager
def registered(registration: Registration, settings: ConsulSettings | None = None) -> Iterator[str]:
    """Keep `registration` in Consul for the duration of the block; yields the service id."""
    registrar = Registrar(settings or ConsulSettings())
    service_id = registrar.register(registration)
    try:
        yield service_id
    finally:
        registrar.deregister(service_id)


@dataclass(frozen=True)
class Supervision:
    drain_delay: float = 2.0  # between deregistering and stopping the child: load balancers catch up
    kill_after: float = 10.0  # SIGKILL a child that ignores the stop signal this long


def run_registered(
    registration: Registration, settings: ConsulSettings, command: list[str], supervision: Supervision | None = None
) -> int:
    """Run `command` (or just wait, without one) registered in Consul; return its exit status.

    Signal handlers only record the signal; this loop acts. SIGTERM/SIGINT: deregister, wait
    `drain_delay` so load balancers stop sending traffic, pass the signal on, SIGKILL after
    `kill_after`. Other signals (HUP, USR1, USR2) are passed on at once.
    """
    supervision = supervision or Supervision()
    registrar = Registrar(settings)
    received: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        wake.set()

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, on_signal)
    child: Child | None = None
    service_id: str | None = None
    try:
        if command:
            child = Child.start(command, ConfigError)
        service_id = registrar.register(registration)
        stop_signal = _wait(child, received, wake)
        if stop_signal is None:  # the child ended on its own
            assert child is not None
            return child.wait()
        registrar.deregister(service_id)
        service_id = None
        if child is None:
            return 0
        time.sleep(supervision.drain_delay)
        return child.stop(stop_signal, supervision.kill_after)
    finally:
        if service_id is not None:
            registrar.deregister(service_id)
        if child is not None and child.returncode is None:
            child.stop(signal.SIGTERM, supervision.kill_after)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


def _wait(child: Child | None, received: list[int], wake: threading.Event) -> int | None:
    """Until the child ends (None) or a stop signal arrives (the signal); other signals pass on."""
    while child is None or child.returncode is None:
        wake.wait(0.2)
        wake.clear()
        while received:
            signum = received.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                return signum
            if child is not None:
                child.send(signum)
    return None


def parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    return meta


def child_exit_status(code: int) -> int:
    """A child killed by a signal returns -N from Popen.wait; shells report 128+N."""
    return 128 - code if code < 0 else code
