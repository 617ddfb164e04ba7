"""The stall watch hears of a server leaving from the agent's log, pushed as it is written (over
HTTP/2 one stream, over HTTP/1.1 one connection), instead of reading the members every 2 s: a real
server and a real client agent joined to it, serving HTTP and HTTPS."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ConsulPorts, ManagedProcess, free_port, spawn, start_consul_dev, wait_until
from lab.tls import make_agent_tls
from renderer.config import ConsulSettings
from renderer.source.client import ConsulClient
from renderer.source.stall import NEWS_GAP_S, Reading, StallWatch
from tests.helpers import Pace

Track = Callable[[ManagedProcess], ManagedProcess]
QUIET_S = 8.0  # the watch's pace is 2 s: four readings' worth


class Readings:
    """The watch's readings of the members told apart: on news from the agent's log (a line
    that may name a server, the stream opening or ending), or unprompted (a poll: `interval_s`,
    or QUIET_READ_S while the log is followed)."""

    def __init__(self, watch: StallWatch) -> None:
        self.news = 0  # news heard
        self.unprompted = 0  # readings with no news since the last one
        self.pending = False  # news heard, its reading not begun
        gossip = watch.gossip
        assert gossip is not None
        hint, read = gossip._on_hint, watch._read_members

        def heard(verdict: bool) -> None:
            self.news, self.pending = self.news + 1, True
            hint(verdict)

        async def reading() -> Reading:
            self.unprompted += not self.pending
            self.pending = False
            return await read()

        gossip._on_hint = heard
        watch._read_members = reading  # type: ignore[method-assign]


def start_client_agent(consul_bin: str, tmp_path: Path, server: ManagedProcess, track: Track) -> ManagedProcess:
    """A client agent `lb1` joined to `server`, serving HTTP and HTTPS (HTTP/2) on ports of its own."""
    tls = make_agent_tls(consul_bin, tmp_path / "tls")
    ports, https, joins = ConsulPorts.free(), free_port(), server.extra["ports"]
    assert isinstance(joins, ConsulPorts)
    cmd = [
        consul_bin, "agent", "-node", "lb1", "-data-dir", str(tmp_path / "lb1"), "-bind", "127.0.0.1",
        "-client", "127.0.0.1", "-http-port", str(ports.http), "-dns-port", "-1",
        "-serf-lan-port", str(ports.serf_lan), "-retry-join", f"127.0.0.1:{joins.serf_lan}",
        "-hcl", "ports { grpc = -1 }", "-hcl", 'log_level = "INFO"',
    ]  # fmt: skip
    for hcl in tls.hcl(https):
        cmd += ["-hcl", hcl]
    agent = track(spawn("consul-lb1", cmd, tmp_path / "lb1.log"))
    agent.extra["https_port"] = https
    agent.extra["http_port"] = ports.http
    agent.extra["ca_file"] = str(tls.ca_file)
    wait_until(lambda: "agent: Synced node info" in agent.log_text(), 30, "lb1 joined and synced")
    return agent


@pytest.mark.parametrize("protocol", ["HTTP/2", "HTTP/1.1"])
def test_a_server_leaving_is_pushed_by_the_agents_log_and_the_members_are_not_polled(
    tmp_path: Path, consul_bin: str, track: Track, protocol: str, pace: Pace
) -> None:
    server = track(start_consul_dev(consul_bin, tmp_path / "srv1.log", node="srv1"))
    agent = start_client_agent(consul_bin, tmp_path, server, track)
    if protocol == "HTTP/2":
        settings = ConsulSettings(
            addr=f"https://127.0.0.1:{agent.extra['https_port']}", ca_file=str(agent.extra["ca_file"])
        )
    else:
        settings = ConsulSettings(addr=f"127.0.0.1:{agent.extra['http_port']}")

    async def scenario() -> tuple[int, int, int, int, float]:
        client = ConsulClient(settings)
        watch = StallWatch(client, interval_s=2.0)
        readings = Readings(watch)
        held: asyncio.Task[object] | None = None
        try:
            await client.open(blocking_connections=2)
            assert client.protocol == protocol
            first = await client.get("/v1/catalog/services", [], 0, held=True)
            ask = lambda: client.get("/v1/catalog/services", [], first.index, 300.0, held=True)  # noqa: E731
            held = asyncio.create_task(watch.held(ask))
            async with asyncio.timeout(20):  # followed, and the reading on the log's opening begun …
                while watch.gossip is None or not watch.gossip.following or readings.pending:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(NEWS_GAP_S + pace(0.5))  # … and done
            before, readings.news, readings.unprompted = client.requests, 0, 0
            await asyncio.sleep(QUIET_S)
            quiet_requests, news, unprompted = client.requests - before, readings.news, readings.unprompted
            os.kill(server.pid, signal.SIGSTOP)  # the server stops answering anything, gossip included
            stopped = time.monotonic()
            async with asyncio.timeout(40):
                while watch.stalls == 0:
                    await asyncio.sleep(0.05)
            return quiet_requests, news, unprompted, watch.asked_again, time.monotonic() - stopped
        finally:
            os.kill(server.pid, signal.SIGCONT)
            tasks = [t for t in (held, *watch.tasks()) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await client.close()

    quiet_requests, news, unprompted, asked_again, took = asyncio.run(asyncio.wait_for(scenario(), 120))
    # Polled every 2 s this would be 4 readings with no news before them; followed, none (a line of
    # the agent's about a server, as a busy machine can make gossip write, is news: one reading each).
    assert unprompted <= 1, (unprompted, quiet_requests, news)
    assert quiet_requests <= 1 + news, (quiet_requests, news)
    assert asked_again >= 1
    # Gossip gives a stopped server up within ~5-7 s; the log says so in the same millisecond. The
    # watch's quiet reading (every 60 s) would come ~50 s after the stop: this bound tells them apart.
    assert took < 20, took
    log = agent.log_text(10**6)
    assert "EventMemberFailed: srv1" in log
    print(
        f"\n{protocol}: stopped server seen gone after {took:.1f} s;"
        f" {quiet_requests} requests in {QUIET_S:.0f} s ({news} news from the log)"
    )
