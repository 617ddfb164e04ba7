"""Self-registration: put a service instance into Consul for as long as it runs, and take it out after.

`consul-renderer register --name web --port 8080 -- COMMAND …` starts COMMAND, registers the
instance with the local agent (retrying with backoff while the agent is not up), forwards signals
to COMMAND, and deregisters when COMMAND ends. On SIGTERM or SIGINT it deregisters *first*, so
load balancers stop sending traffic, and only then passes the signal on. Apps in Python can do
the same with `registered(Registration(...))` around their serving loop.

While the agent is not up, registering is retried with backoff; a 4xx answer (other than 408
and 429) is Consul refusing the request itself and is not retried (`register` then stops COMMAND
and exits 3). SIGTERM or SIGINT while the registration is still being retried ends the retry at
once: nothing was registered, so there is nothing to deregister and no drain delay (if an attempt
was in flight it ends within REQUEST_TIMEOUT_S, and what it registered is deregistered with one
attempt), and the signal goes straight on to COMMAND. The exit status is the same as for a signal
at any other time: COMMAND's status (143 for a command that SIGTERM ends), 0 without a command.

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
from typing import Any, TypeVar

import consul
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    stop_when_event_set,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from renderer.children import Child
from renderer.config import ConsulSettings
from renderer.errors import ConfigError, ConsulError
from renderer.haproxy.checked import Reach, address_reach
from renderer.source.client import ConsulRequestError, raise_for_status

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
REQUEST_TIMEOUT_S = 5.0  # one request to the local agent: a stop waits for at most one of these
POLL_S = 0.1  # how often the supervising loop looks at signals and the child

T = TypeVar("T")


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
    # False: the agent is asked not to follow the check's redirects (the registrator's, whose check
    # path a container's owner chooses: see Registrar._put_registration)
    follow_redirects: bool = True

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
            if not self.follow_redirects:
                check["DisableRedirects"] = True
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


def local_address_warning(service_id: str, address: str) -> str | None:
    """What to tell when `address` leads to the registering host itself (loopback, link-local, …):
    load balancers refuse such a server address unless they allow local addresses, so the
    instance would get no traffic. None for any other address."""
    if address_reach(address) is not Reach.LOCAL:
        return None
    return (
        f"{service_id} is registered at {address}, a local address: consul-renderer load balancers leave it out "
        "unless they run with allow_local_addresses = true (--allow-local-addresses true), which only suits "
        "apps on the load balancer's own host; pass --address with an address the load balancers reach"
    )


def sleeping_on(event: threading.Event) -> Callable[[float], None]:
    """A retry's sleep that `event.set()` ends at once (tenacity's default is time.sleep)."""

    def sleep(seconds: float) -> None:
        event.wait(seconds)

    return sleep


class Interrupted(ConsulError):
    """`Registrar.interrupt()` ended a retry (a stop signal): not an answer of Consul's."""


def worth_retrying(err: BaseException) -> bool:
    """The agent is unreachable, failing (5xx, an answer that does not parse) or asks to slow down
    (408, 429). Any other 4xx is Consul refusing the request itself: the same request gets the
    same answer, so it is not retried."""
    if isinstance(err, Interrupted):
        return False
    if isinstance(err, ConsulRequestError) and err.status is not None and 400 <= err.status < 500:
        return err.status in (408, 429)
    return isinstance(err, OSError | ConsulError)


class _AnsweredFailing(stop_base):
    """A retry's stop: the agent answered (it is not unreachable) with a failure, `limit_s` or more
    after the first try."""

    def __init__(self, limit_s: float) -> None:
        self._limit_s = limit_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        err = retry_state.outcome.exception() if retry_state.outcome else None
        elapsed = retry_state.seconds_since_start
        return isinstance(err, ConsulError) and elapsed is not None and elapsed >= self._limit_s


class Registrar:
    """Registers and deregisters through the local agent, with retries while it is not up.

    `interrupt()` (from another thread) ends a retry in progress at once with `Interrupted`, and
    from then on nothing is retried or registered; `deregister` still makes its one attempt, so a
    stopping caller can take out what it registered. Every request is bounded by REQUEST_TIMEOUT_S.
    """

    def __init__(
        self, settings: ConsulSettings, retry_for: float | None = None, failing_for: float | None = None
    ) -> None:
        host, port, scheme = settings.host_port_scheme
        self._client = consul.Consul(
            host=host,
            port=port,
            scheme=scheme,
            verify=settings.tls_verify,
            cert=settings.client_cert,
            connections_timeout=REQUEST_TIMEOUT_S,
        )
        self._client.token = settings.token  # ours, resolved by config; py-consul would prefer the env
        self._agent_host, self._agent_port = host, port
        self._retry_for = retry_for
        # a registration the agent answers with a failure (5xx, or an answer that does not parse) is
        # tried again this long at most (None: until it is taken): one it cannot take must not hold
        # every later one (the registrator's)
        self._failing_for = failing_for
        self._interrupted = threading.Event()
        self._redirects_kept = False  # the agent refused DisableRedirects (older than Consul 1.12): said once

    def interrupt(self) -> None:
        """End any retry in progress now (it raises Interrupted) and refuse later ones."""
        self._interrupted.set()

    def _retrying(self, failing_for: float | None = None) -> Retrying:
        stop: stop_base = stop_when_event_set(self._interrupted)
        if self._retry_for is not None:
            stop = stop | stop_after_delay(self._retry_for)
        if failing_for is not None:
            stop = stop | _AnsweredFailing(failing_for)
        return Retrying(
            retry=retry_if_exception(worth_retrying),
            wait=wait_random_exponential(multiplier=0.2, max=5),
            stop=stop,
            sleep=sleeping_on(self._interrupted),  # interrupt() ends the wait at once
            before_sleep=lambda state: log.warning(
                "Consul agent at %s:%s not ready (%s); retrying",
                self._agent_host,
                self._agent_port,
                state.outcome.exception() if state.outcome else "?",
            ),
            reraise=True,
        )

    def _retried(self, what: str, request: Callable[[], T], failing_for: float | None = None) -> T:
        """`request()`, retried while `worth_retrying` (an answered failure for `failing_for` at
        most); Interrupted once `interrupt()` was called."""
        try:
            for attempt in self._retrying(failing_for):
                with attempt:
                    if self._interrupted.is_set():
                        raise Interrupted(f"{what}: stopped")
                    return request()
        except (OSError, ConsulError) as err:
            if self._interrupted.is_set() and not isinstance(err, Interrupted):
                raise Interrupted(f"{what}: stopped while the agent was not ready ({err})") from err
            raise
        raise AssertionError("unreachable")

    def register(self, registration: Registration) -> str:
        """Register; raises Interrupted, ConsulRequestError (a refusal, with its status) or ConsulError."""
        body = registration.payload(address_towards(self._agent_host, self._agent_port))
        what = f"register {registration.id}"
        try:
            self._retried(what, lambda: self._put_registration(body), self._failing_for)
        except Interrupted:
            raise
        except ConsulRequestError as err:
            raise ConsulRequestError(f"could not {what} with the agent: {err}", err.status) from err
        except (OSError, ConsulError) as err:
            raise ConsulError(f"could not {what} with the agent: {err}") from err
        log.info("registered %s (%s:%s)", registration.id, body["Address"], body["Port"])
        warning = local_address_warning(registration.id, str(body["Address"]))
        if warning is not None:
            log.warning("%s", warning)
        return registration.id

    def _put_registration(self, body: dict[str, Any]) -> None:
        """The registration, without `DisableRedirects` once the agent refused that field.

        A container's check that answers a redirect sends the agent where it points (Go follows
        up to 10), and the agent keeps the answer in the check's output: helper-141 read the
        agent's own /v1/agent/self there from a container that could not reach it. Consul takes
        `DisableRedirects` from 1.12 (and later patch releases of 1.9-1.11); 1.8.7 refuses the
        whole registration for it (400, unknown field), so it is sent until refused once, then
        never again, and said once: on such an agent a container's check can still be redirected."""
        check = body.get("Check")
        if self._redirects_kept and isinstance(check, dict):
            check.pop("DisableRedirects", None)
        try:
            self._put("/v1/agent/service/register", body)
        except ConsulRequestError as err:
            # Consul's own words for the field, not the word anywhere: it echoes a refused meta pair
            # whole, and a container's meta value `DisableRedirects` switched the field off for
            # every later container on an agent that takes it (helper-143).
            if err.status != 400 or UNKNOWN_REDIRECTS_FIELD not in str(err) or not isinstance(check, dict):
                raise
            if not check.pop("DisableRedirects", None):
                raise
            self._redirects_kept = True
            log.warning(
                "the Consul agent at %s:%s cannot stop HTTP checks from following redirects (DisableRedirects: "
                "Consul 1.12 and later): a container whose check path redirects can make the agent fetch any "
                "URL it reaches and keep the answer in the check's output; upgrade the agent where those who "
                "start containers are not trusted",
                self._agent_host, self._agent_port,
            )  # fmt: skip
            self._put("/v1/agent/service/register", body)

    def services(self) -> dict[str, Any]:
        """The agent's services: id → service definition (with Meta)."""
        path = "/v1/agent/services"
        services = self._retried("list the agent's services", lambda: self._get(path))
        if not isinstance(services, dict):
            raise ConsulError(f"{path}: expected an object, Consul answered a {type(services).__name__}")
        return services

    def deregister(self, service_id: str) -> bool:
        """One attempt (bounded by REQUEST_TIMEOUT_S), also after interrupt(): whether Consul took
        it (a failure is logged, and the caller may try again)."""
        path = f"/v1/agent/service/deregister/{service_id}"
        try:
            gone = self._client.http.put(_checked(path, gone_is_done=True), path, data="", headers=self._headers())
        except (OSError, ConsulError) as err:
            log.error("could not deregister %s (its health check will take it out): %s", service_id, err)
            return False
        if gone is _GONE:
            log.info("%s was no longer registered (deregistered by someone else, or the agent restarted)", service_id)
        else:
            log.info("deregistered %s", service_id)
        return True

    def _get(self, path: str) -> Any:
        return self._client.http.get(_checked(path), path, headers=self._headers())

    def _put(self, path: str, body: Mapping[str, Any] | None) -> None:
        data = json.dumps(body) if body is not None else ""
        self._client.http.put(_checked(path), path, data=data, headers=self._headers())

    def _headers(self) -> dict[str, str] | None:
        return {"X-Consul-Token": self._client.token} if self._client.token else None


# What Consul 1.8.7 answers for a registration naming DisableRedirects (measured; 400)
UNKNOWN_REDIRECTS_FIELD = 'Request decode failed: json: unknown field "DisableRedirects"'
_GONE = object()  # what `_checked(…, gone_is_done=True)` returns for Consul's "Unknown service ID"
UNKNOWN_SERVICE = "Unknown service ID"  # Consul's 404 reason for a service it does not hold (after 1.8)


def _checked(path: str, gone_is_done: bool = False) -> Callable[[Any], Any]:
    """py-consul's response callback, through the one status → error mapping (source/client.py);
    `gone_is_done`: Consul's 404 "Unknown service ID" (after 1.8, of a service it does not hold) is
    `_GONE`. Any other 404 (a proxy in front of the agent, a wrong address) is an error: the
    withdrawal is tried again, not counted done."""

    def decode(response: Any) -> Any:
        if gone_is_done and response.code == 404 and UNKNOWN_SERVICE in str(response.body or "")[:200]:
            return _GONE
        raise_for_status(response.code, response.body, path)
        try:
            return json.loads(response.body) if response.body else None
        except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than Python parses
            raise ConsulError(f"{path}: Consul's answer is not JSON ({type(err).__name__})") from err

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


class BackgroundRegistration:
    """`Registrar.register` on its own thread, so that the loop stays free to act on signals and on
    the child while the agent is not up."""

    def __init__(self, registrar: Registrar, registration: Registration) -> None:
        self._registrar = registrar
        self._registration = registration
        self.service_id: str | None = None
        self._failure: ConsulError | None = None
        self._thread = threading.Thread(target=self._register, name="register", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        try:
            self.service_id = self._registrar.register(self._registration)
        except Interrupted:
            log.info("stopped before %s was registered", self._registration.id)
        except ConsulError as err:
            self._failure = err

    def raise_failure(self) -> None:
        """Raise what ended the registration for good (a refusal, or retries exhausted), if anything did."""
        if self._failure is not None:
            raise self._failure

    def withdraw(self) -> bool:
        """Stop retrying; deregister what was registered (one attempt). True if something was."""
        self._registrar.interrupt()
        self._thread.join(REQUEST_TIMEOUT_S + 1)  # an attempt in flight ends within its timeout
        if self._thread.is_alive():
            log.warning("registering %s did not end; its health check will take it out", self._registration.id)
        service_id, self.service_id = self.service_id, None
        if service_id is None:
            return False
        self._registrar.deregister(service_id)
        return True


def run_registered(
    registration: Registration, settings: ConsulSettings, command: list[str], supervision: Supervision | None = None
) -> int:
    """Run `command` (or just wait, without one) registered in Consul; return its exit status.

    Signal handlers only record the signal; this loop acts. SIGTERM/SIGINT: deregister, wait
    `drain_delay` so load balancers stop sending traffic, pass the signal on, SIGKILL after
    `kill_after`. Before the registration went through, the retry ends and the signal is passed
    on at once. Other signals (HUP, USR1, USR2) are passed on at once. A registration Consul
    refuses raises its ConsulError (after the child was stopped).
    """
    supervision = supervision or Supervision()
    registrar = Registrar(settings)
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)  # no lock is taken in a handler: it could be the one this thread holds

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, on_signal)
    child: Child | None = None
    registering: BackgroundRegistration | None = None
    try:
        if command:
            child = Child.start(command, ConfigError)
        registering = BackgroundRegistration(registrar, registration)
        stop_signal = _wait(child, received, registering)
        if stop_signal is None:  # the child ended on its own
            assert child is not None
            return child.wait()
        was_registered = registering.withdraw()
        if child is None:
            return 0
        if was_registered:
            time.sleep(supervision.drain_delay)
        return child.stop(stop_signal, supervision.kill_after)
    finally:
        if registering is not None:
            registering.withdraw()
        if child is not None and child.returncode is None:
            child.stop(signal.SIGTERM, supervision.kill_after)
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)


def _wait(child: Child | None, received: list[int], registering: BackgroundRegistration) -> int | None:
    """Until the child ends (None) or a stop signal arrives (the signal); other signals pass on.
    Raises the registration's failure."""
    while child is None or child.returncode is None:
        registering.raise_failure()
        time.sleep(POLL_S)  # a signal's handler runs at once; the sleep then resumes, so ≤ POLL_S late
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
