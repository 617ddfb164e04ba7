"""README promise (source/watch.py): the watcher "keeps a minimum jittered gap between calls" for
one key, `WatchSettings.min_gap_s` plus up to the same again in jitter. Against a fake agent (our
seam, tests/unit/fakes.py) that answers at once and records when it was asked."""

from __future__ import annotations

import asyncio
import base64
import time

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
    async def scenario() -> list[float]:
        agent = EagerAgent()
        watcher = Watcher(agent, Store(), WatchSettings(min_gap_s=GAP_S))
        watcher.watch(keyed(KVKey("k")))
        await asyncio.wait_for(agent.done.wait(), 5)
        await watcher.stop()
        return [b - a for a, b in zip(agent.times, agent.times[1:], strict=False)]

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
