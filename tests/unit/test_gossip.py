"""The agent's log as the stall watch's push signal: which lines are news, and the watch's pace."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from renderer.source import gossip
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.gossip import MAX_LINE, LineSplitter, is_hint
from renderer.source.stall import StallWatch
from tests.unit.test_stall import Agent

SERVERS = {"srv1", "srv2", "srv3"}


def entry(module: str, message: str, **fields: str) -> bytes:
    return json.dumps({"@level": "info", "@module": module, "@message": message, **fields}).encode()


@pytest.mark.parametrize(
    ("line", "news"),
    [
        (entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"), True),
        (entry("agent.client.memberlist.lan", "memberlist: Suspect srv2 has failed, no acks received"), True),
        (entry("agent.client.memberlist.lan", "memberlist: Marking srv2 as failed, suspect timeout reached"), True),
        (entry("agent.client.serf.lan", "serf: EventMemberJoin: srv3 10.0.0.3"), True),
        (entry("agent.client", "removing server", server="srv2 (Addr: tcp/10.0.0.2:8300)"), True),
        (entry("agent.client", "adding server", server="{}"), True),
        (entry("agent", "Monitor dropped 12 logs during monitor request"), True),
        # text lines, from an agent that ignores logjson
        (b"2026-12-02T13:34:51Z [INFO]  agent.client.serf.lan: serf: EventMemberFailed: srv2 10.0.0.2", True),
        # a client node coming and going: no server named
        (entry("agent.client.serf.lan", "serf: EventMemberFailed: web-17 10.0.1.17"), False),
        (entry("agent.client.serf.lan", "serf: EventMemberFailed: srv22 10.0.0.22"), False),
        # a server's name, but not from gossip: a service named like a server, a check's output
        (entry("agent", "Synced service", service="srv2"), False),
        (entry("agent", "srv2 srv1 removing"), False),
        (
            entry("agent.client.memberlist.lan", "memberlist: Failed fallback ping: read tcp 10.0.0.9:3 i/o timeout"),
            False,
        ),
        # not JSON, not text a person would write: never news, never an error
        (b"\xff\xfe\x00 serf", False),
        (b"[1, 2, 3]", False),
        (b'{"@module": 7, "@message": null}', False),
    ],
)
def test_a_line_is_news_when_gossip_names_a_server_or_the_router_moves(line: bytes, news: bool) -> None:
    assert is_hint(line, SERVERS) is news


def test_before_any_server_is_known_every_gossip_line_is_news() -> None:
    assert is_hint(entry("agent.client.serf.lan", "serf: EventMemberFailed: web-17 10.0.1.17"), set())
    assert not is_hint(entry("agent", "Synced service", service="web"), set())


def test_lines_are_whole_across_pieces_and_a_line_too_long_is_dropped_whole() -> None:
    lines: list[bytes] = []
    splitter = LineSplitter(lines.append)
    for piece in (b"", b'{"a":', b'1}\n{"b"', b":2}\n\n", b"x" * (MAX_LINE + 10), b"y" * 50, b"\nlast\n", b"cut"):
        splitter.feed(piece)
    assert lines == [b'{"a":1}', b'{"b":2}', b"last"]


class LoggingAgent(Agent):
    """A client agent whose log can be followed: `say()` sends it a line; `end()` ends the stream;
    `refuse` answers 403 instead."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.can_follow = True
        self.refuse = refuse
        self.follows = 0
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    def say(self, line: bytes) -> None:
        self._lines.put_nowait(line + b"\n")

    def end(self) -> None:
        self._lines.put_nowait(None)

    async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
        assert path == "/v1/agent/monitor"
        self.follows += 1
        if self.refuse:
            raise ConsulRequestError("Permission denied", status=403)
        on_data(b"")
        while (line := await self._lines.get()) is not None:
            on_data(line)


def held_query(agent: Agent, watch: StallWatch) -> asyncio.Task[QueryResult]:
    return asyncio.create_task(watch.held(lambda: agent.get("/v1/health/service/web", [], 5)))


async def stop(watch: StallWatch, *tasks: asyncio.Task[QueryResult]) -> None:
    for task in (*tasks, *watch.tasks()):
        task.cancel()
    await asyncio.gather(*tasks, *watch.tasks(), return_exceptions=True)


def test_while_the_log_is_followed_the_members_are_read_on_news_only_and_a_cut_server_is_left_at_once() -> None:
    async def go() -> tuple[QueryResult, StallWatch, LoggingAgent, int, float]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.3)  # 30 readings' worth of the interval: the log is followed instead
        reads_while_quiet = agent.member_reads
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberJoin: web-17 10.0.1.17"))  # not a server
        await asyncio.sleep(0.1)
        assert agent.member_reads == reads_while_quiet
        agent.cut()
        agent.index = 6
        agent.gossip_fails()
        started = asyncio.get_running_loop().time()
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"))
        result = await asyncio.wait_for(held, 5)
        took = asyncio.get_running_loop().time() - started
        await stop(watch)
        return result, watch, agent, reads_while_quiet, took

    result, watch, agent, reads_while_quiet, took = asyncio.run(go())
    assert agent.follows == 1 and reads_while_quiet <= 2  # the first reading, and one when the log opened
    assert result.index == 6 and watch.stalls == 1
    assert took < 1.0  # news is read within NEWS_GAP_S, not at the next QUIET_READ_S


def test_when_the_stream_ends_the_members_are_read_every_interval_until_it_is_followed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gossip, "RETRY_S", 0.3)

    async def go() -> tuple[LoggingAgent, int, int, bool]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(1.2)  # the reading on the log's opening comes NEWS_GAP_S after the first: past its gap
        before = agent.member_reads
        agent.end()
        await asyncio.sleep(0.15)
        polled = agent.member_reads - before
        await asyncio.sleep(0.4)  # past RETRY_S: followed again
        following_again = watch.gossip is not None and watch.gossip.following
        await stop(watch, held)
        return agent, before, polled, following_again

    agent, before, polled, following_again = asyncio.run(go())
    assert before <= 2 and polled >= 5  # every 10 ms without the log
    assert agent.follows == 2 and following_again


def test_a_token_that_cannot_read_the_log_leaves_the_watch_polling_and_says_how_to_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> tuple[LoggingAgent, StallWatch]:
        agent = LoggingAgent(refuse=True)
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.2)
        await stop(watch, held)
        return agent, watch

    agent, watch = asyncio.run(go())
    assert agent.follows == 1 and agent.member_reads >= 10
    assert watch.gossip is not None and watch.gossip.refused
    assert 'grant agent_prefix "" read' in caplog.text


def test_a_client_that_cannot_follow_polls_as_before() -> None:
    async def go() -> LoggingAgent:
        agent = LoggingAgent()
        agent.can_follow = False  # HTTP/1.1
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.2)
        await stop(watch, held)
        return agent

    agent = asyncio.run(go())
    assert agent.follows == 0 and agent.member_reads >= 10


def test_a_flood_of_news_costs_one_reading_per_gap() -> None:
    """Anyone who can join gossip can make the log busy: its lines never read the members faster
    than one reading per NEWS_GAP_S."""

    async def go() -> int:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.6)
        before = agent.member_reads
        for _ in range(2000):
            agent.say(entry("agent.client.serf.lan", "serf: EventMemberUpdate: srv1 10.0.0.1"))
            await asyncio.sleep(0.0005)
        after = agent.member_reads
        await stop(watch, held)
        return after - before

    assert asyncio.run(go()) <= 4  # ~1 s of news at 0.5 s a gap
