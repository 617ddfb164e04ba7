"""The renderer's own registration: registered once, its TTL check pushed with the status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from renderer.errors import ApplyKind, ConsulError, FailureReason
from renderer.registration import sidecar
from renderer.registration.sidecar import SERVICE_NAME, SelfRegistration
from renderer.status import Status


class RecordingClient:
    def __init__(self) -> None:
        self.puts: list[tuple[str, Any]] = []

    async def put(self, path: str, body: object | None, timeout_s: float = 10.0) -> None:
        self.puts.append((path, body))


def test_the_first_update_registers_then_pushes_the_check_and_deregister_removes_it() -> None:
    client = RecordingClient()
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", "backend web\n    server a 1.2.3.4:80\n", ApplyKind.RELOAD, 0.02)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
    registration = SelfRegistration(client, status, ("127.0.0.1", 9464))

    async def scenario() -> None:
        await registration.update()
        await registration.update()
        await registration.deregister()

    asyncio.run(scenario())
    paths = [path for path, _ in client.puts]
    assert paths[0] == "/v1/agent/service/register" and paths.count("/v1/agent/service/register") == 1
    register_body = client.puts[0][1]
    assert register_body["Name"] == SERVICE_NAME and register_body["Meta"]["status_url"].endswith("/status")
    check = client.puts[1][1]
    assert check["Status"] == "passing" and "1 backend(s), 1 server(s)" in check["Output"]
    assert paths[-1] == f"/v1/agent/service/deregister/{registration.service_id}"


class FakeClock:
    """The sidecar module's clock and sleep, moved by hand: the event loop keeps the real ones."""

    def __init__(self, monkeypatch: Any) -> None:
        self.now = 1000.0
        self.real_sleep = asyncio.sleep
        monkeypatch.setattr(sidecar, "time", SimpleNamespace(monotonic=lambda: self.now))
        monkeypatch.setattr(sidecar, "asyncio", SimpleNamespace(sleep=self.sleep))

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await self.real_sleep(0)


def test_two_pushes_that_hang_in_a_row_still_leave_a_third_within_the_ttl(monkeypatch: Any) -> None:
    """A local agent that hangs: each PUT waits out its timeout, then fails. Two in a row at the
    push's turn (the check update, then the re-registration that follows a failure) must still leave
    a successful push before the TTL since the last one runs out, or the renderer turns critical."""
    clock = FakeClock(monkeypatch)
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", "backend web\n    server a 1.2.3.4:80\n", ApplyKind.RELOAD, 0.02)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
    pushed: list[float] = []  # fake times of the check updates that succeeded
    hangs = [0]

    class HangingAgent:
        async def put(self, path: str, body: object | None, timeout_s: float = 10.0) -> None:
            if pushed and hangs[0] < 2:  # after the first push: two requests hang, then all is well
                hangs[0] += 1
                clock.now += timeout_s
                raise ConsulError(f"timed out after {timeout_s} s")
            if path.startswith("/v1/agent/check/update/"):
                pushed.append(clock.now)

    async def scenario() -> None:
        task = asyncio.create_task(SelfRegistration(HangingAgent(), status, None).run())
        async with asyncio.timeout(5):  # real seconds
            while len(pushed) < 2:
                await clock.real_sleep(0)
        task.cancel()

    asyncio.run(scenario())
    assert hangs[0] == 2
    assert pushed[1] - pushed[0] < sidecar.CHECK_TTL_S  # 27 s (with 10 s timeouts: 37 s, critical)


def test_an_unchanged_check_is_pushed_every_half_ttl_and_a_change_within_a_second(monkeypatch: Any) -> None:
    """Idle, the check costs the agent 4 requests a minute (TTL 30 s, pushed every 15 s); a change of
    its status still reaches Consul within STATUS_POLL_S."""
    client = RecordingClient()
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", "backend web\n    server a 1.2.3.4:80\n", ApplyKind.RELOAD, 0.02)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
    registration = SelfRegistration(client, status, None)
    clock = FakeClock(monkeypatch)

    def updates() -> list[str]:
        return [body["Status"] for path, body in client.puts if path.startswith("/v1/agent/check/update/")]

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(registration.run())
        async with asyncio.timeout(5):  # real seconds: the fake minute takes a few ms
            while clock.now < 1000.0 + 60.0:
                await clock.real_sleep(0)
            idle = len(updates())
            status.fail("/etc/haproxy/haproxy.cfg", FailureReason.RELOAD, "HAProxy refused the reload")
            start = clock.now
            while len(updates()) == idle:
                await clock.real_sleep(0)
        task.cancel()
        return idle, round(clock.now - start)

    idle, took = asyncio.run(scenario())
    assert sidecar.CHECK_REPUSH_S == sidecar.CHECK_TTL_S / 2
    assert idle == 4  # in the first minute, at 0, 15, 30 and 45 s (TTL/3 made it 6)
    assert took <= sidecar.STATUS_POLL_S
    assert updates()[-1] != "passing"


def test_the_host_name_in_a_path_is_quoted(monkeypatch: Any) -> None:
    """Request paths go out as given (ConsulClient quotes nothing again): a host name with `#` or
    `%` must not cut or change the check's path."""
    monkeypatch.setattr(sidecar.socket, "gethostname", lambda: "h#x%41")
    client = RecordingClient()
    registration = SelfRegistration(client, Status(templates=1), None)

    async def scenario() -> None:
        await registration.update()
        await registration.deregister()

    asyncio.run(scenario())
    paths = [path for path, _ in client.puts]
    assert paths[1] == "/v1/agent/check/update/service:consul-renderer-h%23x%2541"
    assert paths[-1] == "/v1/agent/service/deregister/consul-renderer-h%23x%2541"


def test_an_ipv6_status_address_gives_urls_that_parse() -> None:
    from urllib.parse import urlsplit

    client = RecordingClient()
    registration = SelfRegistration(client, Status(templates=1), ("::1", 9464))
    asyncio.run(registration.update())
    meta = client.puts[0][1]["Meta"]
    assert meta["page_url"] == "http://[::1]:9464/" and urlsplit(meta["status_url"]).port == 9464


def test_a_status_view_that_raises_does_not_end_the_self_registration(monkeypatch: Any) -> None:
    """An attacker's review: a status view that raised (a served file it could not read) ended the
    task for good: its TTL check went critical and Consul deregistered the renderer, which went on
    working. Now the failure is logged and the next round tries again."""
    FakeClock(monkeypatch)
    client = RecordingClient()
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", "backend web\n    server a 1.2.3.4:80\n", ApplyKind.RELOAD, 0.02)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
    registration = SelfRegistration(client, status, ("127.0.0.1", 9464))
    real, calls = status.check, 0

    def flaky() -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ValueError("invalid literal for int() with base 10: '²'")
        return real()

    monkeypatch.setattr(status, "check", flaky)

    async def scenario() -> None:
        task = asyncio.create_task(registration.run())
        for _ in range(50):
            await asyncio.sleep(0)
            if any("check/update" in path for path, _ in client.puts):
                break
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert any("check/update" in path for path, _ in client.puts)


def test_a_check_that_keeps_raising_is_said_in_the_check_logged_once_a_minute_and_deregistered_at_stop(
    monkeypatch: Any, caplog: Any
) -> None:
    """An attacker's review: a status view that kept raising logged a traceback every second, and each
    failure marked the renderer unregistered, so its deregistration at stop was skipped (the service
    stayed in the catalog, critical, for 10 minutes). Now the check says warning with the error, the
    traceback is logged once a minute at most (the same failure: its type and where it was raised, not
    its text, which a later review made differ each time), and the renderer is deregistered at stop."""
    clock = FakeClock(monkeypatch)
    client = RecordingClient()
    status = Status(templates=1)
    registration = SelfRegistration(client, status, None)

    calls = 0

    def broken() -> Any:  # its text differs each time, as an object's address in a repr does
        nonlocal calls
        calls += 1
        raise KeyError(f"<object at 0x{id(object()) + calls:x}> call {calls}")

    monkeypatch.setattr(status, "check", broken)

    async def scenario() -> None:
        task = asyncio.create_task(registration.run())
        async with asyncio.timeout(5):  # real seconds: the fake two minutes take a few ms
            while clock.now < 1000.0 + 119.0:
                await clock.real_sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await registration.deregister()

    with caplog.at_level("DEBUG", logger="renderer.registration.sidecar"):
        asyncio.run(scenario())
    paths = [path for path, _ in client.puts]
    assert paths.count("/v1/agent/service/register") == 1
    checks = [body for path, body in client.puts if path.startswith("/v1/agent/check/update/")]
    assert checks and all(check["Status"] == "warning" for check in checks)
    assert checks[0]["Output"] == "consul-renderer could not work out its check (KeyError); see its log"
    assert len(checks) <= 119 / sidecar.CHECK_REPUSH_S + 1  # the same failure is pushed as unchanged
    tracebacks = [record for record in caplog.records if record.exc_info]
    assert len(tracebacks) == 2, [record.getMessage() for record in tracebacks]  # at 0 s and 60 s of 119
    assert paths[-1] == f"/v1/agent/service/deregister/{registration.service_id}"
