"""The renderer's own registration: registered once, its TTL check pushed with the status."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from renderer.errors import ApplyKind, FailureReason
from renderer.registration import sidecar
from renderer.registration.sidecar import SERVICE_NAME, SelfRegistration
from renderer.status import Status


class RecordingClient:
    def __init__(self) -> None:
        self.puts: list[tuple[str, Any]] = []

    async def put(self, path: str, body: object | None) -> None:
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


def test_an_unchanged_check_is_pushed_every_half_ttl_and_a_change_within_a_second(monkeypatch: Any) -> None:
    """Idle, the check costs the agent 4 requests a minute (TTL 30 s, pushed every 15 s); a change of
    its status still reaches Consul within STATUS_POLL_S."""
    client = RecordingClient()
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", "backend web\n    server a 1.2.3.4:80\n", ApplyKind.RELOAD, 0.02)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
    registration = SelfRegistration(client, status, None)
    clock = [1000.0]
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float) -> None:
        clock[0] += seconds
        await real_sleep(0)

    # The module's own names only: the event loop keeps the real clock and the real sleep.
    monkeypatch.setattr(sidecar, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(sidecar, "asyncio", SimpleNamespace(sleep=fake_sleep))

    def updates() -> list[str]:
        return [body["Status"] for path, body in client.puts if path.startswith("/v1/agent/check/update/")]

    async def scenario() -> tuple[int, int]:
        task = asyncio.create_task(registration.run())
        async with asyncio.timeout(5):  # real seconds: the fake minute takes a few ms
            while clock[0] < 1000.0 + 60.0:
                await real_sleep(0)
            idle = len(updates())
            status.fail("/etc/haproxy/haproxy.cfg", FailureReason.RELOAD, "HAProxy refused the reload")
            start = clock[0]
            while len(updates()) == idle:
                await real_sleep(0)
        task.cancel()
        return idle, round(clock[0] - start)

    idle, took = asyncio.run(scenario())
    assert sidecar.CHECK_REPUSH_S == sidecar.CHECK_TTL_S / 2
    assert idle == 4  # in the first minute, at 0, 15, 30 and 45 s (TTL/3 made it 6)
    assert took <= sidecar.STATUS_POLL_S
    assert updates()[-1] != "passing"
