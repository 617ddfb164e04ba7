"""The renderer's own registration: registered once, its TTL check pushed with the status."""

from __future__ import annotations

import asyncio
from typing import Any

from renderer.errors import ApplyKind
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
