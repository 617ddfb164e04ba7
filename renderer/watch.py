"""Watching: one Consul blocking query per dependency key, results kept in a Store.

Each key gets one asyncio task, whatever number of templates use it; 1,000 watched services are
1,000 coroutines on one event loop, not 1,000 OS threads. Index handling follows Consul's
blocking-query rules: send the last index and a wait, reset to 0 when the index goes backwards
(Consul restarted with a fresh data dir, or a snapshot restore), treat an unchanged index as a
timeout, keep a minimum jittered gap between two calls for one key. After an error the next
query does not block: a restarted Consul with a lower index would otherwise hold it for the
whole wait. Errors back off with tenacity
(exponential, capped, jittered) and never give up: a Consul outage must not end the process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_random_exponential,
)

from renderer.consul_client import ConsulClient, ConsulRequestError, QueryResult
from renderer.dependency import Dependency
from renderer.errors import ConsulError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchSettings:
    block_wait_s: float = 60.0  # how long Consul may hold one blocking query
    min_gap_s: float = 0.005  # smallest pause between two calls for one key (plus the same in jitter)
    max_stale_s: float = 0.0  # > 0: read from any server, as long as it is no staler than this
    backoff_base_s: float = 0.1
    backoff_max_s: float = 10.0


@dataclass
class KeyState:
    """What the store knows of one key."""

    value: Any = None
    has_data: bool = False
    index: int = 0
    updated_at: float = 0.0
    error: str | None = None
    failures: int = 0


@dataclass
class Store:
    """The latest data for each dependency key; `changed` is set whenever a value really changed."""

    keys: dict[str, KeyState] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: ConsulError | None = None  # e.g. an ACL refusal before any success: startup config is wrong
    watch_errors: int = 0
    last_change: float = 0.0

    def state(self, key: str) -> KeyState:
        return self.keys.setdefault(key, KeyState())

    def put(self, key: str, value: Any, index: int) -> bool:
        """Store a value; True when it differs from the previous one (and `changed` is set)."""
        state = self.state(key)
        state.index, state.error, state.failures = index, None, 0
        if state.has_data and state.value == value:
            return False
        state.value, state.has_data, state.updated_at = value, True, time.monotonic()
        self.last_change = state.updated_at
        self.changed.set()
        return True

    def get(self, key: str) -> tuple[bool, Any]:
        state = self.keys.get(key)
        return (True, state.value) if state and state.has_data else (False, None)

    def record_error(self, key: str, message: str) -> None:
        state = self.state(key)
        state.error, state.failures = message, state.failures + 1
        self.watch_errors += 1

    def forget(self, key: str) -> None:
        self.keys.pop(key, None)


class Watcher:
    """Keeps exactly one blocking query running per dependency key asked for through `watch`."""

    def __init__(self, client: ConsulClient, store: Store, settings: WatchSettings) -> None:
        self._client = client
        self._store = store
        self._settings = settings
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def keys(self) -> set[str]:
        return set(self._tasks)

    def watch(self, dependencies: Iterable[Dependency]) -> None:
        """Start queries for new dependencies and stop the ones no template uses any more."""
        wanted = {dep.key: dep for dep in dependencies}
        for key in set(self._tasks) - set(wanted):
            self._tasks.pop(key).cancel()
            self._store.forget(key)
            log.debug("watch stopped: %s", key)
        for key, dep in wanted.items():
            if key not in self._tasks:
                self._tasks[key] = asyncio.create_task(self._run(dep), name=f"watch {key}")
                log.debug("watch started: %s", key)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, dep: Dependency) -> None:
        index = 0
        ever_succeeded = False
        while True:
            result = await self._fetch(dep, index, ever_succeeded)
            ever_succeeded = True
            index = self._next_index(dep, index, result)
            try:
                value = dep.parse(result.data)
            except (TypeError, ValueError, AttributeError, KeyError) as err:
                # Data of a shape we do not understand: keep the last good value, report, go on.
                self._store.record_error(dep.key, f"unexpected answer for {dep.key}: {err!r}")
                log.error("watch %s: unexpected answer from Consul, keeping the last data: %r", dep.key, err)
            else:
                if self._store.put(dep.key, value, result.index):  # equal data signals nothing
                    log.debug("watch %s: new data at index %d", dep.key, result.index)
            gap = self._settings.min_gap_s
            await asyncio.sleep(gap + random.uniform(0, gap))

    @staticmethod
    def _next_index(dep: Dependency, previous: int, result: QueryResult) -> int:
        if result.index < previous:
            log.warning(
                "Consul index went backwards for %s (%d → %d): Consul restarted or restored; re-reading",
                dep.key,
                previous,
                result.index,
            )
            return 0
        return max(result.index, 0)

    async def _fetch(self, dep: Dependency, index: int, ever_succeeded: bool) -> QueryResult:
        path, params = dep.request()
        settings = self._settings
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ConsulError),
            wait=wait_random_exponential(multiplier=settings.backoff_base_s, max=settings.backoff_max_s),
            stop=stop_never,
            before_sleep=lambda state: self._on_error(dep, state, ever_succeeded),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                # After an error, ask without blocking: Consul may have restarted with a lower index,
                # and a blocking query on an index it has not reached would hang for the whole wait.
                result = await self._query(path, params, index if attempt.retry_state.attempt_number == 1 else 0)
                if self._store.state(dep.key).error is not None:
                    log.info("watch recovered: %s", dep.key)
                return result
        raise AssertionError("unreachable: stop_never")

    async def _query(self, path: str, params: list[tuple[str, str]], index: int) -> QueryResult:
        settings = self._settings
        stale = settings.max_stale_s > 0
        result = await self._client.get(path, params, index, settings.block_wait_s, stale=stale)
        if stale and result.last_contact_ms > settings.max_stale_s * 1000:
            # Too stale: ask the leader instead, as consul-template does.
            result = await self._client.get(path, params, index, settings.block_wait_s, stale=False)
        return result

    def _on_error(self, dep: Dependency, state: RetryCallState, ever_succeeded: bool) -> None:
        error = state.outcome.exception() if state.outcome else None
        message = str(error)
        self._store.record_error(dep.key, message)
        if isinstance(error, ConsulRequestError) and error.status == 403 and not ever_succeeded:
            self._store.fatal = error
            self._store.changed.set()
        sleep = state.next_action.sleep if state.next_action else 0.0
        level = logging.WARNING if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0 else logging.DEBUG
        log.log(
            level,
            "watch %s failed (attempt %d, retrying in %.2fs; never giving up): %s",
            dep.key,
            state.attempt_number,
            sleep,
            message,
        )
