"""The Registrar's retries against a stub agent (a local HTTP server answering as we tell it): a
refusal (4xx) is final, an unreachable or failing agent is retried, and a stop ends the retry at
once, for `register`'s background registration and for the Docker registrator alike."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lab.processes import wait_until
from renderer.config import ConsulSettings
from renderer.errors import ConsulError
from renderer.registration.register import (
    BackgroundRegistration,
    Interrupted,
    Registrar,
    Registration,
    worth_retrying,
)
from renderer.registration.registrator import DockerRegistrator, LabelPolicy, serve
from renderer.source.client import ConsulRequestError
from tests.helpers import Pace
from tests.unit.test_registrator import FakeDocker, web

Answer = tuple[int, str]


class StubAgent:
    """Answers each request with `answer(method, path, body)`; keeps what it was sent."""

    def __init__(self, answer: Callable[[str, str, dict[str, Any] | None], Answer]) -> None:
        self.answer = answer
        self.requests: list[tuple[str, str, dict[str, Any] | None]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                stub.requests.append((self.command, self.path, body))
                status, text = stub.answer(self.command, self.path, body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = _reply

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def registered(self) -> list[str]:
        return [body["ID"] for method, path, body in self.requests if path.endswith("/register") and body]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent() -> Iterator[StubAgent]:
    stub = StubAgent(lambda method, path, body: (200, "{}" if method == "GET" else ""))
    yield stub
    stub.close()


def registrar(agent: StubAgent, retry_for: float | None = None) -> Registrar:
    return Registrar(ConsulSettings(addr=agent.addr), retry_for=retry_for)


def refuse_api(method: str, path: str, body: dict[str, Any] | None) -> Answer:
    if body and body.get("Name") == "api":
        return 400, "Invalid service address"
    return 200, "{}" if method == "GET" else ""


def always(status: int) -> Callable[[str, str, dict[str, Any] | None], Answer]:
    return lambda _method, _path, _body: (status, "No cluster leader")


@pytest.mark.parametrize(
    ("err", "retried"),
    [
        (ConsulRequestError("refused", 400), False),
        (ConsulRequestError("acl", 403), False),
        (ConsulRequestError("slow down", 429), True),
        (ConsulRequestError("no leader", 500), True),
        (ConsulError("not JSON"), True),
        (ConnectionRefusedError(), True),
        (Interrupted("stopped"), False),
    ],
)
def test_only_an_unreachable_or_failing_agent_is_retried(err: BaseException, retried: bool) -> None:
    assert worth_retrying(err) is retried


def test_a_refusal_is_not_retried_and_carries_consuls_words(agent: StubAgent) -> None:
    agent.answer = refuse_api
    with pytest.raises(ConsulRequestError, match=r"could not register api-1 .* Invalid service address") as caught:
        registrar(agent).register(Registration("api", 80, address="10.0.0.1", service_id="api-1"))
    assert caught.value.status == 400 and agent.registered() == ["api-1"]  # one request: no retry


def test_a_failing_agent_is_retried_until_it_answers(agent: StubAgent) -> None:
    answers = iter([(500, "No cluster leader"), (500, "No cluster leader")])
    agent.answer = lambda method, path, body: next(answers, (200, ""))
    assert registrar(agent).register(Registration("web", 80, service_id="web-1")) == "web-1"
    assert agent.registered() == ["web-1"] * 3


def test_interrupt_ends_a_retry_at_once(agent: StubAgent, pace: Pace) -> None:
    agent.answer = always(500)
    consul = registrar(agent)
    failures: list[BaseException] = []

    def register() -> None:
        try:
            consul.register(Registration("web", 80, service_id="web-1"))
        except ConsulError as err:
            failures.append(err)

    thread = threading.Thread(target=register)
    thread.start()
    wait_until(lambda: len(agent.requests) >= 3, 20, "the registration to be retried")
    started = time.monotonic()
    consul.interrupt()
    thread.join(5)
    assert time.monotonic() - started < pace(1.0) and not thread.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], Interrupted)


def test_withdraw_deregisters_what_went_through_and_nothing_else(agent: StubAgent) -> None:
    registering = BackgroundRegistration(registrar(agent), Registration("web", 80, service_id="web-1"))
    wait_until(lambda: registering.service_id, 10, "the registration")
    assert registering.withdraw() is True and registering.withdraw() is False  # once
    assert agent.requests[-1][:2] == ("PUT", "/v1/agent/service/deregister/web-1")
    agent.answer = always(500)
    requests = len(agent.requests)
    registering = BackgroundRegistration(registrar(agent), Registration("web", 80, service_id="web-2"))
    wait_until(lambda: len(agent.requests) > requests, 10, "a first attempt")
    assert registering.withdraw() is False
    assert all("deregister" not in path for _, path, _ in agent.requests[requests:])


def test_a_service_the_agent_no_longer_holds_counts_as_withdrawn(agent: StubAgent) -> None:
    """Consul after 1.8 answers 404 "Unknown service ID" to a withdrawal of a service it does not
    hold (deregistered by someone else, the agent restarted): the withdrawal is done, not failed
    and tried again at each stop event until the periodic sync (the last note's item)."""
    agent.answer = lambda method, path, body: (404, 'Unknown service ID "web-1". Ensure that the service ID is')
    assert registrar(agent).deregister("web-1") is True
    agent.answer = always(500)
    assert registrar(agent).deregister("web-1") is False
    agent.answer = lambda method, path, body: (404, "404 page not found")  # not Consul's: a proxy, a wrong path
    assert registrar(agent).deregister("web-1") is False


def test_a_refusal_ends_the_background_registration_and_is_raised_to_the_loop(agent: StubAgent) -> None:
    agent.answer = refuse_api
    registering = BackgroundRegistration(registrar(agent), Registration("api", 80, service_id="api-1"))

    def refused() -> bool:
        try:
            registering.raise_failure()
        except ConsulRequestError as err:
            return err.status == 400
        return False

    wait_until(refused, 10, "the refusal to reach the loop")
    assert registering.withdraw() is False and agent.registered() == ["api-1"]


def test_a_refused_container_does_not_block_the_next_one(agent: StubAgent, caplog: pytest.LogCaptureFixture) -> None:
    agent.answer = refuse_api
    docker = FakeDocker([web("a" * 64, **{"consul.service": "api"}), web("b" * 64)])
    registrator = DockerRegistrator(docker, registrar(agent), host="h1", policy=LabelPolicy(("*",)))
    with caplog.at_level(logging.WARNING):
        added, _ = registrator.sync()
    assert added == ["web-" + "b" * 12]
    assert agent.registered() == ["api-" + "a" * 12, "web-" + "b" * 12]  # the refusal was not retried
    assert f"container {'a' * 12}: service api not registered" in caplog.text
    assert "Invalid service address" in caplog.text


def test_a_registration_the_agent_keeps_failing_is_given_up_and_does_not_hold_the_next_one(
    agent: StubAgent, pace: Pace, caplog: pytest.LogCaptureFixture
) -> None:
    """A registration the agent answers 500 was retried for ever, so one container Consul could not
    take held every later event and sync of the registrator. With `failing_for` it is given up after
    that long (said once, tried again at the next sync); the next container is registered."""

    def fail_api(method: str, path: str, body: dict[str, Any] | None) -> Answer:
        if body and body.get("Name") == "api":
            return 500, "rpc error: internal"
        return 200, "{}" if method == "GET" else ""

    agent.answer = fail_api
    docker = FakeDocker([web("a" * 64, **{"consul.service": "api"}), web("b" * 64)])
    consul = Registrar(ConsulSettings(addr=agent.addr), failing_for=1.0)
    registrator = DockerRegistrator(docker, consul, host="h1", policy=LabelPolicy(("*",)))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        added, _ = registrator.sync()
    took = time.monotonic() - started
    assert added == ["web-" + "b" * 12]
    tries = agent.registered().count("api-" + "a" * 12)
    assert tries >= 2, "an answered failure is still retried, for a while"
    assert took < 1.0 + pace(6.0), f"the sync took {took:.1f} s behind one failing registration"
    assert f"container {'a' * 12}: service api not registered" in caplog.text and "rpc error" in caplog.text


class QuietDocker(FakeDocker):
    def events(self, decode: bool, filters: dict[str, str], since: int, until: int) -> list[dict[str, Any]]:
        time.sleep(0.05)
        return []


def test_stop_ends_the_registrators_retry_within_a_second(agent: StubAgent, pace: Pace) -> None:
    agent.answer = always(500)  # the agent is up but cannot take anything
    registrator = DockerRegistrator(QuietDocker([web("a" * 64)]), registrar(agent), host="h1")
    thread = threading.Thread(target=registrator.run, daemon=True)
    thread.start()
    wait_until(lambda: len(agent.requests) >= 3, 20, "the registrator to retry")
    started = time.monotonic()
    registrator.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < pace(1.0)


def test_serve_stops_on_sigterm_and_restores_the_handlers(agent: StubAgent, pace: Pace) -> None:
    agent.answer = always(500)  # run() is inside a retry when the signal comes
    registrator = DockerRegistrator(QuietDocker([web("a" * 64)]), registrar(agent), host="h1")
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    serve(registrator)
    assert time.monotonic() - started < pace(2.0) and signal.getsignal(signal.SIGTERM) is before


def test_serve_raises_what_ends_the_registrator(agent: StubAgent) -> None:
    agent.answer = lambda _method, _path, _body: (403, "Permission denied")  # listing the agent's services
    registrator = DockerRegistrator(QuietDocker([]), registrar(agent), host="h1")
    with pytest.raises(ConsulRequestError, match="ACL permission denied"):
        serve(registrator)


def old_agent(method: str, path: str, body: dict[str, Any] | None) -> Answer:
    """Consul 1.8.7, as measured: a registration naming DisableRedirects is refused whole."""
    if body and "DisableRedirects" in (body.get("Check") or {}):
        return 400, 'Request decode failed: json: unknown field "DisableRedirects"'
    return 200, "{}" if method == "GET" else ""


def test_a_containers_check_asks_the_agent_not_to_follow_redirects(agent: StubAgent) -> None:
    """helper-141 (/tmp/rev87, e3_redirect_ssrf.py): a check path answering 302 to the agent's own
    /v1/agent/self made the agent read it and keep it in the check's output."""
    docker = FakeDocker([web("a" * 64, **{"consul.check.http": "/health"})])
    DockerRegistrator(docker, registrar(agent), host="h1", policy=LabelPolicy(("*",))).sync()
    [(_, _, body)] = [r for r in agent.requests if r[1].endswith("/register")]
    assert body is not None and body["Check"]["DisableRedirects"] is True
    assert body["Check"]["HTTP"] == "http://172.17.0.5:8080/health"
    own = Registration("web", 80, address="10.0.0.1", service_id="w", check_http="/h").payload("10.0.0.1")
    assert "DisableRedirects" not in own["Check"]  # `register`'s own check: the operator's choice, as before


def test_an_agent_that_does_not_know_disable_redirects_is_asked_without_it_and_told_once(
    agent: StubAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.answer = old_agent
    docker = FakeDocker([web(c * 64, **{"consul.check.http": "/health"}) for c in "ab"])
    registrator = DockerRegistrator(docker, registrar(agent), host="h1", policy=LabelPolicy(("*",)))
    with caplog.at_level(logging.WARNING):
        added, _ = registrator.sync()
    assert added == ["web-" + "a" * 12, "web-" + "b" * 12]
    sent = [bool(body and "DisableRedirects" in body["Check"]) for _, path, body in agent.requests if body]
    assert sent == [True, False, False]  # refused once, then never sent again
    assert caplog.text.count("cannot stop HTTP checks from following redirects") == 1


def test_a_refusal_that_only_quotes_disable_redirects_does_not_switch_it_off(agent: StubAgent) -> None:
    """helper-143 (/tmp/rev89, e10.out, p10_fallback_trigger.py): Consul echoes a refused meta pair
    whole ("Couldn't load metadata pair ('consul-x', 'DisableRedirects')"), and any 400 naming the
    field switched it off for every later registration, on an agent that takes it."""

    def newer_agent(method: str, path: str, body: dict[str, Any] | None) -> Answer:
        if body and body.get("Name") == "evil":
            return 400, "Invalid Service Meta: Couldn't load metadata pair ('consul-x', 'DisableRedirects')"
        return 200, "{}" if method == "GET" else ""

    agent.answer = newer_agent
    checked = Registrar(ConsulSettings(addr=agent.addr))
    with pytest.raises(ConsulRequestError):
        checked.register(Registration("evil", 80, address="10.0.0.1", service_id="e", check_http="/h",
                                      follow_redirects=False))  # fmt: skip
    checked.register(
        Registration("web", 80, address="10.0.0.2", service_id="w", check_http="/h", follow_redirects=False)
    )
    sent = [body["Check"].get("DisableRedirects") for _, _, body in agent.requests if body]
    assert sent == [True, True]  # the refusal was not retried without it, and the next still asks
