"""The Consul client's one status → error mapping, against a local HTTP server that answers as a
refusing agent would (the watcher's and the register path's errors all come from here)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from renderer.config import ConsulSettings
from renderer.source.client import ConsulClient, ConsulRequestError


async def refused_with(status: int, body: str) -> ConsulRequestError:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/v1/kv/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}"))
    try:
        with pytest.raises(ConsulRequestError) as caught:
            await client.get("/v1/kv/x", [], 0, 1.0)
        return caught.value
    finally:
        await client.close()
        await runner.cleanup()


def test_too_many_connections_names_the_agent_limit_and_what_to_do() -> None:
    err = asyncio.run(refused_with(429, "Your IP is issuing too many concurrent connections"))
    assert err.status == 429
    assert "limits.http_max_conns_per_client" in str(err) and "--max-connections" in str(err)


def test_an_acl_refusal_says_which_token_setting_to_fix() -> None:
    err = asyncio.run(refused_with(403, "Permission denied"))
    assert err.status == 403 and "CONSUL_HTTP_TOKEN" in str(err)


def test_a_server_error_carries_consuls_own_words() -> None:
    err = asyncio.run(refused_with(500, "No cluster leader"))
    assert err.status == 500 and "No cluster leader" in str(err)
