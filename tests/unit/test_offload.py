"""The parse thread's worker (renderer/source/offload.py): in order, never dead for its callers.

A review found two ways its callers could wait forever: a job raising a BaseException that is no
Exception ended the thread, and so did a caller's closed loop (the next loop's jobs then queued for
nobody)."""

from __future__ import annotations

import asyncio
import time

import pytest

from renderer.source.offload import WorkerThread


class Boom(BaseException):
    pass


def boom() -> int:
    raise Boom


def test_jobs_run_in_order_and_a_failing_one_fails_alone() -> None:
    worker, order = WorkerThread("test-worker"), list[int]()

    def second_job() -> int:
        order.append(2)
        return 42

    async def scenario() -> int:
        first = asyncio.create_task(worker.run(boom))
        second = asyncio.create_task(worker.run(second_job))
        with pytest.raises(RuntimeError, match="a job raised Boom"):  # no BaseException of a job's reaches its caller
            await asyncio.wait_for(first, 5)
        return await asyncio.wait_for(second, 5)

    try:
        assert asyncio.run(scenario()) == 42 and order == [2]
    finally:
        worker.close()


def test_a_closed_loop_does_not_end_the_worker_for_the_next() -> None:
    worker = WorkerThread("test-worker")

    async def leave_a_job_behind() -> None:
        asyncio.get_running_loop().create_task(worker.run(lambda: time.sleep(0.2)))
        await asyncio.sleep(0.01)  # the loop closes with its job still on the thread

    async def next_loop() -> int:
        return await asyncio.wait_for(worker.run(lambda: 7), 5)

    try:
        asyncio.run(leave_a_job_behind())
        assert asyncio.run(next_loop()) == 7
    finally:
        worker.close()


def test_a_closed_worker_takes_no_job() -> None:
    worker = WorkerThread("test-worker")
    worker.close()

    async def scenario() -> None:
        await worker.run(lambda: 1)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(scenario())
