"""The agent's log as the stall watch's push signal: which lines are news, and the watch's pace."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable

import pytest

from renderer.source import gossip, stall
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.gossip import MAX_LINE, LineSplitter, is_hint
from renderer.source.stall import NEWS_GAP_S, StallWatch
from tests.helpers import Pace
from tests.unit.test_stall import Agent, member

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
        (entry("agent.server", "Adding LAN server", server="srv9 (Addr: tcp/10.0.0.9:8300)"), True),  # a server agent
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


class SlowReset(LoggingAgent):
    """Its log stream takes 50 ms to reset once cancelled (a flush on a busy connection can)."""

    async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
        try:
            await super().follow(path, params, on_data)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
            raise


class Hiccup(LoggingAgent):
    """The first reading of the members after srv2 failed answers 500."""

    hiccuped = False

    def members(self) -> list[dict[str, object]]:
        if self.failed and not self.hiccuped:
            self.hiccuped = True
            raise ConsulRequestError("Consul answered 500", status=500)
        return super().members()


class Flaky(LoggingAgent):
    """srv2 fails and comes back as `failed` says; its held queries never answer."""

    def members(self) -> list[dict[str, object]]:
        return [member("srv1", "consul", 1), member("srv2", "consul", 4 if self.failed else 1)]

    async def answer(self, path: str, index: int) -> QueryResult:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")


async def cut_and_told(agent: LoggingAgent, held: asyncio.Task[QueryResult]) -> tuple[QueryResult, float]:
    """srv2 is cut with a query held on it, gossip gives it up and the log says so: the held
    query's answer (asked again elsewhere) and how long after the log line it came."""
    agent.cut()
    agent.index = 6
    agent.gossip_fails()
    started = time.monotonic()
    agent.say(entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"))
    result = await asyncio.wait_for(held, 5)
    return result, time.monotonic() - started


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `condition()` holds within `timeout` s (looked at every 5 ms): a bound on how soon
    something must happen is the test's own assertion, this only waits for it under load."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    return condition()


def watched_until(agent: LoggingAgent, done: Callable[[StallWatch], bool]) -> StallWatch:
    """A watch (every 10 ms without the log) over one held query until `done(watch)` (10 s at
    most: readings every QUIET_READ_S would take minutes), then stopped."""

    async def go() -> StallWatch:
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await until(lambda: done(watch))
        await stop(watch, held)
        return watch

    return asyncio.run(go())


async def settled(agent: LoggingAgent, **watch_args: float) -> tuple[StallWatch, asyncio.Task[QueryResult]]:
    """A watch (every 10 ms without the log, unless said) over one held query, left 0.7 s to
    open the log and make its first readings."""
    watch = StallWatch(agent, **{"interval_s": 0.01, **watch_args})
    held = held_query(agent, watch)
    await asyncio.sleep(0.7)
    return watch, held


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
    monkeypatch: pytest.MonkeyPatch, pace: Pace
) -> None:
    monkeypatch.setattr(gossip, "RETRY_S", pace(0.5))  # 5 readings at 10 ms take ~0.05 s

    async def go() -> tuple[LoggingAgent, int, bool, int, bool]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(1.2)  # the reading on the log's opening comes NEWS_GAP_S after the first: past its gap
        before = agent.member_reads
        agent.end()
        polled = await until(lambda: agent.member_reads - before >= 5)
        follows_meanwhile = agent.follows  # still the first stream's: polled before it was followed again
        following_again = await until(lambda: watch.gossip is not None and watch.gossip.following)  # after RETRY_S
        await stop(watch, held)
        return agent, before, polled, follows_meanwhile, following_again

    agent, before, polled, follows_meanwhile, following_again = asyncio.run(go())
    assert before <= 2 and polled and follows_meanwhile == 1  # every 10 ms without the log, not at QUIET_READ_S
    assert agent.follows == 2 and following_again


def test_a_token_that_cannot_read_the_log_leaves_the_watch_polling_and_says_how_to_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = LoggingAgent(refuse=True)
    watch = watched_until(agent, lambda w: agent.member_reads >= 10 and w.gossip is not None and w.gossip.refused)
    assert agent.follows == 1 and agent.member_reads >= 10
    assert watch.gossip is not None and watch.gossip.refused
    assert 'grant agent_prefix "" read' in caplog.text


def test_a_client_that_cannot_follow_polls_as_before() -> None:
    agent = LoggingAgent()
    agent.can_follow = False  # a client that cannot stream an answer
    watched_until(agent, lambda _: agent.member_reads >= 10)
    assert agent.follows == 0 and agent.member_reads >= 10


def test_a_flood_of_news_costs_at_most_one_reading_per_gap_and_slows_when_it_finds_nothing() -> None:
    """Anyone who can join gossip can make the log busy: its lines never read the members faster
    than one reading per NEWS_GAP_S, and after IDLE_NEWS readings that found nothing the gap
    doubles, up to the pace of polling (`interval_s`)."""

    async def go() -> tuple[int, float]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=2.0)
        held = held_query(agent, watch)
        await asyncio.sleep(0.6)
        before, started = agent.member_reads, time.monotonic()
        while time.monotonic() - started < 4.0:
            agent.say(entry("agent.client.serf.lan", "serf: EventMemberUpdate: srv1 10.0.0.1"))
            await asyncio.sleep(0.001)
        elapsed = time.monotonic() - started
        reads = agent.member_reads - before
        await stop(watch, held)
        return reads, elapsed

    reads, elapsed = asyncio.run(go())
    assert reads <= elapsed / NEWS_GAP_S + 1
    # 4 readings at 0.5 s, then 1 s, then 2 s: ~6 in 4 s, where a fixed 0.5 s gap makes 8
    assert reads <= 7, reads


def test_a_watch_ending_as_a_new_query_comes_never_leaves_it_unwatched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch ends when nothing is held; a query held just then must find it ended (and start
    another), not ending: left unwatched, it would wait out a cut server. Ending must not wait for
    the follower's stream to be reset (here 50 ms, as a flush on a busy connection can take)."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.002)

    async def go() -> list[bool]:
        agent = SlowReset()
        watch = StallWatch(agent, interval_s=0.002)
        watched = []
        for _ in range(3):
            agent.index = 5
            first = held_query(agent, watch)
            await asyncio.sleep(0.6)  # past the reading on the log's opening (NEWS_GAP_S): readings every 2 ms
            agent.index = 6  # it answers: nothing is held, and the watch ends within 2 ms
            await first
            await asyncio.sleep(0.01)
            second = asyncio.create_task(watch.held(lambda: agent.get("/v1/health/service/web", [], 6)))
            await asyncio.sleep(0.1)
            watched.append(any(not t.done() for t in watch.tasks() if t.get_name() == "stall watch"))
            second.cancel()
            await asyncio.gather(second, return_exceptions=True)
        await stop(watch)
        return watched

    assert asyncio.run(go()) == [True, True, True]


def test_a_round_owed_inside_the_gap_comes_at_its_end_not_at_the_next_quiet_reading(pace: Pace) -> None:
    """srv2 fails, comes back and fails again within `min_gap_s`: the second round is owed, and
    comes at the gap's end (the watch polls while a round is owed), not QUIET_READ_S later.
    Each step waits for the reading that sees it (news gap 0.5 s): the three take ~1 s, well
    inside the gap (2 s, stretched on a slow machine so that they still fit)."""
    min_gap = pace(2.0)

    async def go() -> tuple[int, float, float]:
        agent = Flaky()
        watch = StallWatch(agent, interval_s=0.05, min_gap_s=min_gap)
        held = held_query(agent, watch)
        await asyncio.sleep(0.7)
        first = 0.0
        for failed in (True, False, True):  # each read on its own (news gap 0.5 s)
            agent.failed = failed
            agent.say(
                entry("agent.client.serf.lan", f"serf: EventMember{'Failed' if failed else 'Join'}: srv2 10.0.0.2")
            )
            assert await until(lambda: watch._alive is not None and ("srv2" in watch._alive) is not agent.failed)
            if not first:
                assert await until(lambda: watch.asked_again == 1)
                first = watch._last_round  # the rounds' own times: a stall of the test's poll shortens no gap
        # the second failure was read ~1 s after the first round: inside the gap, its round owed, not run
        assert watch.asked_again == 1 and watch._last_round == first and watch._due
        assert await until(lambda: watch.asked_again >= 2, timeout=min_gap + 5.0)
        second = watch._last_round
        await stop(watch, held)
        return watch.asked_again, first, second

    rounds, first, second = asyncio.run(go())
    # at the gap's end: at the first reading after it (polled every 50 ms), not a quiet reading later
    assert rounds == 2 and min_gap <= second - first < min_gap + pace(1.0), (second - first, min_gap)


def test_a_round_owed_after_an_untold_change_is_not_held_up_by_the_grace_for_news(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """srv2 fails (told), comes back (told), then fails again with nothing in the log, inside the
    gap: the quiet reading that finds it owes a round, which comes at the gap's end, not after
    the NEWS_GRACE_S the log is given to tell it; the log is distrusted when that has passed.
    Steps 1 s apart: each is read (news gap 0.5 s, quiet readings every 0.3 s) before the next."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.3)
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 2.0)

    async def rounds(watch: StallWatch, count: int) -> float:
        async with asyncio.timeout(6):
            while watch.asked_again < count:
                await asyncio.sleep(0.01)
        return watch._last_round  # the round's own time: a stall of the test's poll shortens no gap

    async def go() -> tuple[float, float, StallWatch]:
        agent = Flaky()
        watch, held = await settled(agent, interval_s=0.05, min_gap_s=3.0)
        agent.failed = True
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"))
        first = await rounds(watch, 1)
        await asyncio.sleep(1.0)
        agent.failed = False
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberJoin: srv2 10.0.0.2"))
        await asyncio.sleep(1.0)
        agent.failed = True  # and the log says nothing: found by a quiet reading ~2.3 s after the first round
        assert await until(lambda: watch._untold_by is not None)
        grace_ends = watch._untold_by  # ~4.3 s after the first round
        assert grace_ends is not None and grace_ends - first > 3.0 + 0.5  # the two ends far enough apart to tell
        second = await rounds(watch, 2)
        await asyncio.sleep(max(0.0, grace_ends + 0.5 - time.monotonic()))  # past the grace: the log said nothing
        await stop(watch, held)
        return second - first, grace_ends - first, watch

    took, grace, watch = asyncio.run(go())
    assert 3.0 <= took < grace, (took, grace)  # the gap's end (3 s), not the grace's (~4.3 s)
    assert watch.gossip is not None and not watch.gossip.trusted


def test_a_reading_that_fails_after_news_is_tried_again_at_the_polling_pace() -> None:
    async def go() -> tuple[QueryResult, float]:
        agent = Hiccup()
        watch = StallWatch(agent, interval_s=0.05)
        held = held_query(agent, watch)
        await asyncio.sleep(0.7)
        result, took = await cut_and_told(agent, held)
        await stop(watch)
        return result, took

    result, took = asyncio.run(go())
    assert result.index == 6 and took < 1.0, took


def test_a_stream_the_agent_never_accepts_is_given_up_and_followed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gossip, "OPEN_TIMEOUT_S", 0.05)
    monkeypatch.setattr(gossip, "RETRY_S", 0.05)

    class Mute(LoggingAgent):
        async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
            self.follows += 1
            await asyncio.sleep(3600)  # no answer, not even headers

    agent = Mute()
    watch = watched_until(agent, lambda _: agent.follows >= 2 and agent.member_reads >= 10)
    assert agent.follows >= 2 and agent.member_reads >= 10  # polled meanwhile
    assert watch.gossip is not None and not watch.gossip.following


def test_a_change_the_log_never_told_makes_the_watch_poll_again_and_say_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent whose log words gossip otherwise (another Consul version): a quiet reading finds a
    server gone with no news within NEWS_GRACE_S; from then on the members are read every
    `interval_s`, as without the log, and that is said once."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.3)
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 0.1)

    async def go() -> tuple[StallWatch, bool]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.7)
        agent.gossip_fails()  # and the log says nothing
        assert await until(lambda: watch.gossip is not None and not watch.gossip.trusted)  # ~0.2 s later
        # Quiet readings from now on would be a minute apart: 10 readings can only be polling.
        monkeypatch.setattr(stall, "QUIET_READ_S", 60.0)
        before = agent.member_reads
        polled = await until(lambda: agent.member_reads - before >= 10)
        await stop(watch, held)
        return watch, polled

    watch, polled = asyncio.run(go())
    assert watch.stalls == 1 and watch.gossip is not None and not watch.gossip.trusted
    assert polled  # every 10 ms again
    assert caplog.text.count("the agent's log said nothing of it") == 1


def test_a_reading_that_comes_just_before_the_news_keeps_the_log_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.3)

    async def go() -> StallWatch:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.65)
        agent.gossip_fails()  # the quiet reading at ~0.8 s sees it first …
        await asyncio.sleep(0.4)
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"))  # … the log a bit later
        await asyncio.sleep(0.3)
        await stop(watch, held)
        return watch

    watch = asyncio.run(go())
    assert watch.stalls == 1 and watch.gossip is not None and watch.gossip.trusted


def test_a_news_reading_that_fails_leaves_its_news_to_the_next_reading_and_the_log_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reading on news fails (a 500, a timeout: likely while a server fails); the next one, at
    the polling pace, finds the change: the news came, so the log keeps its trust."""
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 0.1)

    async def go() -> StallWatch:
        agent = Hiccup()
        watch = StallWatch(agent, interval_s=0.05)
        held = held_query(agent, watch)
        await asyncio.sleep(0.7)
        agent.gossip_fails()
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"))
        await asyncio.sleep(0.5)
        await stop(watch, held)
        return watch

    watch = asyncio.run(go())
    assert watch.stalls == 1 and watch.gossip is not None and watch.gossip.trusted


def test_a_new_server_joining_is_no_reason_to_distrust_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server with a new name joins: its line named no known server (no news), and the quiet
    reading that finds it must not take that for a change the log kept quiet about."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.2)
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 0.1)

    class Joining(LoggingAgent):
        joined = False

        def members(self) -> list[dict[str, object]]:
            return [*super().members(), *([member("srv9", "consul", 1)] if self.joined else [])]

    async def go() -> StallWatch:
        agent = Joining()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.7)
        agent.joined = True
        agent.say(entry("agent.client.serf.lan", "serf: EventMemberJoin: srv9 10.0.0.9"))  # no news: not known yet
        await asyncio.sleep(0.6)
        await stop(watch, held)
        return watch

    watch = asyncio.run(go())
    assert watch.stalls == 0 and watch.gossip is not None and watch.gossip.trusted


class Leaving(LoggingAgent):
    """srv2's serf status is whatever `status` says (1 alive, 2 leaving, 3 left, 4 failed)."""

    status = 1

    def members(self) -> list[dict[str, object]]:
        return [member("srv1", "consul", 1), member("srv2", "consul", self.status), member("lb1", "node", 1)]


@pytest.mark.parametrize(
    ("steps", "trusted"),
    [
        # a graceful leave: `leaving` while serf broadcasts the intent (seconds), logged once left
        (((2, None), (3, "serf: EventMemberLeave: srv2 10.0.0.2")), True),
        # the same, but the log never says it: once srv2 has left, the log is not trusted
        (((2, None), (3, None)), False),
        # a leave intent refuted (srv2 says it is alive): serf logs nothing of it
        (((2, None), (1, None)), True),
        # straight from alive to left with nothing in the log
        (((3, None),), False),
    ],
    ids=["leave-told", "leave-untold", "leave-refuted", "left-untold"],
)
def test_a_server_leaving_is_judged_on_how_it_ends_not_while_it_is_leaving(
    monkeypatch: pytest.MonkeyPatch, steps: tuple[tuple[int, str | None], ...], trusted: bool
) -> None:
    """Quiet readings see each step (no news in between, longer than the grace): a server still
    leaving is no change the log must tell; how it ends is. Its held queries are asked again
    once, when it leaves the alive state."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.2)
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 0.1)

    async def go() -> StallWatch:
        agent = Leaving()
        watch, held = await settled(agent)
        for status, line in steps:
            agent.status = status
            if line is not None:
                agent.say(entry("agent.client.serf.lan", line))
            await asyncio.sleep(0.7)
        await stop(watch, held)
        return watch

    watch = asyncio.run(go())
    assert watch.stalls == 1  # gone from the alive ones: its queries were asked again
    assert watch.gossip is not None and watch.gossip.trusted is trusted


def test_a_watch_that_stops_keeps_no_deadline_for_news(monkeypatch: pytest.MonkeyPatch) -> None:
    """An untold change found just before the last held query ended: the watch that stops judges
    it if its time has come, and otherwise drops it; a later watch starts with none."""
    monkeypatch.setattr(stall, "QUIET_READ_S", 0.2)
    monkeypatch.setattr(stall, "NEWS_GRACE_S", 5.0)

    async def go() -> StallWatch:
        agent = Leaving()
        watch, held = await settled(agent)
        agent.status = 4  # failed, untold: a deadline 5 s away
        async with asyncio.timeout(2):
            while watch._untold_by is None:
                await asyncio.sleep(0.01)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        async with asyncio.timeout(2):
            while any(not task.done() for task in watch.tasks()):
                await asyncio.sleep(0.01)
        return watch

    watch = asyncio.run(go())
    assert watch._untold_by is None
    assert watch.gossip is not None and watch.gossip.trusted  # not judged before its time


def test_stopping_the_watch_stops_its_log_follower_too() -> None:
    """Whoever stops the watch (the watcher, before the client is closed) gets the follower among
    its tasks: its stream is reset (here in 50 ms) before they go on."""

    async def go() -> list[str]:
        agent = SlowReset()
        watch = StallWatch(agent, interval_s=0.01)
        held = held_query(agent, watch)
        await asyncio.sleep(0.1)
        await stop(watch, held)
        return [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert asyncio.run(go()) == []


@pytest.mark.parametrize(
    ("line", "verdict"),
    [
        (entry("agent.client.serf.lan", "serf: EventMemberFailed: srv2 10.0.0.2"), True),
        (entry("agent.client.serf.lan", "serf: EventMemberJoin: srv2 10.0.0.2"), True),
        (entry("agent.client", "removing server", server="srv2"), True),
        (entry("agent.server", "Adding LAN server", server="srv9"), True),
        (entry("agent.client.memberlist.lan", "memberlist: Suspect srv2 has failed, no acks received"), False),
        (entry("agent.client.memberlist.lan", "memberlist: Marking srv2 as failed, suspect timeout reached"), False),
        (entry("agent.client.serf.lan", "serf: EventMemberUpdate: srv2 10.0.0.2"), False),
    ],
)
def test_a_verdict_is_a_line_where_gossip_decided(line: bytes, verdict: bool) -> None:
    assert gossip.is_verdict(line) is verdict


def test_after_suspicions_slowed_the_pace_a_verdict_is_still_read_within_the_news_gap(pace: Pace) -> None:
    """Suspicion lines naming srv2 (as a failing server makes, several before gossip decides)
    slow the readings down; the line where gossip gives srv2 up is read within NEWS_GAP_S anyway
    (the lab saw 1.2 s before verdicts were told apart)."""

    async def go() -> tuple[QueryResult, float, float]:
        agent = LoggingAgent()
        watch = StallWatch(agent, interval_s=2.0)
        held = held_query(agent, watch)
        await asyncio.sleep(0.6)
        for _ in range(6):  # 6 readings that find nothing: the gap grows past NEWS_GAP_S
            agent.say(entry("agent.client.memberlist.lan", "memberlist: Suspect srv2 has failed, no acks received"))
            await asyncio.sleep(0.55)
        slowed = watch._news_gap
        result, took = await cut_and_told(agent, held)
        await stop(watch)
        return result, slowed, took

    result, slowed, took = asyncio.run(go())
    assert slowed > NEWS_GAP_S and result.index == 6
    assert took <= NEWS_GAP_S + pace(0.2), took


def test_a_stream_refused_as_the_follower_is_cancelled_leaves_no_unretrieved_error() -> None:
    """A stream that failed (403: the token) in the very tick its follower was cancelled (the
    process ending on a fatal ACL refusal) was left done with its error never retrieved: asyncio
    printed "Task exception was never retrieved" and a traceback on a one-line error exit."""

    class RefusedOnCue:
        can_follow = True

        def __init__(self) -> None:
            self.cue = asyncio.Event()

        async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
            await self.cue.wait()
            raise ConsulRequestError("Consul refused /v1/agent/monitor: ACL permission denied", status=403)

    async def scenario() -> list[str]:
        unretrieved: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx["message"]))
        follower = RefusedOnCue()
        hints = gossip.GossipHints(follower, lambda _verdict: None, lambda: ())
        task = asyncio.create_task(hints._follow_once())
        await asyncio.sleep(0.01)
        follower.cue.set()  # the stream's error comes in the same tick as the cancel
        task.cancel()
        with pytest.raises((asyncio.CancelledError, ConsulRequestError)):
            await task
        del task
        gc.collect()
        await asyncio.sleep(0)
        return unretrieved

    assert asyncio.run(scenario()) == []
