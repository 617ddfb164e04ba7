"""The loop's wake-up causes: what woke it, taken once; new data until the loop has seen it."""

from __future__ import annotations

import asyncio

import pytest

from renderer.wakeups import Quiescence, Wake, Wakeups
from tests.helpers import Pace


def test_causes_are_returned_once_and_data_until_seen() -> None:
    async def scenario() -> list[set[Wake]]:
        data = asyncio.Event()
        wake = Wakeups(data)
        wake.post(Wake.STOP)
        data.set()
        first = await wake.wait(1.0)
        second = await wake.wait(0.01)  # STOP was taken; the data is still unseen
        wake.data_seen()
        third = await wake.wait(0.01)
        return [first, second, third]

    assert asyncio.run(scenario()) == [{Wake.STOP, Wake.DATA}, {Wake.DATA}, {Wake.DUE}]


def test_a_cause_posted_while_waiting_ends_the_wait_at_once(pace: Pace) -> None:
    async def scenario() -> tuple[set[Wake], float]:
        wake = Wakeups(asyncio.Event())
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, wake.post, Wake.RECONFIGURE)
        started = loop.time()
        causes = await wake.wait(30.0)
        return causes, loop.time() - started

    causes, waited = asyncio.run(scenario())
    assert causes == {Wake.RECONFIGURE} and waited < pace(5.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_quiescence_a_lone_change_is_acted_on_at_once() -> None:
    clock = FakeClock()
    quiet = Quiescence(0.5, 2.0, clock)
    assert quiet.burst() is None  # the first change ever: leading edge
    clock.now += 0.6
    assert quiet.burst() is None  # quiet for more than wait_min since: at once again


def test_quiescence_a_burst_waits_for_wait_min_of_quiet_and_at_most_wait_max() -> None:
    clock = FakeClock()
    quiet = Quiescence(0.5, 2.0, clock)
    assert quiet.burst() is None
    clock.now += 0.1
    began = quiet.burst()  # closer than wait_min to the last wake-up: a burst
    assert began == clock.now
    assert quiet.wait_for_more(began) == 0.5  # wait for wait_min of quiet
    clock.now += 1.8
    assert quiet.wait_for_more(began) == pytest.approx(0.2)  # coalescing, capped by wait_max
    clock.now += 0.2
    assert quiet.wait_for_more(began) is None  # wait_max reached: act now, whatever keeps coming


def test_quiescence_after_a_burst_a_change_close_to_its_last_data_is_a_new_burst() -> None:
    """Under continuous flapping: one render per wait_max, not a leading-edge render after each
    burst (the quiet gap counts from the burst's last data, not from its start)."""
    clock = FakeClock()
    quiet = Quiescence(0.5, 2.0, clock)
    assert quiet.burst() is None  # 100.0: act
    clock.now += 0.2
    began = quiet.burst()
    assert began is not None
    for _ in range(10):  # data every 0.2 s during the burst
        clock.now += 0.2
        quiet.more()
    assert quiet.wait_for_more(began) is None  # 102.2: wait_max reached, act
    clock.now += 0.2
    assert quiet.burst() is not None  # 0.2 s after the burst's last data: a new burst, not at once


def test_quiescence_takes_a_new_wait_on_sighup() -> None:
    clock = FakeClock()
    quiet = Quiescence(0.5, 2.0, clock)
    quiet.burst()
    quiet.wait_min, quiet.wait_max = 0.01, 0.04
    clock.now += 0.02
    assert quiet.burst() is None


def test_an_outage_wakes_the_loop_as_consul_failing_never_as_new_data() -> None:
    from renderer.source.store import Store

    async def scenario() -> tuple[set[Wake], bool, set[Wake]]:
        store = Store()
        wakeups = Wakeups(store.changed, store.failing_started)
        store.record_error("kv.key(k)", "connection refused")
        store.record_error("kv.key(j)", "connection refused")  # the same outage: no second wake-up
        first = await wakeups.wait(1.0)
        return first, store.changed.is_set(), await wakeups.wait(0.01)

    first, data, then = asyncio.run(scenario())
    assert first == {Wake.CONSUL_FAILING} and not data and then == {Wake.DUE}
