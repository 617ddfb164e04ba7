"""Work too long for the event loop, run on one daemon thread of its own, in the order asked.

The watcher parses long Consul answers here (~65 µs an instance: 200,000 instances held the loop
for 23 s). One thread, so that answers are taken in order and at most one competes with the loop
(which then gets its turn every few milliseconds, the interpreter's switch interval). Its own, so
that the work never queues in front of the delivery's (haproxy -c, the Runtime API) in asyncio's
default executor. A daemon, so that a parse under way never holds the process's exit; and a job
whose caller was cancelled before its turn (a poll stopped, a watcher stopped) never runs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


class WorkerThread:
    """One daemon thread running jobs for coroutines, in order; started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def run(self, job: Callable[[], T]) -> T:
        """`job()` on the thread; its result or its exception here. asyncio.CancelledError once closed."""
        if self._closed:
            raise asyncio.CancelledError(f"{self._name} is closed")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put((job, done, loop))
        return await done

    def close(self) -> None:
        """No new job; the thread ends after the one it runs (if any), without being waited for."""
        self._closed = True
        self._jobs.put(None)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done, loop = item
            if done.cancelled():  # only read here: a flag, settled on the loop
                continue
            try:
                result, error = job(), None
            except Exception as err:  # handed to the caller: the thread goes on
                result, error = None, err
            except BaseException as err:  # a job's SystemExit or CancelledError is no exit or cancel of its caller
                result, error = None, RuntimeError(f"{self._name}: a job raised {type(err).__name__}: {err}")
            try:
                loop.call_soon_threadsafe(_settle, done, result, error)
            except RuntimeError:  # that caller's loop is closed: nobody waits for this one
                continue


def _settle(done: asyncio.Future[Any], result: Any, error: Exception | None) -> None:
    if done.done():
        return  # cancelled meanwhile
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)
