"""StallWatch: held queries are asked again when gossip says a server left the alive state."""

from __future__ import annotations

import asyncio
import time

import pytest

from renderer.source.batch import ClientReader
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.fetch import Fetcher
from renderer.source.stall import Lingering, StallWatch, server_status
from renderer.source.store import Store, WatchSettings
from tests.unit.fakes import FakeAgent


def member(name: str, role: str, status: int) -> dict[str, object]:
    return {"Name": name, "Addr": "10.0.0.1", "Tags": {"role": role}, "Status": status}


class Agent(FakeAgent):
    """A client agent. Its held queries were sent to srv2 (its server when they were sent); `cut()`
    makes srv2 unreachable: what it holds hangs for good, while gossip still calls it alive until
    `gossip_fails()`; from then on new requests go to srv1, which answers."""

    def __init__(self, members_status: int | None = None) -> None:
        super().__init__()
        self.index = 5
        self.cut_off = False
        self.failed = False
        self.members_status = members_status  # an HTTP error for /v1/agent/members, if any
        self.queries = 0

    def cut(self) -> None:
        self.cut_off = True

    def gossip_fails(self) -> None:
        self.failed = True

    def members(self) -> list[dict[str, object]]:
        if self.members_status is not None:
            raise ConsulRequestError("Permission denied", status=self.members_status)
        return [
            member("srv1", "consul", 1),
            member("srv2", "consul", 4 if self.failed else 1),
            member("lb1", "node", 1),
        ]

    async def answer(self, path: str, index: int) -> QueryResult:
        self.queries += 1
        on_cut_server = not self.failed  # sent before gossip gave srv2 up: the agent still uses it
        while True:
            if on_cut_server and self.cut_off:
                await asyncio.sleep(3600)  # the cut server never answers
            if self.index > index:
                return QueryResult(self.index, [])
            await asyncio.sleep(0.001)


def test_a_query_held_on_a_cut_server_is_asked_again_once_gossip_gives_it_up() -> None:
    async def go() -> tuple[QueryResult, StallWatch, Agent]:
        agent = Agent()
        watch = StallWatch(agent, interval_s=0.01)
        held = asyncio.create_task(watch.held(lambda: agent.get("/v1/health/service/web", [], 5)))
        await asyncio.sleep(0.05)
        agent.cut()
        agent.index = 6  # a change, made on the healthy majority
        await asyncio.sleep(0.1)
        assert not held.done(), "nothing answers while the held query waits on the cut server"
        assert watch.stalls == 0
        agent.gossip_fails()
        result = await asyncio.wait_for(held, 5)
        for task in watch.tasks():
            task.cancel()
        return result, watch, agent

    result, watch, agent = asyncio.run(go())
    assert result.index == 6
    assert (watch.stalls, watch.asked_again, agent.queries) == (1, 1, 2)


def test_a_read_sent_to_a_server_just_cut_off_is_asked_again_with_the_held_queries() -> None:
    """A sweep's or a located read (not a blocking query) sent before gossip gave the cut server
    up hangs as a held query does: it is asked again in the same round, not left to its timeout."""

    async def go() -> tuple[list[QueryResult | ConsulRequestError], StallWatch, Agent]:
        agent = Agent()
        watch = StallWatch(agent, interval_s=0.01)
        reader = ClientReader(agent, connections=2, stalls=watch)
        agent.cut()
        reads = asyncio.create_task(reader.get_many([("/v1/health/service/a", [], 0), ("/v1/health/service/b", [], 0)]))
        await asyncio.sleep(0.1)
        assert not reads.done(), "the reads wait on the cut server"
        agent.gossip_fails()
        answers = await asyncio.wait_for(reads, 5)
        for task in watch.tasks():
            task.cancel()
        return answers, watch, agent

    answers, watch, agent = asyncio.run(go())
    assert [answer.index for answer in answers if isinstance(answer, QueryResult)] == [5, 5]
    assert (watch.stalls, watch.asked_again, agent.queries) == (1, 2, 4)


def test_an_unexpected_error_reading_members_is_said_and_the_watch_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A bug of ours in one reading must not end the watch: the held query would be left to
    Consul's own 35 s when a server is cut off later."""

    class Odd(Agent):
        def members(self) -> list[dict[str, object]]:
            if self.member_reads == 1:
                raise RuntimeError("a bug in reading members")
            return super().members()

    async def go() -> tuple[QueryResult, StallWatch]:
        agent = Odd()
        watch = StallWatch(agent, interval_s=0.01)
        held = asyncio.create_task(watch.held(lambda: agent.get("/v1/health/service/web", [], 5)))
        await asyncio.sleep(0.05)
        agent.cut()
        agent.index = 6
        await asyncio.sleep(0.05)
        agent.gossip_fails()
        result = await asyncio.wait_for(held, 5)
        for task in watch.tasks():
            task.cancel()
        return result, watch

    result, watch = asyncio.run(go())
    assert result.index == 6 and watch.stalls == 1
    assert "reading the agent's members failed unexpectedly" in caplog.text


def test_while_every_server_stays_alive_nothing_is_asked_again_and_the_reads_stop_with_the_queries() -> None:
    async def go() -> tuple[QueryResult, StallWatch, Agent, int]:
        agent = Agent()
        watch = StallWatch(agent, interval_s=0.01)
        held = asyncio.create_task(watch.held(lambda: agent.get("/v1/kv/k", [], 5)))
        await asyncio.sleep(0.15)
        agent.index = 6
        result = await asyncio.wait_for(held, 5)
        await asyncio.sleep(0.05)
        assert all(task.done() for task in watch.tasks()), "nothing held: the watch ends"
        reads = agent.member_reads
        await asyncio.sleep(0.05)
        return result, watch, agent, reads

    result, watch, agent, reads = asyncio.run(go())
    assert result.index == 6
    assert agent.member_reads == reads >= 3
    assert (watch.stalls, watch.asked_again, agent.queries) == (0, 0, 1)


def test_a_token_that_cannot_read_members_ends_the_watch_and_says_how_to_fix(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> Agent:
        agent = Agent(members_status=403)
        watch = StallWatch(agent, interval_s=0.01)
        held = asyncio.create_task(watch.held(lambda: agent.get("/v1/kv/k", [], 5)))
        await asyncio.sleep(0.1)
        agent.index = 6
        await asyncio.wait_for(held, 5)
        return agent

    agent = asyncio.run(go())
    assert agent.member_reads == 1
    assert 'node_prefix "" read' in caplog.text


def test_a_refused_watch_stays_off_for_every_later_read(caplog: pytest.LogCaptureFixture) -> None:
    """Every sweep read runs under the watch: a refusal must not start it again (and warn) per read."""

    async def go() -> Agent:
        agent = Agent(members_status=403)
        watch = StallWatch(agent, interval_s=0.01)
        agent.index = 6
        for _ in range(50):
            await watch.held(lambda: agent.get("/v1/health/service/web", [], 0))
            await asyncio.sleep(0)
        return agent

    agent = asyncio.run(go())
    assert agent.member_reads == 1
    assert caplog.text.count('node_prefix "" read') == 1


def test_off_means_no_member_reads() -> None:
    async def go() -> Agent:
        agent = Agent()
        watch = StallWatch(agent, interval_s=0)
        held = asyncio.create_task(watch.held(lambda: agent.get("/v1/kv/k", [], 5)))
        await asyncio.sleep(0.05)
        agent.index = 6
        await held
        return agent

    assert asyncio.run(go()).member_reads == 0


def test_server_status_reads_servers_only_and_refuses_what_is_not_a_list() -> None:
    answer = [member("srv1", "consul", 1), member("lb1", "node", 4), {"Name": "odd"}, "junk"]
    assert server_status(answer) == {"srv1": 1}
    with pytest.raises(ValueError, match="list of members"):
        server_status({"Name": "srv1"})


def test_a_flapping_server_costs_one_round_per_gap_and_the_last_flap_is_not_lost() -> None:
    """A server that leaves the alive state at every other reading (a flaky host, or anything
    else in gossip) makes at most one round of asking again per `min_gap_s`; a flap inside the
    gap is owed a round at its end, not dropped."""

    class Flapping(Agent):
        def __init__(self) -> None:
            super().__init__()
            self.sent: list[int] = []

        def members(self) -> list[dict[str, object]]:
            self.failed = self.member_reads % 2 == 0  # failed, alive, failed, …
            return super().members()

        async def answer(self, path: str, index: int) -> QueryResult:
            self.sent.append(index)
            await asyncio.sleep(3600)  # nothing changes: only a round of asking again re-sends it
            raise AssertionError("unreachable")

    async def go() -> tuple[Flapping, StallWatch, float]:
        agent = Flapping()
        watch = StallWatch(agent, interval_s=0.005, min_gap_s=0.2)
        started = time.monotonic()
        held = asyncio.create_task(watch.held(lambda: agent.answer("/v1/kv/k", 5)))
        # 0.5 s at least (~100 readings at rest), and until it flapped often enough (later under load)
        while time.monotonic() - started < 10.0:
            await asyncio.sleep(0.01)
            flapped = agent.member_reads >= 40 and watch.stalls >= 20 and watch.asked_again >= 2
            if flapped and time.monotonic() - started >= 0.5:
                break
        held.cancel()
        await asyncio.gather(held, *watch.tasks(), return_exceptions=True)
        return agent, watch, time.monotonic() - started

    agent, watch, took = asyncio.run(go())
    assert agent.member_reads >= 40 and watch.stalls >= 20, "it did flap, many times"
    # Rounds are min_gap_s apart at least: 3 in 0.5 s (1 + 0.5 / 0.2), more only if the run took longer;
    # still fewer than the flaps (a round per flap would be one per stall).
    rounds = watch.asked_again
    assert 2 <= rounds <= 1 + took / 0.2 < watch.stalls, f"one round per 0.2 s gap over {took:.2f} s, not {rounds}"
    assert len(agent.sent) == watch.asked_again + 1


def test_over_http11_a_round_waits_while_the_agent_keeps_what_the_last_abandoned(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent keeps an abandoned HTTP/1.1 query's connection until its wait runs out: a round
    every gap while a server flaps would pile them past its 200 a client, and it would refuse every
    new connection from this host. A round that would pass the room waits for the last one's to
    go (said once each time); one round at a time always runs."""

    class Flapping(Agent):
        def __init__(self) -> None:
            super().__init__()
            self.sent = 0

        def members(self) -> list[dict[str, object]]:
            self.failed = self.member_reads % 2 == 0
            return super().members()

        async def answer(self, path: str, index: int) -> QueryResult:
            self.sent += 1
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    async def go() -> tuple[StallWatch, int, float]:
        agent = Flapping()
        watch = StallWatch(agent, interval_s=0.005, min_gap_s=0.01, lingering=Lingering(for_s=0.3, room=5))
        started = time.monotonic()
        held = [asyncio.create_task(watch.held(lambda: agent.answer("/v1/kv/k", 5))) for _ in range(4)]
        # 1 s at least (the 4 abandoned each round leave no room for another 4 for 0.3 s), and until
        # it flapped 40 times and asked again 3 times (later on a loaded machine)
        while time.monotonic() - started < 10.0:
            await asyncio.sleep(0.02)
            if time.monotonic() - started >= 1.0 and watch.stalls >= 40 and watch.asked_again // 4 >= 3:
                break
        rounds, took = watch.asked_again // 4, time.monotonic() - started
        for task in held:
            task.cancel()
        await asyncio.gather(*held, *watch.tasks(), return_exceptions=True)
        return watch, rounds, took

    watch, rounds, took = asyncio.run(go())
    assert watch.stalls >= 40, "it flapped at every other reading"
    # one round per 0.3 s at most (1 + took / 0.3: 4 in the first second), not one per 0.01 s gap
    assert 3 <= rounds <= 1 + took / 0.3, f"{rounds} rounds in {took:.2f} s"
    assert 1 <= caplog.text.count("is put off") <= rounds  # once each time a round is put off, not each reading


def test_what_a_round_leaves_lingering_depends_on_the_protocol() -> None:
    assert Lingering.for_protocol(60.0, over_http2=False, max_connections=64) == Lingering(68.75, 136)
    # A budget past Consul's default limit means the operator raised the agent's: nothing is known
    assert Lingering.for_protocol(60.0, over_http2=False, max_connections=250) == Lingering()
    assert Lingering.for_protocol(600.0, over_http2=True, max_connections=64) == Lingering()
    plain = Fetcher(FakeAgent(), Store(), WatchSettings(block_wait_s=60.0))
    http2 = Fetcher(FakeAgent(), Store(), WatchSettings(block_wait_s=600.0, streams_per_connection=100))
    assert (plain.stalls._lingering, http2.stalls._lingering) == (Lingering(68.75, 136), Lingering())
