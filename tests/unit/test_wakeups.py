"""The loop's wake-up causes: what woke it, taken once; new data until the loop has seen it."""

from __future__ import annotations

import asyncio

from renderer.wakeups import Wake, Wakeups


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


def test_a_cause_posted_while_waiting_ends_the_wait_at_once() -> None:
    async def scenario() -> tuple[set[Wake], float]:
        wake = Wakeups(asyncio.Event())
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, wake.post, Wake.RECONFIGURE)
        started = loop.time()
        causes = await wake.wait(30.0)
        return causes, loop.time() - started

    causes, waited = asyncio.run(scenario())
    assert causes == {Wake.RECONFIGURE} and waited < 5.0
