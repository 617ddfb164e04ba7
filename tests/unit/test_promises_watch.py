"""README promise (source/watch.py): the watcher "starts two calls for one key at least a minimum
jittered gap apart", `WatchSettings.min_gap_s` plus up to the same again in jitter, "after a held
query the next goes out at once". Against fake agents (our seam, tests/unit/fakes.py) that answer
at once or hold each query, and record when they were asked."""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from typing import Any

import pytest

from renderer.source import watch
from renderer.source.client import QueryResult
from renderer.source.dependency import KVKey
from renderer.source.watch import Store, Watcher, WatchSettings
from tests.unit.fakes import FakeAgent, keyed

GAP_S = 0.04
CALLS = 7


class EagerAgent(FakeAgent):
    """Answers each query of the key at once with new data, `CALLS` times; then holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.done = asyncio.Event()

    async def answer(self, path: str, index: int) -> QueryResult:
        if len(self.times) == CALLS:
            self.done.set()
            await asyncio.sleep(3600)  # a held query: nothing changes any more
        self.times.append(time.monotonic())
        value = base64.b64encode(f"v{len(self.times)}".encode()).decode()
        return QueryResult(index + 1, [{"Value": value}])


class ScriptedJitter:
    """Stands in for the watch module's `random`: each draw is a given fraction of the range asked for."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions = fractions
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, low: float, high: float) -> float:
        self.ranges.append((low, high))
        return low + (high - low) * self.fractions[(len(self.ranges) - 1) % len(self.fractions)]


def gaps_between_calls() -> list[float]:
    """The gaps between the watcher's calls for one key, each stamped as the watcher makes it (its
    fetcher is entered). Stamped at the agent instead, they carried the fetcher's own work before
    it, which varies by a fraction of a ms under load: a CI run saw 39.6 ms for a 40 ms gap."""

    async def scenario() -> list[float]:
        agent = EagerAgent()
        watcher = Watcher(agent, Store(), WatchSettings(min_gap_s=GAP_S))
        starts: list[float] = []
        fetch = watcher.fetcher.fetch

        async def stamped(*args: Any, **kwargs: Any) -> Any:
            starts.append(time.monotonic())
            return await fetch(*args, **kwargs)

        watcher.fetcher.fetch = stamped  # type: ignore[method-assign]
        watcher.watch(keyed(KVKey("k")))
        await asyncio.wait_for(agent.done.wait(), 5)
        await watcher.stop()
        calls = starts[:CALLS]
        return [b - a for a, b in itertools.pairwise(calls)]

    return asyncio.run(scenario())


def test_two_calls_for_one_key_are_at_least_the_minimum_gap_apart() -> None:
    gaps = gaps_between_calls()
    assert len(gaps) == CALLS - 1
    assert min(gaps) >= GAP_S * 0.99, gaps  # an answer that comes at once never makes a tight loop


def test_the_gap_between_two_calls_adds_a_jitter_of_up_to_the_minimum_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    jitter = ScriptedJitter([1.0, 0.0])  # the largest jitter, then none, alternately
    monkeypatch.setattr(watch, "random", jitter)
    gaps = gaps_between_calls()
    assert set(jitter.ranges) == {(0, GAP_S)}  # drawn between nothing and the minimum gap again
    assert len(gaps) == CALLS - 1
    after_full_jitter, after_none = gaps[0::2], gaps[1::2]
    assert min(after_full_jitter) >= 2 * GAP_S * 0.99, gaps  # the jitter drawn is waited for
    assert min(after_none) >= GAP_S * 0.99, gaps  # and never less than the minimum gap


class HoldingAgent(FakeAgent):
    """Holds each query of the key `held_s`, then answers with new data; notes when it answered
    and when it was asked."""

    def __init__(self, held_s: float = 0.3) -> None:
        super().__init__()
        self.held_s = held_s
        self.asked: list[float] = []
        self.answered: list[float] = []
        self.done = asyncio.Event()

    async def answer(self, path: str, index: int) -> QueryResult:
        self.asked.append(time.monotonic())
        if len(self.asked) == 4:
            self.done.set()
            await asyncio.sleep(3600)
        await asyncio.sleep(self.held_s)
        self.answered.append(time.monotonic())
        return QueryResult(index + 1, [{"Value": base64.b64encode(f"v{index}".encode()).decode()}])


HELD_S = 0.3


def test_after_a_held_query_brings_new_data_the_next_one_goes_out_at_once() -> None:
    """The gap counts from the last call: a query held longer than the gap is followed at once, so
    a second change soon after the first finds its query held instead of waiting out a pause."""

    async def scenario() -> tuple[list[float], list[float]]:
        agent = HoldingAgent()
        watcher = Watcher(agent, Store(), WatchSettings(min_gap_s=HELD_S / 3))  # the gap passes while held
        watcher.watch(keyed(KVKey("k")))
        await asyncio.wait_for(agent.done.wait(), 5)
        await watcher.stop()
        return agent.answered, agent.asked

    answered, asked = asyncio.run(scenario())
    waits = [next_call - answer for answer, next_call in zip(answered, asked[1:], strict=False)]
    assert len(waits) == 3 and max(waits) < HELD_S / 3, waits  # not a gap after each answer


def test_a_query_held_less_than_the_gap_is_followed_only_once_the_gap_from_its_start_is_over() -> None:
    gap = 0.2

    async def scenario() -> list[float]:
        agent = HoldingAgent(held_s=gap / 4)
        watcher = Watcher(agent, Store(), WatchSettings(min_gap_s=gap))
        watcher.watch(keyed(KVKey("k")))
        await asyncio.wait_for(agent.done.wait(), 5)
        await watcher.stop()
        return agent.asked

    asked = asyncio.run(scenario())
    starts = [b - a for a, b in itertools.pairwise(asked)]
    assert len(starts) == 3 and min(starts) >= gap * 0.99, starts  # the rest of the gap is waited


class TableWideAgent(FakeAgent):
    """A key with no data (a KV key that does not exist): each query answered at once with the
    index of its whole table, moved by writes elsewhere, and the same empty body."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def get(self, path: str, params: Any = None, index: int = 0, *args: Any, **kwargs: Any) -> QueryResult:
        if path != "/v1/kv/missing":
            return await super().get(path, params, index, *args, **kwargs)
        self.calls += 1
        known = kwargs.get("known_body")
        return QueryResult(index + 1, None, unchanged=known == "[]", body="[]")


def test_a_key_woken_by_every_write_elsewhere_is_paced() -> None:
    """An attacker's review: a key without data is answered with its table's index, which every
    write anywhere moves; a registrant writing 100 times a second made each such key ask 100
    times a second. Answers that come at once, at a moved index, with the same body are paced
    like early answers, up to SAME_ANSWER_PAUSE_MAX_S."""

    async def scenario() -> int:
        agent = TableWideAgent()
        watcher = Watcher(agent, Store(), WatchSettings(min_gap_s=0.001))
        watcher.watch(keyed(KVKey("missing")))
        await asyncio.sleep(1.5)
        await watcher.stop()
        return agent.calls

    calls = asyncio.run(scenario())
    # 0.05 + 0.1 + 0.2, then every 0.25 s: ~8 in 1.5 s (without the pause: hundreds)
    assert calls <= 1.5 / 0.25 + 6, calls
