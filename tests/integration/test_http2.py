"""Precise watches over HTTP/2 on an HTTPS agent with default limits (Consul 1.8.7, real HAProxy).

300 services, each with a blocking query of its own, held on a handful of connections (sampled
throughout, from the first render on); a change to a service quiet until now reaches HAProxy
promptly; the renderer's ordinary requests (its check updates) never wait behind held streams.
The agent's TLS is made as an operator would (`consul tls ca create`, `consul tls cert create`).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.agent import agent_counts
from lab.processes import ConsulPorts, ManagedProcess, free_port, http_get, start_consul_dev, wait_until
from lab.stack import start_local_stack
from lab.tls import make_agent_tls
from lab.webapp import WebApp
from tests.helpers import ConnectionSampler, register
from tests.integration.test_scale import fill_catalog

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
SERVICES = 300
INSTANCES = 2
MAX_CONNECTIONS = 16  # the bound for 1,000 services; 300 need 4 at 90 streams each


def check_status(agent: ManagedProcess, check_prefix: str) -> str:
    with urllib.request.urlopen(f"http://{agent.extra['http_addr']}/v1/agent/checks", timeout=5) as answer:
        checks = json.loads(answer.read())
    found = [c["Status"] for cid, c in checks.items() if cid.startswith(check_prefix)]
    return found[0] if found else ""


def test_300_services_each_with_its_own_blocking_query_on_a_few_http2_connections(
    tmp_path: Path, tls_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    fill_catalog(tls_agent, SERVICES, INSTANCES)
    https = int(str(tls_agent.extra["https_port"]))
    sampler = ConnectionSampler(https).start()
    try:
        stack = start_local_stack(
            tmp_path, f"https://127.0.0.1:{https}", haproxy_bin,
            extra_args=("--wait", "20ms:100ms", "--log-level", "debug", "--ca-file", str(tls_agent.extra["ca_file"])),
            on_start=lambda proc: sampler.watch(track(proc)),
        )  # fmt: skip
        assert stack.config_path.read_text().count("\nbackend svc-") == SERVICES
        log = stack.renderer.log_text(10**7)
        assert "over HTTP/2" in log, log[:2000]
        # A cold change: a service nobody changed since the renderer started.
        cold = f"svc-{SERVICES // 2:03d}"
        started = time.monotonic()
        register(tls_agent, backends(f"{cold}-live"), name=cold, check=False)  # no check interval in the figure
        url = f"{stack.url.rstrip('/')}/{cold}/"
        wait_until(lambda: http_get(url)[1].strip() == f"{cold}-live", 10, f"the new {cold} instance through HAProxy")
        cold_ms = (time.monotonic() - started) * 1000
        # The renderer's own check update (a PUT) goes through while 300 streams are held.
        wait_until(lambda: check_status(tls_agent, "service:consul-renderer") == "passing", 20, "its check passing")
        time.sleep(2.0)  # sample on past the change
    finally:
        sampler.stop()
    print(f"\nHTTP/2: cold change through HAProxy in {cold_ms:.0f} ms; peak connections {sampler.peak}")
    for name in ("renderer-once", "renderer"):
        assert 0 < sampler.peak[name] <= MAX_CONNECTIONS, f"{name}: {sampler.peak[name]} connections to the agent"
    log = stack.renderer.log_text(10**7)
    assert "sweep of" not in log  # precise: every service has its own query, nothing is swept
    for refusal in ("Too Many Requests", "closed the connection", "Traceback"):
        assert refusal not in log


def test_block_wait_sets_how_long_each_held_stream_waits(
    tmp_path: Path, tls_agent: ManagedProcess, haproxy_bin: str, track: Track
) -> None:
    """`--block-wait` reaches the wire: with 2 s, each held stream comes back unchanged every ~2 s,
    so an idle window costs the server a few queries per key (with the 10-minute default, none).
    The operator's lever on the idle cost, with the servers' max_query_time raised beyond 10 min."""
    agent, https = tls_agent, int(str(tls_agent.extra["https_port"]))
    keys = 10
    fill_catalog(agent, keys, 1)
    stack = start_local_stack(
        tmp_path, f"https://127.0.0.1:{https}", haproxy_bin, on_start=track,
        extra_args=("--block-wait", "2s", "--ca-file", str(agent.extra["ca_file"]), "--register-self", "false"),
    )  # fmt: skip
    assert "each held up to 2 s" in stack.renderer.log_text(10**7)
    port = int(str(agent.extra["http_addr"]).rsplit(":", 1)[1])
    time.sleep(2.5)  # every stream held once
    before = agent_counts(port).server_queries
    window = 8.0
    time.sleep(window)
    after = agent_counts(port).server_queries
    assert before is not None and after is not None, "the agent's telemetry"
    expiries = after - before
    print(f"\nblock_wait 2s, {keys} keys idle: {expiries:.0f} server queries in {window:.0f} s")
    # Each key comes back every 2-2.125 s (Consul adds up to wait/16): ~3.7 per key in the window.
    assert keys * 2 <= expiries <= keys * 6, f"{expiries:.0f} queries in {window:.0f} s for {keys} keys"


def test_cancelled_queries_free_their_streams_so_the_agent_takes_new_ones(tls_agent: ManagedProcess) -> None:
    """Held queries cancelled three times over on one connection (as a stall watch round, a
    timeout or a dropped key does), 120 at a time: each is reset (RST_STREAM), so the agent (Go:
    250 streams a connection) still takes new ones. Before the fix none was reset: the third
    round passed 250 open streams and the connection refused every new query."""
    import asyncio

    from renderer.source.h2 import H2Connection, tls_context

    async def scenario() -> tuple[int, int, int]:
        https = int(str(tls_agent.extra["https_port"]))
        connection = H2Connection("127.0.0.1", https, tls_context(str(tls_agent.extra["ca_file"]), None))
        await connection.open()
        try:
            first = await connection.get("/v1/catalog/services", {}, 10**6)
            index = first.headers["x-consul-index"]
            for _ in range(3):
                held = [
                    asyncio.create_task(connection.get(f"/v1/catalog/services?index={index}&wait=60s", {}, 10**6))
                    for _ in range(120)
                ]
                await asyncio.sleep(0.5)  # all sent, all held by the agent
                for task in held:
                    task.cancel()
                await asyncio.gather(*held, return_exceptions=True)
            after = await connection.get("/v1/catalog/services", {}, 10**6)
            return after.code, connection._h2.open_outbound_streams, connection.stream_limit
        finally:
            await connection.close()

    code, still_open, limit = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert limit < 3 * 120, f"the agent allows {limit} streams: the test no longer crosses its limit"
    assert (code, still_open) == (200, 0)


def test_the_http2_watches_survive_the_agent_restarting(
    tmp_path: Path, consul_bin: str, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """The agent goes away (its HTTP/2 connections end mid-query) and comes back on the same ports,
    empty (a -dev agent keeps nothing): the streams fail, are retried on a new connection, and a
    registration after it is served."""
    tls = make_agent_tls(consul_bin, tmp_path / "tls")
    ports, https = ConsulPorts.free(), free_port()
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul-1.log", ports, hcl=tls.hcl(https)))
    register(agent, backends("web-a"), check=False)
    stack = start_local_stack(
        tmp_path, f"https://127.0.0.1:{https}", haproxy_bin,
        extra_args=("--wait", "20ms:100ms", "--log-level", "debug", "--ca-file", str(tls.ca_file)), on_start=track,
    )  # fmt: skip
    wait_until(lambda: http_get(f"{stack.url.rstrip('/')}/web/")[1].strip() == "web-a", 20, "web-a served")
    agent.stop()
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul-2.log", ports, hcl=tls.hcl(https)))
    register(agent, backends("web-b"), check=False)
    register(agent, backends("web-a"), check=False)
    wait_until(lambda: http_get(f"{stack.url.rstrip('/')}/web/")[1].strip() == "web-b", 30, "web-b served")
    log = stack.renderer.log_text(10**7)
    assert "over HTTP/2" in log and "watch recovered" in log
    assert "Traceback" not in log


def test_a_silent_agent_is_noticed_by_ping_not_at_the_end_of_a_five_minute_wait(
    tmp_path: Path, consul_bin: str, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """The agent stops answering without closing anything (SIGSTOP: as a network that drops packets
    silently). Over HTTP/2 the queries wait 5 minutes, so only the connection's PING notices: within
    PING_INTERVAL_S + PING_TIMEOUT_S the connection is dropped and its queries retried; once the
    agent answers again a registration is served."""
    import os
    import signal

    from renderer.source.h2 import PING_INTERVAL_S, PING_TIMEOUT_S

    tls = make_agent_tls(consul_bin, tmp_path / "tls")
    https = free_port()
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", hcl=tls.hcl(https)))
    register(agent, backends("web-a"), check=False)
    stack = start_local_stack(
        tmp_path, f"https://127.0.0.1:{https}", haproxy_bin,
        extra_args=("--wait", "20ms:100ms", "--ca-file", str(tls.ca_file)), on_start=track,
    )  # fmt: skip
    wait_until(lambda: http_get(f"{stack.url.rstrip('/')}/web/")[1].strip() == "web-a", 20, "web-a served")
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        bound = PING_INTERVAL_S + PING_TIMEOUT_S + 5
        wait_until(
            lambda: "no answer to an HTTP/2 PING" in stack.renderer.log_text(10**7), bound, "the dead connection"
        )
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    register(agent, backends("web-b"), check=False)
    wait_until(lambda: http_get(f"{stack.url.rstrip('/')}/web/")[1].strip() == "web-b", 30, "web-b served")


def test_the_catalog_list_comes_gzipped_over_http2_and_reads_the_same(tls_agent: ManagedProcess) -> None:
    """The list of service names (resent whole on every registration anywhere) is asked for
    gzipped over HTTP/2; Consul 1.8.7 zips it, and it decodes to the same data, at a fraction of
    the bytes (the renderer's /metrics counts the bytes received)."""
    import asyncio

    from renderer.config import ConsulSettings
    from renderer.source.client import ConsulClient

    fill_catalog(tls_agent, 100, 1)
    settings = ConsulSettings(addr=f"https://127.0.0.1:{tls_agent.extra['https_port']}",
                              ca_file=str(tls_agent.extra["ca_file"]))  # fmt: skip

    async def read(compressed: bool) -> tuple[object, int, str]:
        client = ConsulClient(settings)
        try:
            await client.open(blocking_connections=1)
            assert client.protocol == "HTTP/2"
            result = await client.get("/v1/catalog/services", [], 0, held=True, compressed=compressed)
            return result.decoded(), client.answer_bytes, result.body or ""
        finally:
            await client.close()

    plain, plain_bytes, plain_body = asyncio.run(read(False))
    zipped, zipped_bytes, zipped_body = asyncio.run(read(True))
    assert isinstance(plain, dict) and len(plain) == 101  # consul itself and the 100
    assert zipped == plain and zipped_body == plain_body
    assert plain_bytes == len(plain_body.encode())
    assert zipped_bytes * 4 < plain_bytes, (zipped_bytes, plain_bytes)
    print(f"\n/v1/catalog/services at 100 services: {plain_bytes} bytes, {zipped_bytes} gzipped")
