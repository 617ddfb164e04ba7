"""Watching: every dependency key kept fresh within a fixed budget of connections to the agent.

A blocking query holds its connection for the whole wait, and a Consul agent refuses more than
`limits.http_max_conns_per_client` (200) connections from one address, so one query per key (as
consul-template does) stops working at about that many watched services. The watcher therefore
works in one of two modes, chosen from the number of keys and `max_connections`:

- **precise**: every key fits the budget, so each gets its own blocking query (one asyncio task).
- **budgeted**: keys other than `health.service` keep their own blocking query; the services are
  covered by four catalog-wide triggers held as blocking queries (`/v1/health/state/critical`
  and `/warning`, `/v1/catalog/services`, `/v1/catalog/nodes`), whose moves the Sweeper
  (sweep.py) turns into reads of the services that changed, or a sweep. A service that changed
  is promoted to a blocking query of its own (the least recently changed one gives its slot
  back), so changes that cluster, as deploys do, are followed precisely. A full sweep also runs
  every `reconcile_interval`, as a safety net. Entered as soon as the keys pass the budget, and
  left only once they have fit it for BUDGET_LEAVE_S (`_choose_mode`).

Index handling follows Consul's blocking-query rules: send the last index and a wait, reset to 0
when the index goes backwards (Consul restarted with a fresh data dir, or a snapshot restore),
treat an unchanged index as a timeout, start two calls for one key at least a jittered minimum
gap apart (after a query held longer than that, the next goes out at once).
After an error the next query does not block: a restarted Consul with a lower index would
otherwise hold it for the whole wait. Errors back off with tenacity (exponential, capped,
jittered) and never give up: a Consul outage must not end the process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from renderer.errors import ConsulError
from renderer.logs import shown
from renderer.source.batch import BatchReader, ClientReader
from renderer.source.claims import Claims
from renderer.source.client import DECODE_LATER_CHARS, ConsulGetter, QueryResult, TooLarge
from renderer.source.dependency import (
    CatalogNodes,
    CatalogServices,
    Dependency,
    HealthService,
    HealthState,
    ServiceInstance,
)
from renderer.source.fetch import KEY_SHOWN, Abandoned, Fetcher, KeyRefused, refusal_reason
from renderer.source.offload import WorkerThread
from renderer.source.stall import AGENT_CONNECTIONS_PER_CLIENT
from renderer.source.store import KeyState, Seen, Store, WatchCounters, WatchSettings
from renderer.source.sweep import TRIGGERS, Sweeper

__all__ = ["KeyState", "Store", "WatchCounters", "WatchSettings", "Watcher"]

log = logging.getLogger(__name__)

REASK_TICK_S = 0.001  # after a held query, the next one goes out this much later (see _poll)
REFUSED_REASK_MAX_S = 60.0  # a key Consul refuses to be asked about is asked again at most this far apart
# A blocking query answered at once with an index that did not move (no change to tell): the next
# waits this long, doubling up to backoff_max_s while it goes on. Consul does so rarely (a spurious
# wake-up); an agent that always does (index missing, 0 or going backwards) made ~120 requests a
# second per key.
EARLY_ANSWER_PAUSE_S = 0.05
EARLY_ANSWER_S = 1.0  # "at once": answered sooner than this
# … and one answered at once with a moved index but the same body: a key without data (a KV key
# that does not exist, a service with no instance) is answered with the index of its whole table,
# which every write anywhere moves, so a registrant writing 100 times a second made each of them
# ask 100 times a second. Paced the same way, up to this much (a change to the key itself then
# waits that long at most, and only while such writes go on). Not the catalog-wide triggers, whose
# moved index is the news (the catalog's list of names stays the same as instances come and go).
SAME_ANSWER_PAUSE_MAX_S = 0.25
# An answer this long (~45 instances) or longer is decoded and parsed on the watcher's parse thread
# (see offload.py): one service of 200,000 instances (45 MB, under max_answer_bytes) held the event
# loop, and every other update, for 23 s each time it changed. Shorter answers, the common case
# (10 instances: 14 kB), are parsed at once: the hop would cost more than it saves.
PARSE_AWAY_CHARS = DECODE_LATER_CHARS

# Budgeted mode is left for precise only after the keys have fit the budget this long, with no query
# still ending (see `Watcher._choose_mode`).
BUDGET_LEAVE_S = 600.0

_DROPPED = object()  # a long answer not parsed: its key was dropped before its turn
_NO_STATE = KeyState()


class Watcher:
    """Keeps every dependency key asked for through `watch` fresh, within `max_connections`."""

    def __init__(
        self,
        client: ConsulGetter,
        store: Store,
        settings: WatchSettings,
        reader: BatchReader | None = None,
        on_fatal: Callable[[ConsulError], None] | None = None,
    ) -> None:
        """`reader`: how sweeps read many services at once (default: through the client's pool,
        `sweep_connections` at a time). `on_fatal`: told of an error that retrying cannot cure (an
        ACL refusal before any success: the startup configuration is wrong)."""
        self._store = store
        self._settings = settings
        self.fetcher = Fetcher(client, store, settings, on_fatal)
        stalls, stale = self.fetcher.stalls, settings.max_stale_s > 0
        self.reader = reader or ClientReader(client, settings.sweep_connections, stale=stale, stalls=stalls)
        self._wanted: dict[str, Dependency] = {}
        self._polls: dict[str, asyncio.Task[None]] = {}  # one blocking query per key (and per trigger)
        self._hot: OrderedDict[str, None] = OrderedDict()  # swept services promoted, least recent first
        self._draining: set[str] = set()  # polls told to stop once their current query returns
        self._budgeted = False  # see `_choose_mode`
        self._fit_since: float | None = None  # budgeted: since when the keys fit the budget (monotonic)
        self._resting: set[str] = set()  # polls of keys Consul refuses to be asked about, between two asks
        self._refusals: dict[str, int] = {}  # refusals in a row per key (the pause before the next ask)
        # key → (no full read by a sweep before, too-large answers in a row): see `read_pause`
        self._oversize_reads: dict[str, tuple[float, int]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()  # polls reset or superseded, until they have ended
        self._sweeper = Sweeper(self, self.fetcher)
        self._claims = Claims()  # which services' answers hold each instance (see claims.py)
        self._sweeps_go = asyncio.Event()  # cleared while the loop renders and applies a change
        self._sweeps_go.set()
        self._parser = WorkerThread("consul-parse")
        self.counters = WatchCounters()

    def pause_sweeps(self) -> None:
        """The loop is about to render and apply a change: sweeps send no new request until
        `resume_sweeps`, so that a thousand probe answers do not queue in front of it."""
        self._sweeps_go.clear()

    def resume_sweeps(self) -> None:
        self._sweeps_go.set()

    async def sweep_turn(self) -> None:
        """Wait until sweeps may send (see `pause_sweeps`)."""
        await self._sweeps_go.wait()

    @property
    def watched(self) -> int:
        return len(self._wanted)

    def wants(self, key: str) -> bool:
        return key in self._wanted

    @property
    def budgeted(self) -> bool:
        """True when services are watched through the triggers: the keys do not fit the budget, or did
        not lately (`_choose_mode`)."""
        return self._budgeted

    def _choose_mode(self, now: float) -> None:
        """Budgeted as soon as the keys pass the budget; precise again only once they have fit it for
        BUDGET_LEAVE_S, with room for the triggers' queries to end beside theirs and no query of a key
        no longer wanted still ending (judged at renders: the first one after that time). Going
        precise starts a query per key while the ones it stops hold their connections until they
        answer (up to the whole wait): a listing going over the budget and under it as names came
        and went (one registrant's 50 names toggling their tag, the bench's hostile part) kept the
        pool full, and the catalog trigger and a brand-new service's first read waited for held
        queries to end: a brand-new service served after 0.7-5.7 s."""
        capacity, keys = self._settings.precise_capacity, len(self._wanted)
        over = keys > capacity
        # A draining key still wanted (a hot service handed back) keeps its query when leaving: no
        # connection more. Counted, it kept a catalog of 44-59 keys with a change every few minutes
        # budgeted for good (an attacker's review, /tmp/rev54).
        ending = bool(self._draining - self._wanted.keys()) or bool(self._cancelled)
        cramped = keys + len(TRIGGERS) > capacity or ending
        if over or (self._budgeted and cramped):
            if not self._budgeted:
                log.info("%d keys, past the budget of %d blocking queries: services followed through "
                         "catalog-wide triggers and sweeps", keys, capacity)  # fmt: skip
            self._budgeted, self._fit_since = True, None
        elif not self._budgeted:
            return
        elif self._fit_since is None:
            self._fit_since = now
        elif now - self._fit_since >= BUDGET_LEAVE_S:
            self._budgeted, self._fit_since = False, None
            log.info("%d keys have fit the budget for %.0f s: one blocking query each again", keys, BUDGET_LEAVE_S)

    def watch(self, dependencies: Mapping[str, Dependency]) -> None:
        """Follow exactly these dependencies (key → dependency) from now on: start new ones, drop
        the others. Called after every render: when nothing is to start or stop (the common case
        over HTTP/2, where 1,000 services are 1,000 keys) it costs a few set comparisons."""
        if self._settled(dependencies):
            return
        wanted = dict(dependencies)
        for key in set(self._wanted) - set(wanted):
            self._stop_poll(key, dropped=True)
            self._hot.pop(key, None)
            self._oversize_reads.pop(key, None)
            self._store.forget(key)
            self._claims.drop(key)
            log.debug("watch stopped: %s", key)
        added = [dep for key, dep in wanted.items() if key not in self._wanted]
        self._wanted = wanted
        self._choose_mode(time.monotonic())
        if not self.budgeted:
            for key in [k for k in self._polls if k not in wanted]:
                self._stop_poll(key, dropped=True)  # triggers no longer needed
            self._hot.clear()
            for dep in wanted.values():
                self._start_poll(dep)
            return
        self._enter_budget(added)

    def _settled(self, wanted: Mapping[str, Dependency]) -> bool:
        """Precise mode, the same keys as last time, each with its query running and none ending,
        and nothing else running but queries already ending: `watch` would change nothing."""
        polls = self._polls.keys()
        return (
            not self.budgeted
            and not self._hot
            and wanted.keys() == self._wanted.keys()
            and polls >= wanted.keys()
            and self._draining.isdisjoint(wanted)
            and polls - wanted.keys() <= self._draining
        )

    def _enter_budget(self, added: list[Dependency]) -> None:
        handed = self._hand_over()
        # Triggers asked from scratch: their first answer is a baseline that tells of no move.
        anew = [t.key for t in TRIGGERS if t.key not in self._polls or t.key in self._draining]
        for trigger in TRIGGERS:
            self._start_poll(trigger)
        for other in self._wanted.values():
            if not isinstance(other, HealthService):
                self._start_poll(other)
        self._trim_hot()
        fresh = [dep for dep in added if isinstance(dep, HealthService)]
        # Read once the triggers asked anew have answered (their baselines): a change to one of these
        # between its read and a trigger's first answer was lost until the reconcile (helper-109,
        # /tmp/rev56 at a switch; a start past the budget too).
        self._sweeper.read_after_baselines([*fresh, *handed], anew)
        self._sweeper.ensure_running()
        others = sum(1 for dep in self._wanted.values() if not isinstance(dep, HealthService)) + len(TRIGGERS)
        if added and others > self._settings.blocking_slots:  # said when the set grows, not at every render
            log.warning(
                "%d non-service dependencies and triggers hold blocking queries, more than the %d the connection "
                "budget leaves for them; raise max_connections (--max-connections)",
                others,
                self._settings.blocking_slots,
            )

    def _hand_over(self) -> list[HealthService]:
        """From precise mode over HTTP/1.1: the services' queries (not hot ones) are reset, the sweeps
        follow those services now, and they are read again once every trigger has answered (a change
        between the reset and a trigger's first answer is in that answer alone: an attacker's review,
        /tmp/rev55; see Sweeper.read_after_baselines). Left to end by themselves, the queries kept the
        pool over full beside the triggers' and the new services' reads, up to the whole wait (a
        brand-new service not served within 30 s, /tmp/s16/cross.py). Over HTTP/1.1 the agent holds a
        reset query until it answers: at most as many as it holds beside our pool refilled
        (AGENT_CONNECTIONS_PER_CLIENT); the others end by themselves. Over HTTP/2 they all do:
        streams, the pool never fills, and a reset of thousands would be read again at once."""
        services = [d for d in self._wanted.values() if isinstance(d, HealthService) and self._polls_own(d.key)]
        room = AGENT_CONNECTIONS_PER_CLIENT - self._settings.max_connections
        handed = services[: max(0, room)] if self._settings.streams_per_connection == 1 else []
        for dep in handed:
            self._stop_poll(dep.key, cancel=True)
        for dep in services[len(handed) :]:
            self._stop_poll(dep.key)
        return handed

    def _hot_slots(self) -> int:
        others = sum(1 for key in self._polls if key not in self._hot)
        return max(0, self._settings.blocking_slots - others)

    def _trim_hot(self) -> None:
        """Stop the least recently changed hot keys beyond the slots. Counted once: a stopped
        query keeps its slot until it has ended (it drains), so a count taken after each stop
        would find the same excess again and stop every hot key."""
        for _ in range(len(self._hot) - self._hot_slots()):
            key, _ = self._hot.popitem(last=False)
            self._stop_poll(key)

    def promote(self, dep: Dependency) -> None:
        """A swept service changed: give it a blocking query of its own (least recently changed out)."""
        if not self.budgeted or not isinstance(dep, HealthService) or dep.key not in self._wanted:
            return
        if dep.key in self._hot:
            self._hot.move_to_end(dep.key)
            return
        if len(self._hot) >= self._hot_slots():
            if self._hot:  # make room for the next one; this change is covered by the read that found it
                key, _ = self._hot.popitem(last=False)
                self._stop_poll(key)
            return
        self._hot[dep.key] = None
        self.counters.promotions += 1
        self._start_poll(dep, self._store.state(dep.key).index)

    def swept(self) -> list[HealthService]:
        """The services followed through the triggers and sweeps (no blocking query of their own)."""
        return [
            dep
            for key, dep in self._wanted.items()
            if isinstance(dep, HealthService) and (key not in self._polls or key in self._draining)
        ]

    def wanted(self) -> list[Dependency]:
        """Every dependency followed, in the order asked for."""
        return list(self._wanted.values())

    async def stop(self) -> None:
        tasks = [*self._polls.values(), *self._cancelled, *self._sweeper.tasks(), *self.fetcher.tasks()]
        self._polls.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._parser.close()

    # -- blocking queries ------------------------------------------------------------------------

    def _start_poll(self, dep: Dependency, index: int = 0) -> None:
        draining = dep.key in self._draining
        self._draining.discard(dep.key)
        task = self._polls.get(dep.key)
        if task is not None and draining and not self._store.get(dep.key)[0]:
            self._supersede(dep.key, task)
        if dep.key not in self._polls:
            self._polls[dep.key] = asyncio.create_task(self._run(dep, index), name=f"watch {dep.key}")
            log.debug("watch started: %s", dep.key)

    def _polls_own(self, key: str) -> bool:
        """`key` has a blocking query of its own that goes on (not a hot one, not one ending)."""
        return key in self._polls and key not in self._hot and key not in self._draining

    def _stop_poll(self, key: str, dropped: bool = False, cancel: bool = False) -> None:
        """Let a blocking query end by itself rather than cancel it: over HTTP/1.1 the agent
        notices a closed connection only when the query returns, so a cancelled query would keep
        holding one of the agent's `http_max_conns_per_client` slots for up to the whole wait;
        and a key still wanted (a hot service handed back to the sweeps) takes in what its last
        answer holds. Until then it still counts against our budget (it stays in `_polls`).
        `dropped`: nobody wants the key any more; over HTTP/2, where a held query is a stream the
        agent's limit does not count, it is reset at once rather than held for the rest of a wait
        that `block_wait` may make hours long. `cancel`: reset it anyway (see `_hand_over`)."""
        task = self._polls.get(key)
        if task is None:
            return
        if cancel or (dropped and self._settings.streams_per_connection > 1) or key in self._resting:
            del self._polls[key]
            self._draining.discard(key)
            self._resting.discard(key)
            self._refusals.pop(key, None)
            if key not in self._wanted:  # a key still wanted keeps its failure until it is read again
                self._store.recovered(key)  # nobody asks for it: its failure is no news of Consul's
            task.cancel()
            self._cancelled.add(task)  # `stop` still waits for it
            task.add_done_callback(self._cancelled.discard)
            return
        self._draining.add(key)

    def _supersede(self, key: str, task: asyncio.Task[None]) -> None:
        """A key wanted again while its query drains, its data forgotten when it was dropped: a new
        poll reads it at once (index 0), and the old query ends by itself when it answers (it is no
        longer the key's poll; an answer it brings is taken in, as the key is wanted). Found in an
        attacker's re-review (/tmp/rev20): the old poll went on from its old index, Consul answered
        "unchanged" at the end of each wait, and the key never had data again, so its template
        never rendered again until the service changed."""
        del self._polls[key]
        self._cancelled.add(task)  # not cancelled (see `_stop_poll`): `stop` still waits for it
        task.add_done_callback(self._cancelled.discard)

    def _finished(self, key: str, task: asyncio.Task[None] | None) -> None:
        """The poll `task` of `key` ended; a newer poll of the same key (one started after this one
        was reset) is not touched."""
        if task is not None and self._polls.get(key) is task:
            self._draining.discard(key)
            self._resting.discard(key)
            self._refusals.pop(key, None)
            del self._polls[key]

    async def _run(self, dep: Dependency, index: int) -> None:
        try:
            await self._poll(dep, index)
        except Abandoned:
            log.debug("watch %s stopped while its query failed", dep.key)
            if self._polls.get(dep.key) in (None, asyncio.current_task()):  # no newer poll asks it
                self._store.recovered(dep.key)  # nobody wants it (see `_retrying`): no news of Consul's
        finally:
            self._finished(dep.key, asyncio.current_task())

    def _going_on(self, key: str) -> bool:
        """The calling poll is still `key`'s and not told to stop (see `_stop_poll`)."""
        return self._polls.get(key) is asyncio.current_task() and key not in self._draining

    def _retrying(self, key: str) -> bool:
        """Whether the calling poll asks its failing query again: it goes on, or it ends but its key is
        still wanted (a hot service handed back to the sweeps), whose failure only an answer may
        end (helper-117, /tmp/rev64: cleared at once, the failing count read 0 in an outage, and
        the sweeps may not read the key for minutes). A poll superseded by a newer one stops."""
        return self._polls.get(key) is asyncio.current_task() and (key not in self._draining or key in self._wanted)

    async def _poll(self, dep: Dependency, index: int) -> None:
        ever_succeeded = index > 0
        body: str | None = None  # the last answer's body: the same body again is not decoded
        # Its own entry, not stopped: a poll reset (see `_stop_poll`) that missed its cancel (an
        # answer that came in the same tick) must not go on next to the key's newer poll.
        early = 0.0  # the pause after answers that came at once without a change (see EARLY_ANSWER_PAUSE_S)
        plain = False  # the next call a plain read, compared with `index` (see below)
        while self._going_on(dep.key):
            asked, previous = time.monotonic(), index
            index, body, same, held_same = await self._ask(dep, index, ever_succeeded, body, plain)
            ever_succeeded = True
            took = time.monotonic() - asked
            quick = took < EARLY_ANSWER_S
            # Held, and back before its wait ran out at the very index it was held from: Consul
            # abandoned its state. A snapshot restored answers every held query with the old state at
            # the old index, and a query held from there again waits the whole wait (up to 10 minutes
            # over HTTP/2) while the restored state's index is lower (helper-114 on 1.8.7,
            # /tmp/rev61). The next call is a plain read, compared with that index: an index gone
            # backwards is seen at once (`_next_index`, `Sweeper.triggered`). An agent whose
            # `max_query_time` is under our wait costs one such read per wait.
            plain = held_same and took < self._settings.block_wait_s
            same = same and dep not in TRIGGERS  # a trigger's moved index is its news, body or not
            if previous > 0 and quick and (index <= previous or same):
                most = self._settings.backoff_max_s if index <= previous else SAME_ANSWER_PAUSE_MAX_S
                early = min(max(early * 2, EARLY_ANSWER_PAUSE_S), most)
                await asyncio.sleep(early)
            elif previous > 0:  # a plain read (index 0, e.g. after the index went backwards) keeps it
                early = 0.0
            # Two calls for one key start `min_gap_s` (plus jitter) apart: an answer that comes at
            # once waits, but after a query that was held the next goes out a tick later, so the
            # key's next change finds it held. Counted from the answer, a change soon after another
            # on the same service waited for the pause and the loop's render (~10 ms under the
            # bench's load). The tick lets the loop take this answer first: asking again costs ~2 ms
            # under load, which then overlaps the Runtime API commands instead of preceding the render.
            # A trigger's own pace (the nodes'), not a template's: one reading `nodes()` gets its
            # changes as before, and pays for them (helper-112).
            own = dep.min_gap_s if dep.key not in self._wanted else 0.0
            gap = max(self._settings.min_gap_s, own)
            pause = asked + gap + random.uniform(0, gap) - time.monotonic()
            await asyncio.sleep(max(pause, REASK_TICK_S))

    async def _ask(
        self, dep: Dependency, index: int, ever_succeeded: bool, body: str | None, plain: bool = False
    ) -> tuple[int, str | None, bool, bool]:
        """One call for `dep` (blocking from `index`, or a plain read when `plain`) and what its
        answer tells, compared with `index`; the index and body to ask with next, whether the
        answer was the same as the last (`unchanged`), and whether it came from a query held from
        that index with that index (its wait ran out, or Consul abandoned its state: see `_poll`).
        The answer itself ends with this call: its parsed JSON (~32 KB a service at 10 instances)
        must not live through the next held query (measured at 1,000 over HTTP/2: 34 MB of RSS)."""
        try:
            retrying = functools.partial(self._retrying, dep.key)
            result = await self.fetcher.fetch(dep, 0 if plain else index, ever_succeeded, body, retrying)
        except KeyRefused as refused:
            await self._rest(dep, refused)
            return refused.index, None, False, False  # too large: blocks from its index, asked again once it moves
        self._refusals.pop(dep.key, None)
        self._fits(dep.key)  # a trigger's too: it is in no store
        held_same = 0 < result.held_from == result.index
        if self._untaken(dep):
            return index, None, False, held_same
        previous, index = index, _next_index(dep, index, result)
        if result.unchanged:
            if self.wants(dep.key):
                self._store.state(dep.key).index = result.index  # same data, at a newer index
        elif not await self.absorb(dep, result):
            if self._untaken(dep):
                return previous, None, False, held_same
            if self._store.keys.get(dep.key, _NO_STATE).index > result.index:
                result = replace(result, body=None)  # dropped for a newer answer: its body is no "same as last"
        if result.index != previous and isinstance(dep, CatalogServices):
            self._sweeper.triggered(dep, previous, None, result.index)
        elif result.index != previous and dep in TRIGGERS and not result.unchanged:
            facts = await self._trigger_facts(dep, result) if self.budgeted else None  # not used otherwise
            self._sweeper.triggered(dep, previous, facts, result.index)
        return index, result.body, result.unchanged, held_same

    def _untaken(self, dep: Dependency) -> bool:
        """Whether an answer for `dep` came while nobody wanted the key (its query drains, see
        `_stop_poll`), so it was not taken in: the key's next query, if it is wanted again by
        then, asks from the index before that answer. Found in an attacker's re-review: a service
        redeployed (its last instance gone, back 1.5 s later) answered its held query a moment before
        the catalog answer that made the templates want it again; the query after it blocked past that
        answer, and the service was served only when its 60 s wait ran out."""
        return dep not in TRIGGERS and not self.wants(dep.key)

    async def _rest(self, dep: Dependency, refused: KeyRefused) -> None:
        """Serve a key Consul refuses to be asked about (see `refuse`), then wait before asking
        again: 1 s, doubled at each refusal in a row, at most REFUSED_REASK_MAX_S. No query is held
        meanwhile, so a stop cancels the pause at once."""
        self.refuse(dep, refused.error)
        if dep.key in self._draining:
            return  # the poll ends now: no pause holding its place in the budget
        count = self._refusals[dep.key] = self._refusals.get(dep.key, 0) + 1
        self._resting.add(dep.key)
        try:
            await asyncio.sleep(min(REFUSED_REASK_MAX_S, 2.0 ** (count - 1)))
        finally:
            self._resting.discard(dep.key)

    def refuse(self, dep: Dependency, error: ConsulError) -> None:
        """Consul refuses to be asked about `dep` as it is named (Fetcher.refused_for_its_name: a
        service name with a character it will not take in a path, a name too long): its answer
        will not come, and a key without data holds every render of its template. So it is served
        as Consul serves a name it does not know (no instances, no value), said once."""
        if isinstance(error, TooLarge):
            if dep.key in self._wanted or dep in TRIGGERS:
                self._too_large(dep, error)
            return
        if dep.key not in self._wanted or self._store.answered(dep.key):
            return  # not wanted, or another read took an answer in meanwhile: never overwritten
        if self._store.refuse(dep.key, dep.parse(None), refusal_reason(error)):
            log.warning(
                "watch %s: Consul refuses to be asked about it (%s); served as having no data (no instances, "
                "no value), asked again every %g s at most",
                shown(dep.key, KEY_SHOWN), error, REFUSED_REASK_MAX_S,
            )  # fmt: skip

    def _too_large(self, dep: Dependency, error: TooLarge) -> None:
        """Consul answered `dep` over max_answer_bytes (one registrant can make a service's answer,
        the catalog's or the critical checks' that large). Before, the key was retried as a failure
        forever: its template never rendered again, the renderer said Consul was down, and the
        answer was downloaded again after every backoff. Now a key with an answer keeps it; one
        named by data (a service, a KV path) without one is served as having no data, as a name
        Consul refuses is; the catalog and the health triggers have no such empty value, so they
        wait for an answer (a trigger that cannot be read makes the sweeps frequent: see
        Sweeper.blind). Reported with the refusals either way, asked again once its index moves
        (and no sooner than `_rest` allows), never counted as Consul failing."""
        known = self._store.keys.get(dep.key)
        if known is not None and known.has_data and 0 < error.index < known.index:
            return  # older than the answer served (a sweep's read overtaken by a newer one): nothing to say
        self._store.recovered(dep.key)  # Consul answers: not an outage
        self._pause_oversize(dep.key)
        why = str(error)[:500]  # its path is quoted: a name in it forges no line
        if self._store.answered(dep.key):
            if self._store.keep_oversize(dep.key, why + "; its last answer is served"):
                log.warning("watch %s: %s; its last answer is served", shown(dep.key, KEY_SHOWN), why)
        elif dep.named_by_data:
            if self._store.refuse(dep.key, dep.parse(None), why + "; served as having no data"):
                log.warning("watch %s: %s; served as having no data", shown(dep.key, KEY_SHOWN), why)
        elif self._store.keep_oversize(dep.key, why + "; waiting for an answer that fits"):
            log.warning("watch %s: %s; waiting for an answer that fits", shown(dep.key, KEY_SHOWN), why)
        state = self._store.state(dep.key)
        if state.has_data and error.index > state.index:
            state.index = error.index  # what is served stands for that index: a sweep reads it again once it moves
        if dep in TRIGGERS or isinstance(dep, CatalogServices):
            self._sweeper.blind(dep.key)

    async def _trigger_facts(self, dep: Dependency, result: QueryResult) -> frozenset[tuple[str, ...]] | None:
        """`_facts` of a trigger's answer: a long one (many critical checks, long outputs, many
        nodes) decoded and parsed on the parse thread, as a service's is."""
        if len(result.body or "") < PARSE_AWAY_CHARS:
            return _facts(dep, result)
        try:
            facts: frozenset[tuple[str, ...]] | None = await self._parser.run(lambda: _facts(dep, result))
        except Exception:  # the thread's failure: read as unknown, as `_facts` reads any shape
            return None
        return facts

    def _pause_oversize(self, key: str) -> None:
        """Pause full reads of `key` after a too-large answer: 1 s, doubled at each such answer in a
        row, REFUSED_REASK_MAX_S at most. An answer that comes while the pause runs extends nothing:
        it was asked before the pause began (reads of one key by a located change, the safety sweep
        and a re-read overlap under load). Before, six such answers landing together made the
        pause a minute, and a service that fitted again waited that long to be read (a CI run)."""
        now = time.monotonic()
        until, count = self._oversize_reads.get(key, (0.0, 0))
        if now < until:
            return
        self._oversize_reads[key] = (now + min(REFUSED_REASK_MAX_S, 2.0**count), count + 1)

    def read_pause(self, key: str) -> float:
        """How long before a sweep may read `key` in full (0: now): not while a too-large answer's
        pause runs (1 s, doubling at each in a row, a minute at most, as `_rest` paces the key's
        own query). Before, a swept service made too large was read whole at every change (2
        reads per write, each up to max_answer_bytes)."""
        pause = self._oversize_reads.get(key)
        return 0.0 if pause is None else max(0.0, pause[0] - time.monotonic())

    def _fits(self, key: str) -> None:
        """`key` was answered within max_answer_bytes: no pause, and no report of a larger answer."""
        if self._oversize_reads.pop(key, None) is not None:
            self._store.oversize.pop(key, None)

    async def absorb(self, dep: Dependency, result: QueryResult, seen: Seen | None = None) -> bool:
        """Put an answer into the store (templates' keys only); True when the value changed.

        A long answer is parsed on the parse thread (see PARSE_AWAY_CHARS) while the loop goes on,
        so another read may put an answer for the key meanwhile: the one at the lower index is then
        dropped, this one included. `seen`: the key as the caller's read found it when it began (the
        sweeper's), which counts as "meanwhile" too."""
        if dep.key not in self._wanted:
            return False
        before = seen if seen is not None else self._store.seen(dep.key)
        try:
            value = await self._parse(dep, result)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # any shape at all: one key's answer must never end its watch
            if dep.key not in self._wanted:
                return False  # dropped meanwhile: nothing to keep, nothing to report
            # Data of a shape we do not understand: keep the last good value, report, go on.
            self._store.record_error(dep.key, f"unexpected answer for {dep.key}: {err!r}")
            shown_key = shown(dep.key, KEY_SHOWN)
            log.error("watch %s: unexpected answer from Consul, keeping the last data: %r", shown_key, err)
            return False
        if value is _DROPPED or dep.key not in self._wanted:
            return False  # dropped while it was parsed
        if self._store.overtaken(dep.key, before, result.index):
            log.debug("%s: another read took an answer in; this one (index %d) dropped", dep.key, result.index)
            return False
        changed = self._store.put(dep.key, value, result.index, before.epoch)  # equal data signals nothing
        self._fits(dep.key)
        if changed:
            log.debug("watch %s: new data at index %d", dep.key, result.index)
            if isinstance(dep, HealthService):
                self._claimed(dep, value)
        if dep.key in self._hot and changed:
            self._hot.move_to_end(dep.key)
        return changed

    def _claimed(self, dep: HealthService, instances: tuple[ServiceInstance, ...]) -> None:
        """`dep`'s answer now holds `instances`: read again whole the services whose answers hold one
        of them under another name, written before (Consul left their index as it was: claims.py)."""
        stale = self._claims.update(dep.key, dep.name, instances)
        deps = [other for key in stale if isinstance(other := self._wanted.get(key), HealthService)]
        if deps:
            log.info(
                "watch: %s hold an instance registered again under another name; reading them again",
                ", ".join(shown(other.key, KEY_SHOWN) for other in deps),
            )
            self._sweeper.read_whole(deps)

    async def _parse(self, dep: Dependency, result: QueryResult) -> Any:
        """`dep.parse` of the answer: at once, or on the parse thread when it is long (_DROPPED when
        the key was dropped before its turn there: a parse of 23 s for nobody)."""
        if len(result.body or "") < PARSE_AWAY_CHARS:
            return dep.parse(result.decoded())

        def parse() -> Any:  # on the thread: the set of keys is read as it is then
            return dep.parse(result.decoded()) if dep.key in self._wanted else _DROPPED

        return await self._parser.run(parse)

    @property
    def settings(self) -> WatchSettings:
        return self._settings

    @property
    def store(self) -> Store:
        return self._store


def _facts(dep: Dependency, result: QueryResult) -> frozenset[tuple[str, ...]] | None:
    """What a trigger's answer tells: a health state's checks, as (node, check id, service name,
    status); the nodes' addresses, as (node, address), read alone (the whole parse, meta and all,
    took 107 ms at 5,000 nodes, these two fields 23: helper-111). None for the catalog's list of
    names, or for an answer of unknown shape."""
    try:
        if isinstance(dep, HealthState):
            return dep.parse(result.decoded())
        if isinstance(dep, CatalogNodes):
            return frozenset((str(node["Node"]), str(node.get("Address") or "")) for node in result.decoded())
    except Exception:  # an answer of any shape: read as unknown, never the end of the trigger's watch
        return None
    return None


def _next_index(dep: Dependency, previous: int, result: QueryResult) -> int:
    if result.index <= 0:
        # No index (or 0) would make the next query return at once, and the one after: block from
        # the last one (at least 1) instead, as Consul's guidance for clients says.
        return max(previous, 1)
    if result.index < previous:
        log.warning(
            "Consul index went backwards for %s (%d → %d): Consul restarted or restored; re-reading",
            dep.key,
            previous,
            result.index,
        )
        return 0
    return result.index
