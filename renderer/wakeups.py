"""Why the loop runs again: typed wake-up causes instead of one event for everything.

Signal handlers, the template-file watcher, HAProxy's child and a fatal Consul refusal post a
cause; new data is the Store's own `changed` event (the source stage knows nothing of the loop).
The loop waits for any of them and gets the set of causes, so it never infers them from flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from enum import Enum, auto


class Wake(Enum):
    DATA = auto()  # the Store holds new data
    STOP = auto()  # SIGTERM or SIGINT
    RECONFIGURE = auto()  # SIGHUP, or a template file edited on disk
    HAPROXY_EXITED = auto()  # the HAProxy started with --exec-haproxy is gone
    FATAL = auto()  # Consul refused the startup configuration (an ACL refusal before any success)
    CONSUL_FAILING = auto()  # a watched key started failing: an outage begins (no new data)
    LATE_FAILURE = auto()  # a file written behind its runtime changes failed: delivery holds the error
    # Timers: `Wakeups.wait` returns DUE when its timeout passes; the runner names which one it was.
    DUE = auto()
    RETRY = auto()  # delivery acts again: a failed apply's retry, a deferred check, a redo
    CLEANUP = auto()  # removed servers still draining may be deleted now
    GUARD_HOLD = auto()  # an anti-empty guard's hold ends: render again
    PROGRESS = auto()  # the outage progress line is due
    ONCE_DEADLINE = auto()  # --once: once_timeout has passed
    COLLECT = auto()  # a garbage collection is due (loop/collector.py), done while idle
    HOST_ADDRESSES = auto()  # the host's own addresses are read again (loop/templates.HostAddresses)
    AGENT_PORTS = auto()  # the local agent's ports were read: render with them reserved (loop/agent_ports.py)


class Wakeups:
    """Posted causes plus the Store's events (new data; an outage begins); `wait` returns what happened."""

    def __init__(self, data: asyncio.Event, failing: asyncio.Event | None = None) -> None:
        self._data = data
        self._failing = failing or asyncio.Event()
        self._posted: set[Wake] = set()
        self._event = asyncio.Event()

    def post(self, cause: Wake) -> None:
        self._posted.add(cause)
        self._event.set()

    def pending(self) -> set[Wake]:
        """What happened and is not taken yet (data stays pending until `data_seen`)."""
        failing = {Wake.CONSUL_FAILING} if self._failing.is_set() else set()
        return self._posted | failing | ({Wake.DATA} if self._data.is_set() else set())

    def data_seen(self) -> None:
        """The loop is about to render what the Store holds: new data from now on is news."""
        self._data.clear()

    async def wait(self, timeout: float | None) -> set[Wake]:
        """Until something happens, or `timeout` seconds ({DUE}); posted causes are taken."""
        if not self.pending():
            events = (self._event, self._data, self._failing)
            waiters = [asyncio.ensure_future(event.wait()) for event in events]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
        causes = self.pending()
        self._posted.clear()
        self._event.clear()
        self._failing.clear()
        return causes or {Wake.DUE}


class Quiescence:
    """When new data is acted on (`wait.min` / `wait.max`, as consul-template's quiescence, with a
    leading edge): data after a quiet `wait_min` is acted on at once (a lone change, or the first
    of a burst, is never delayed); data closer than that to the last wake-up is a burst, and the
    loop waits for more until it is quiet for `wait_min`, `wait_max` from the burst's start at most.
    Pure logic on an injected clock: the loop does the waiting."""

    def __init__(self, wait_min: float, wait_max: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.wait_min, self.wait_max = wait_min, wait_max
        self._clock = clock
        self._last_wake = -math.inf

    def burst(self) -> float | None:
        """New data woke the loop: None to act at once (it was quiet before), else the time the
        burst began (pass it to `wait_for_more`)."""
        now = self._clock()
        quiet = now - self._last_wake >= self.wait_min
        self._last_wake = now
        return None if quiet else now

    def more(self) -> None:
        """More data arrived during a burst: the quiet a later change is measured against counts
        from now, so a steady stream of changes is applied about every `wait_max`, not twice."""
        self._last_wake = self._clock()

    def wait_for_more(self, began: float) -> float | None:
        """How long to wait for more data in a burst that began at `began`; None: act now (the
        burst reached `wait_max`)."""
        remaining = self.wait_max - (self._clock() - began)
        return None if remaining <= 0 else min(self.wait_min, remaining)
