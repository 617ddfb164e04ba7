"""README promises of the watcher (source/watch.py, source/sweep.py), against fakes of our own seam
(tests/unit/fakes.py, and the FakeCatalog of tests/unit/test_watch_budget.py):

- "A stopped blocking query is not cancelled but left to return: Consul frees the agent's
  connection slot only when the query ends";
- "Sweeps send nothing while the loop renders and applies a change" (`Watcher.pause_sweeps`);
- "Every `reconcile_interval` (5 min) a sweep runs anyway, as a safety net" (asking the servers)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter

import pytest

from renderer.source.client import QueryResult
from renderer.source.dependency import KVKey
from renderer.source.watch import Store, Watcher, WatchSettings
from tests.unit.fakes import FakeAgent, keyed
from tests.unit.test_watch_budget import FakeCatalog, SlowProbes, baseline_taken, eventually, watching

SERVICE_PATH = "/v1/health/service/"  # a swept service's probe or read (no service has its own query here)


def kv_answer(index: int, text: str) -> QueryResult:
    return QueryResult(index, [{"Value": base64.b64encode(text.encode()).decode()}])


class HoldingAgent(FakeAgent):
    """Answers a key's first read at once; holds each blocking query until the test releases that
    path. Records every query asked, and each held one that was cancelled or answered."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: Counter[str] = Counter()
        self.holding: dict[str, asyncio.Event] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.cancelled: list[str] = []
        self.answered: list[str] = []

    def held(self, path: str) -> asyncio.Event:
        return self.holding.setdefault(path, asyncio.Event())

    def released(self, path: str) -> asyncio.Event:
        return self.release.setdefault(path, asyncio.Event())

    async def answer(self, path: str, index: int) -> QueryResult:
        self.asked[path] += 1
        if index == 0:
            return kv_answer(1, "first")
        self.held(path).set()
        try:
            await self.released(path).wait()
        except asyncio.CancelledError:
            self.cancelled.append(path)
            raise
        self.answered.append(path)
        return kv_answer(index + 1, "newer")  # new data: taken in, were the key still wanted


def test_a_key_no_longer_wanted_has_its_blocking_query_left_to_return_and_nothing_after_it() -> None:
    async def scenario() -> None:
        agent = HoldingAgent()
        store = Store()
        watcher = Watcher(agent, store, WatchSettings(min_gap_s=0.0))
        dropped, kept = KVKey("dropped"), KVKey("kept")
        path = dropped.request()[0]
        try:
            watcher.watch(keyed(dropped, kept))
            await asyncio.wait_for(agent.held(path).wait(), 2)  # its blocking query is in flight
            asked = agent.asked[path]
            watcher.watch(keyed(kept))  # a render that no longer uses it
            await asyncio.sleep(0.05)  # room for a cancel to reach the agent, were one sent
            assert agent.cancelled == [], "a stopped blocking query is not cancelled"
            store.changed.clear()
            agent.released(path).set()  # Consul answers it: only now is the agent's slot free
            await eventually(lambda: agent.answered == [path], timeout=2.0)
            await eventually(lambda: dropped.key not in watcher._polls, timeout=2.0)  # its poll has ended
            assert agent.asked[path] == asked, "no query for the key after its last one returned"
            assert store.get(dropped.key) == (False, None), "its answer is not taken in"
            assert not store.changed.is_set()
            assert store.get(kept.key) == (True, "first")  # the other key goes on
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def budgeted_settings(reconcile_interval_s: float = 300.0) -> WatchSettings:
    """For 40 services (and `web`) on 16 connections: past the budget, so the services are swept."""
    return WatchSettings(
        min_gap_s=0.0, max_connections=16, block_wait_s=30.0, reconcile_interval_s=reconcile_interval_s
    )


def service_requests(catalog: FakeCatalog, since: int) -> int:
    return sum(1 for path in catalog.paths[since:] if path.startswith(SERVICE_PATH))


def test_a_sweep_sends_nothing_while_sweeps_are_paused_and_goes_on_once_resumed() -> None:
    async def scenario() -> None:
        catalog = FakeCatalog(40)
        watcher, store, deps = await watching(catalog, budgeted_settings())
        target = deps[17]
        try:
            assert watcher.budgeted
            await eventually(lambda: baseline_taken(watcher))  # the initial reads are done
            watcher.pause_sweeps()  # the loop renders and applies a change
            mark = len(catalog.paths)
            await catalog.change(target.name, [FakeCatalog.entry(17, 0, port=9999)])  # a port: only a sweep finds it
            await eventually(lambda: watcher.counters.sweeps == 1, timeout=2.0)  # the sweep has begun …
            await asyncio.sleep(0.1)  # … and had room to send, were it allowed to
            assert service_requests(catalog, mark) == 0, "a paused sweep sends no request"
            assert store.get(target.key)[1][0].port == 8080
            watcher.resume_sweeps()
            await eventually(lambda: store.get(target.key)[1][0].port == 9999, timeout=2.0)
            assert service_requests(catalog, mark) >= len(deps)  # every swept service probed once resumed
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_a_full_sweep_runs_every_reconcile_interval_even_when_nothing_moved() -> None:
    interval = 0.2

    async def scenario() -> None:
        catalog = FakeCatalog(40)
        watcher, _store, deps = await watching(catalog, budgeted_settings(reconcile_interval_s=interval))
        swept = len(deps) + 1  # and `web`, which no instance has
        try:
            assert watcher.budgeted
            await eventually(lambda: baseline_taken(watcher))  # the initial reads are done
            mark, cached = len(catalog.paths), catalog.cached_probes
            starts: list[float] = []
            for n in (1, 2):
                await eventually(lambda n=n: watcher.counters.sweeps >= n, timeout=1.5)
                starts.append(time.monotonic())
            await eventually(lambda: service_requests(catalog, mark) >= 2 * swept, timeout=1.5)  # two full sweeps
            assert catalog.index == 10, "nothing moved in the catalog"
            # The safety net does not depend on the agent's cache (the safety sweep asks it): the servers.
            assert catalog.cached_probes == cached
            # Every interval, not all the time: the next sweep waits the interval after the last one
            # (the bound is loosened by the 5 ms of `eventually`'s polling).
            assert starts[1] - starts[0] >= interval - 0.02, starts
        finally:
            await watcher.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_sweep_under_way_sends_nothing_more_once_sweeps_are_paused() -> None:
    """A change found early in a sweep wakes the loop, which pauses sweeps while it renders: the
    sweep's requests still waiting for a connection must wait for the resume too (they went out:
    53 of 60 probes in a review's reproduction)."""

    async def scenario() -> tuple[int, int]:
        catalog = SlowProbes(60)
        settings = WatchSettings(min_gap_s=0.0, max_connections=16, block_wait_s=30.0)
        watcher, store, deps = await watching(catalog, settings)
        try:
            await eventually(lambda: baseline_taken(watcher))
            catalog.probe_s = 0.02  # a sweep of 60 on 4 connections: ~0.3 s
            await catalog.change(deps[-1].name, [FakeCatalog.entry(59, 0, port=9999)])  # a port: a sweep finds it
            await eventually(lambda: catalog.probes >= 5)
            watcher.pause_sweeps()
            paused_at = catalog.probes
            await asyncio.sleep(0.3)
            during = catalog.probes - paused_at
            watcher.resume_sweeps()
            await eventually(lambda: store.get(deps[-1].key)[1][0].port == 9999)
            return during, catalog.probes - paused_at
        finally:
            await watcher.stop()

    during, after = asyncio.run(scenario())
    assert during == 0, f"{during} probes sent while sweeps were paused"
    assert after > 0, "the sweep went on once resumed"
