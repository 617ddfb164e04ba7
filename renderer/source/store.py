"""What the watcher keeps and how it is tuned: the Store of the latest data per key, its
settings, and its counters. Shared by the watcher and the sweeper (sweep.py), which reach each
other only through the narrow `SweepHost` interface, never by import."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

SIGN_VALID_S = 10.0  # a trigger's sign older than this is not taken as the start of a change
SIGNS_KEPT = 1024  # trigger moves remembered (index → when told), at most: the oldest go first
SPARE_CONNECTIONS = 2  # kept free for registrations and check updates through the same client
CHANGE_LOG = 4096  # the store remembers this many changes (which key, first told of when) for `changed_since`
ANSWERS_KEPT = 8  # per key: the indexes of its latest answers with data (see `KeyState.answers`)


@dataclass(frozen=True)
class WatchSettings:
    block_wait_s: float = 60.0  # how long Consul may hold one blocking query
    min_gap_s: float = 0.005  # least time between two calls for one key (plus the same in jitter)
    max_stale_s: float = 0.0  # > 0: read from any server, as long as it is no staler than this
    backoff_base_s: float = 0.1
    backoff_max_s: float = 10.0
    max_connections: int = 64  # the budget: connections held to the agent, whatever the number of keys
    reconcile_interval_s: float = 300.0  # budgeted mode: a full sweep at least this often
    streams_per_connection: int = 1  # blocking queries one connection holds: 1, or many over HTTP/2
    server_watch_s: float = 2.0  # while queries are held: how often to read the agent's members (0: never)

    @property
    def sweep_connections(self) -> int:
        """Connections a sweep or a targeted re-read may use at once (the rest hold blocking queries)."""
        return max(1, min(16, self.max_connections // 4))

    @property
    def blocking_connections(self) -> int:
        """Connections that hold blocking queries, next to the sweep's connections and the spare ones."""
        return max(1, self.max_connections - SPARE_CONNECTIONS - self.sweep_connections)

    @property
    def blocking_slots(self) -> int:
        """Blocking queries that fit the budget (budgeted mode: triggers, other keys, hot services)."""
        return self.blocking_connections * self.streams_per_connection

    @property
    def precise_capacity(self) -> int:
        """The most keys that each get their own blocking query (precise mode)."""
        if self.streams_per_connection > 1:
            return self.blocking_slots
        return self.max_connections - SPARE_CONNECTIONS


@dataclass(frozen=True)
class Seen:
    """A key as a read found it when the read began (see `Store.overtaken`)."""

    index: int
    updated_at: float
    epoch: int  # the store's epoch then


@dataclass
class KeyState:
    """What the store knows of one key."""

    value: Any = None
    has_data: bool = False
    index: int = 0
    epoch: int = 0  # the store's epoch when the read of the value held began (see `Store.restored`)
    updated_at: float = 0.0
    error: str | None = None
    failures: int = 0
    # The indexes its latest answers with data came at, oldest first (at most ANSWERS_KEPT): a write
    # the catalog trigger showed is this key's when one of them is that write's (`sweep.explains`),
    # even if a later write to it came before the decision. Of empty answers only the one that
    # emptied it: Consul answers an empty service at the index of the latest write that left any
    # service empty (see `sweep.explains`).
    answers: tuple[int, ...] = ()


@dataclass
class Store:
    """The latest data for each dependency key; `changed` is set whenever a value really changed."""

    keys: dict[str, KeyState] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # new data, and nothing else
    failing_started: asyncio.Event = field(default_factory=asyncio.Event)  # the first failure of an outage
    watch_errors: int = 0
    last_change: float = 0.0  # monotonic: the first sign of the latest change (see `sign`)
    # A catalog-wide trigger's moves: index → when first told of, oldest first (see `sign`)
    signs: dict[int, float] = field(default_factory=dict)
    last_error: str | None = None
    failing_keys: set[str] = field(default_factory=set)  # keys whose last query failed
    generation: int = 0  # counts the changes of a value (put that changed, forget)
    epoch: int = 0  # counts the times Consul's indexes went backwards (see `restored`)
    refusals: dict[str, str] = field(default_factory=dict)  # key → why Consul refuses it (served empty)
    oversize: dict[str, str] = field(default_factory=dict)  # key → why its last answer is kept (a newer one too large)
    _log: collections.deque[tuple[int, str, float]] = field(  # generation, key, first told of
        default_factory=lambda: collections.deque(maxlen=CHANGE_LOG)
    )

    def state(self, key: str) -> KeyState:
        return self.keys.setdefault(key, KeyState())

    def put(self, key: str, value: Any, index: int, epoch: int | None = None) -> bool:
        """Store a value; True when it differs from the previous one (and `changed` is set).
        `epoch`: the store's when the read that brought it began (now, when None)."""
        state = self.state(key)
        # Only a change at an index past the one held matches a move (helper-118, /tmp/rev65): not an
        # index gone backwards (a restore seen here before the catalog trigger), none (a refusal
        # served empty, which took the oldest sign: up to 10 s), nor the same (Consul 1.8.7 leaves a
        # service's index as it was when an instance of it is registered again under another name,
        # and its next answer took the service's own earlier move). Those are timed from their read.
        signed = index > max(state.index, 0)
        emptied = not value and state.has_data and bool(state.value)  # its last instance went at `index`
        if index < state.index:
            state.answers = ()  # restored: the old indexes no longer compare with new ones
        elif signed and (value or emptied) and (epoch is None or epoch == self.epoch):
            # Not an answer asked before a restore and taken in after it (helper-122, /tmp/rev68):
            # its index would explain another service's write at that index after the restore.
            state.answers = (*state.answers[1 - ANSWERS_KEPT :], index)
        state.index, state.error, state.failures = index, None, 0
        state.epoch = self.epoch if epoch is None else epoch
        self.failing_keys.discard(key)
        self.refusals.pop(key, None)
        self.oversize.pop(key, None)
        if state.has_data and state.value == value:
            return False
        state.value, state.has_data, state.updated_at = value, True, time.monotonic()
        self.last_change = self._first_sign(index, state.updated_at) if signed else state.updated_at
        self._changed(key, self.last_change)
        self.changed.set()
        return True

    def sign(self, index: int) -> None:
        """A catalog-wide trigger moved to `index`: the change it tells of is read later (located
        or swept), but its latency counts from now (see `_first_sign`)."""
        now = time.monotonic()
        while self.signs:
            oldest = next(iter(self.signs))
            if now - self.signs[oldest] < SIGN_VALID_S and len(self.signs) < SIGNS_KEPT:
                break
            del self.signs[oldest]
        self.signs.setdefault(index, now)

    def _first_sign(self, index: int, read_at: float) -> float:
        """When the change in an answer at `index` was first told of: the first trigger move at that
        index or past it (seen after that write was made, so never before it: a figure from there is
        never longer than the change took), else when it was read. Matched by index, not by order: a
        move of a service no template follows timed the next change from its trigger (helper-117,
        /tmp/rev64: 741-992 ms for changes a few ms old, a registrant re-registering every 0.05 s),
        and a second move's change read with the first's from its read (helper-112, /tmp/rev59)."""
        for at_index, told in self.signs.items():  # oldest first: the first one past `index` is it
            if at_index >= index and read_at - told < SIGN_VALID_S:
                return told
        return read_at  # no move told of past it (a check write in between that no trigger tells of: too short)

    def get(self, key: str) -> tuple[bool, Any]:
        state = self.keys.get(key)
        return (True, state.value) if state and state.has_data else (False, None)

    def answered(self, key: str) -> bool:
        """The key holds an answer from Consul (not the empty value of a refusal: see `refuse`)."""
        state = self.keys.get(key)
        return state is not None and state.has_data and key not in self.refusals

    def refuse(self, key: str, empty: Any, why: str) -> bool:
        """Serve `empty` for a key Consul refuses to be asked about, and keep `why` for the
        templates' reports until an answer comes (`put`) or the key goes (`forget`); True when
        the key was not refused before (the caller says so once)."""
        new = key not in self.refusals
        self.put(key, empty, 0)
        self.refusals[key] = why
        return new

    def keep_oversize(self, key: str, why: str) -> bool:
        """The key keeps its last answer: a newer one was over max_answer_bytes (`why` reported with
        the refusals until an answer comes); True when it was not so before."""
        new = key not in self.oversize
        self.oversize[key] = why
        return new

    def refused_among(self, keys: Collection[str]) -> dict[str, str]:
        """Those of `keys` served empty because Consul refuses them, or served their last answer
        because a newer one is too large, with why."""
        if not self.refusals and not self.oversize:
            return {}
        found = {key: why for key in keys if (why := self.refusals.get(key)) is not None}
        if self.oversize:
            found |= {key: why for key in keys if (why := self.oversize.get(key)) is not None}
        return found

    def record_error(self, key: str, message: str) -> None:
        """Remember a failed query; the first failure of an outage wakes the loop (to report it)."""
        if not self.failing_keys:
            self.failing_started.set()
        self.failing_keys.add(key)
        state = self.state(key)
        state.error, state.failures = message, state.failures + 1
        self.watch_errors += 1
        self.last_error = message

    def recovered(self, key: str) -> None:
        """The key's last failure no longer counts: it answered, or nobody asks for it any more."""
        self.failing_keys.discard(key)
        if (state := self.keys.get(key)) is not None:
            state.error = None

    def failing(self) -> int:
        """How many keys failed their last query (0: Consul answers)."""
        return len(self.failing_keys)

    def forget(self, key: str) -> None:
        if self.keys.pop(key, None) is not None:
            self._changed(key, time.monotonic())
        self.failing_keys.discard(key)
        self.refusals.pop(key, None)
        self.oversize.pop(key, None)

    def seen(self, key: str) -> Seen:
        """The key as a read that begins now finds it."""
        state = self.state(key)
        return Seen(state.index, state.updated_at, self.epoch)

    def overtaken(self, key: str, seen: Seen, index: int) -> bool:
        """Whether an answer at `index`, asked when the key was as `seen`, is no newer than one taken
        in meanwhile by another read: it is then dropped. Across a restore (`restored`) indexes do
        not compare: an answer asked before it never replaces one asked after, and one asked after
        always replaces one asked before."""
        state = self.state(key)
        if seen.epoch != state.epoch:
            return seen.epoch < state.epoch
        return (state.index, state.updated_at) != (seen.index, seen.updated_at) and state.index >= index

    def restored(self) -> None:
        """Consul's indexes went backwards (a snapshot restored, servers with a fresh data directory):
        a new epoch. An answer asked before the restore and taken in after it held an index higher
        than any after it, and every read after it was dropped as no newer: the service served as it
        was before the restore until the reconcile sweep (helper-113, /tmp/rev60). The triggers'
        signs go too, and the indexes of the keys' past answers: they no longer compare with new ones."""
        self.epoch += 1
        self.signs.clear()
        for state in self.keys.values():
            state.answers = ()

    def snapshot(self, keys: Collection[str], since: int | None = None) -> dict[str, tuple[int, float]]:
        """key → (index, monotonic time its value last changed) for those of `keys` the store holds
        whose value changed after generation `since` (every one of them when `since` is None or the
        log does not reach back that far)."""
        changed = self.changed_since(since) if since is not None else None
        wanted = keys if changed is None else [key for key in changed if key in keys]
        return {key: (state.index, state.updated_at) for key in wanted if (state := self.keys.get(key)) is not None}

    def _changed(self, key: str, told: float) -> None:
        self.generation += 1
        self._log.append((self.generation, key, told))

    def changed_since(self, generation: int) -> frozenset[str] | None:
        """The keys whose value changed or went after `generation` (an earlier `self.generation`),
        or None when the log no longer reaches back that far: a render then checks every value it
        uses, and otherwise only these (a change costs the keys it touched, not the catalog)."""
        logged = self._logged_since(generation)
        return None if logged is None else frozenset(key for _, key, _ in logged)

    def first_told(self, keys: Collection[str], generation: int | None) -> float | None:
        """When the oldest change of `keys` after `generation` was first told of (see `sign`): where
        the latency of an apply that carries them all begins, so that a batch is timed from its
        first change, not its last. None when none of them changed (an apply then carries no
        Consul change: a template edited, a guard's hold ended); the latest change of any key when
        it is not known (no `generation`, or the log no longer reaches back)."""
        logged = self._logged_since(generation) if generation is not None else None
        if logged is None:
            return self.last_change or None
        return min((told for _, key, told in logged if key in keys), default=None)

    def _logged_since(self, generation: int) -> list[tuple[int, str, float]] | None:
        """The logged changes after `generation` (newest first), or None when the log no longer
        reaches back that far."""
        if generation == self.generation:
            return []
        if generation > self.generation or not self._log or self._log[0][0] > generation + 1:
            return None
        return list(itertools.takewhile(lambda entry: entry[0] > generation, reversed(self._log)))


@dataclass
class WatchCounters:
    """What the watcher did, for the status page and the benchmark."""

    sweeps: int = 0
    promotions: int = 0
    explained: int = 0  # catalog moves explained by a followed service's own answer (no sweep at once)
    located: int = 0  # … by the services the agent's summaries named (read at once, no sweep at once)
