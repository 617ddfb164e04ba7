"""How the fetcher takes refusals: a 403 is fatal only before Consul answered anything, and one key
that fails every other time does not end every failing key's backoff each time it answers."""

from __future__ import annotations

import asyncio

import renderer.source.fetch as fetch
from renderer.errors import ConsulError
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.dependency import KVKey
from renderer.source.watch import Store, Watcher, WatchSettings
from tests.unit.fakes import FakeAgent, keyed

SETTINGS = WatchSettings(min_gap_s=0.0, backoff_base_s=0.01, backoff_max_s=0.05, server_watch_s=0)


class Agent(FakeAgent):
    """KV keys by path: `revoked` refuses all with 403; `broken` ones answer 500; `flapping` ones
    answer 500 and 200 in turn; the others answer at once, then hold their query."""

    def __init__(self) -> None:
        super().__init__()
        self.revoked = False
        self.broken: set[str] = set()
        self.flapping: dict[str, int] = {}

    async def answer(self, path: str, index: int) -> QueryResult:
        if self.revoked:
            raise ConsulRequestError("ACL not found", status=403)
        if path in self.broken:
            raise ConsulRequestError("rpc error", status=500)
        if path in self.flapping:
            self.flapping[path] += 1
            if self.flapping[path] % 2:
                raise ConsulRequestError("rpc error", status=500)
            return QueryResult(self.flapping[path], [])
        if index:
            await asyncio.sleep(3600)
        return QueryResult(10, [])


async def settle(condition: object, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)


def test_a_403_after_consul_answered_is_retried_not_fatal() -> None:
    """A review's finding: a token revoked or rotated while running, then a service first watched
    (its key never answered), called on_fatal: the renderer exited and stopped an --exec-haproxy
    HAProxy. Only a 403 before anything was answered is a bad token at start."""

    async def scenario() -> tuple[list[ConsulError], list[ConsulError], bool]:
        agent, store, fatal = Agent(), Store(), []
        watcher = Watcher(agent, store, SETTINGS, on_fatal=fatal.append)
        old = KVKey("old")
        watcher.watch(keyed(old))
        await settle(lambda: store.get(old.key)[0])
        agent.revoked = True
        new = KVKey("new")
        watcher.watch(keyed(old, new))
        await settle(lambda: store.state(new.key).error is not None)
        kept = store.get(old.key)[0]
        await watcher.stop()
        at_start, cold = Agent(), []
        at_start.revoked = True
        first = Watcher(at_start, Store(), SETTINGS, on_fatal=cold.append)
        first.watch(keyed(old))
        await settle(lambda: bool(cold))
        await first.stop()
        return fatal, cold, kept

    late, at_start, kept = asyncio.run(scenario())
    assert late == [] and kept
    assert len(at_start) >= 1 and "ACL" in str(at_start[0])  # a bad token at start still stops it


def test_a_key_failing_every_other_time_ends_the_others_backoff_at_most_every_2_s() -> None:
    """A review's finding: 20 keys answering 500 made 88 requests in 20 s alone, 6,754 beside one key
    answering 500 and 200 in turn: each of its recoveries ended every backoff."""

    async def scenario() -> tuple[int, int]:
        agent, store = Agent(), Store()
        broken = [KVKey(f"b{i}") for i in range(5)]
        agent.broken = {key.request()[0] for key in broken}
        flapping = KVKey("flap")
        agent.flapping = {flapping.request()[0]: 0}
        watcher = Watcher(agent, store, SETTINGS)
        wakes = 0
        fetcher = watcher.fetcher
        wake = fetcher._consul_answers

        def counted() -> None:
            nonlocal wakes
            wakes += 1
            wake()

        fetcher._consul_answers = counted  # type: ignore[method-assign]
        watcher.watch(keyed(*broken, flapping))
        await settle(lambda: agent.flapping[flapping.request()[0]] >= 12)
        await watcher.stop()
        return wakes, agent.flapping[flapping.request()[0]] // 2

    wakes, recoveries = asyncio.run(scenario())
    assert recoveries >= 6 and wakes == 1, (wakes, recoveries)
    assert fetch.RECOVERY_WAKE_GAP_S == 2.0


def test_a_recovery_within_the_gap_ends_the_backoff_later_instead_of_never() -> None:
    """A review's finding: a recovery less than 2 s after the last wake was dropped, so a key that
    failed again at that wake slept its whole backoff (8 s here) while Consul answered."""

    async def scenario() -> float:
        store = Store()
        fetcher = fetch.Fetcher(Agent(), store, SETTINGS)
        a, c = KVKey("a"), KVKey("c")
        store.record_error(a.key, "500")
        store.record_error(c.key, "500")
        started = asyncio.get_running_loop().time()

        async def failing_key() -> float:
            await fetcher.back_off(30.0)  # ended by a's recovery
            await fetcher.back_off(30.0)  # ended by c's, postponed to 2 s after the first wake
            return asyncio.get_running_loop().time() - started

        waiting = asyncio.create_task(failing_key())
        await asyncio.sleep(0.1)
        await fetcher.fetch(a, 0, True)
        await asyncio.sleep(0.3)
        await fetcher.fetch(c, 0, True)
        took = await asyncio.wait_for(waiting, 10)
        for task in fetcher.tasks():
            task.cancel()
        return took

    assert asyncio.run(scenario()) < 10  # ~2.1 s; dropped, it slept the 30 s backoff out


def test_an_answered_fetch_leaves_no_reference_cycle_for_the_frozen_collector() -> None:
    """helper-134 (/tmp/rev80): each fetch built a tenacity retry state, a reference cycle; the
    collector freezes what lives after each render (loop/collector.py), so each held query's cycle
    became garbage frozen and was freed only at the next full collection, 10 minutes on: a
    registrant writing 70 times a second grew the renderer from 94 MB to 740 MB. 37 objects in
    cycles a fetch before; none now."""
    import gc

    class Answering(FakeAgent):
        async def answer(self, path: str, index: int) -> QueryResult:
            await asyncio.sleep(0)
            return QueryResult(index + 1, [])

    async def scenario() -> int:
        fetcher = fetch.Fetcher(Answering(), Store(), SETTINGS, None)
        dep = KVKey("a")
        await fetcher.fetch(dep, 1, True)
        gc.collect()
        gc.disable()
        try:
            for index in range(1, 201):
                await fetcher.fetch(dep, index, True)
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(scenario()) == 0
