"""Budgeted mode: following services through catalog-wide triggers instead of one query each.

The Watcher (watch.py) holds four triggers as blocking queries: the health states `critical`
and `warning`, whose difference names the services (or nodes) whose health moved, re-read at
once; `/v1/catalog/nodes`, whose nodes with a new address name the services served at it; and
`/v1/catalog/services`, whose index moves on every registration change anywhere. A move of the
catalog is resolved in the cheapest way that stays exact: *explained* when a followed service's
own answer shows that very write (see `explains`); *located* when the agent's service
summaries (summary.py) name services that, read at once, explain it; otherwise a *sweep* probes
every swept service's own index (an empty-bodied filtered query) and reads the instances only
where it moved. After an explained or located move, a background safety sweep follows within
SAFETY_SWEEP_DELAY_S, since the catalog's index names only the latest change. The safety sweep
runs in a task of its own: a move that comes meanwhile is explained or located at once, not after
it (at 1,000 services it takes ~1.6 s, and a cold change waited for it to reach its service). A
move that needs a full sweep stops it (the full sweep covers what it would). A full sweep runs in
a task of its own too, leaving two of its connections to the reads of moves located meanwhile;
while it runs no move counts as explained (its own reads carry the newest indexes). Sweeps pause
while the loop renders and applies a change (`Watcher.pause_sweeps`).

The safety sweep probes through the agent's cache (`?cached`, background refresh): the agent
keeps each probed service's entry current with a blocking query of its own to the servers (what
HTTP/2 does for every key, from the renderer). A probe then costs the servers no request, and a
change costs them one wake-up per load balancer whose agent caches that service, instead of one
probe per service per load balancer (the lab: `python -m lab.cost --plain-http`). The price: the
agent holds one query per probed service, re-asked at least every 10 minutes, for up to 3 days
after the last probe. A cached answer is a stale read (any server), current within that query's
round trip (~1 ms on loopback) while the servers answer: the safety sweep checks on a change
seconds old, so it may; an answer the cache could not refresh (`Age` > 0) is asked of the
servers. A follower cut off from the leader but reachable can keep an entry behind with nothing
to show it: the reconcile sweep, the safety net, asks the servers, as does a full sweep (a move
nothing explains, a failed read, the start), which must see a change milliseconds old.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Coroutine, Iterable, Sequence
from enum import StrEnum
from typing import Any, Protocol

from renderer.errors import ConsulError
from renderer.source.batch import BatchReader
from renderer.source.client import ConsulRequestError, QueryResult, TooLarge
from renderer.source.dependency import CatalogNodes, CatalogServices, Dependency, HealthService, HealthState
from renderer.source.fetch import Fetcher, refused_for_form
from renderer.source.store import Seen, Store, WatchCounters, WatchSettings
from renderer.source.summary import ServiceSummaries

# The catalog-wide blocking queries budgeted mode follows the services through (see above).
TRIGGERS = (CatalogServices(), CatalogNodes(), HealthState("critical"), HealthState("warning"))


class SweepHost(Protocol):
    """What the sweeper needs of the watcher (watch.py implements it); no import between the two."""

    reader: BatchReader
    counters: WatchCounters

    @property
    def settings(self) -> WatchSettings: ...
    @property
    def store(self) -> Store: ...
    @property
    def budgeted(self) -> bool: ...
    def swept(self) -> list[HealthService]: ...
    def wanted(self) -> list[Dependency]: ...
    def wants(self, key: str) -> bool: ...
    def read_pause(self, key: str) -> float: ...
    async def absorb(self, dep: Dependency, result: QueryResult, seen: Seen | None = None) -> bool: ...
    def refuse(self, dep: Dependency, error: ConsulError) -> None: ...
    def promote(self, dep: Dependency) -> None: ...
    async def sweep_turn(self) -> None: ...


log = logging.getLogger(__name__)


class Due(StrEnum):
    """Which sweep is due, as its log line names it."""

    FULL = "sweep"  # a move nothing explains, a failed read, the start: asks the servers
    SAFETY = "safety sweep"  # after an explained or located move: from the agent's cache, paced
    RECONCILE = "reconcile sweep"  # every `reconcile_interval`, the safety net: asks the servers


SWEEP_DELAY_S = 0.01  # between a catalog-wide trigger and deciding (a hot service's own answer may explain it)
FULL_RUNNING_POLL_S = 0.05  # while a full sweep runs: how often to look for its end
SAFETY_SWEEP_DELAY_S = 5.0  # a catalog move already explained: the sweep that makes sure comes this late
OWN_ANSWER_WAIT_S = 0.5  # the summaries name only followed services: how long their own answers may take
OWN_ANSWER_POLL_S = 0.01
BACKGROUND_SWEEP_CONNECTIONS = 4  # … on this many connections
FULL_SWEEP_FREE_CONNECTIONS = 2  # of the sweep's connections, left to located reads while a full sweep runs
# A full sweep starts at least this long after the last sweep that asked the servers ended:
# FULL_SWEEP_GAP_FACTOR × its duration, FULL_SWEEP_GAP_MIN_S at least. A registrant changing a service
# of its own every 50 ms (a move the summaries cannot pin on followed services alone) had each load
# balancer sweep back to back (2,600 requests a second at 200 services); now at most a third of the
# time. Meanwhile moves are still explained or located at once, and the sweep covers the rest.
FULL_SWEEP_GAP_FACTOR = 2.0
FULL_SWEEP_GAP_MIN_S = 1.0
# Services read once the triggers asked anew have answered wait at most this long for them: one that
# has not answered by then (a refusal, a pool still full of ending queries) gets them read then, and
# again once it has. Their first answers are plain reads: milliseconds at 1,000 services × 10.
BASELINES_WAIT_S = 1.0
# The catalog trigger may show several moves before a decision; each must be explained, not only the
# latest (see `Sweeper._earlier_unexplained`). More than this are not kept (see `Sweeper._show`).
SHOWN_MOVES_MAX = 16
# A decision whose latest move is explained but an earlier one is not reads the summaries at most this
# often: a hot service written faster than its query asks again (its answers skip writes) would
# otherwise cost a summaries read at each decision (~530 KB at 1,000 services). Paced out, the
# earlier moves wait for the next decision or this pace, whichever comes first.
EARLIER_LOCATE_GAP_S = 0.25
# An earlier move the summaries do not name brings the safety sweep forward, at most this often (its
# probes ask the agent's cache: nothing of the servers).
SAFETY_SOON_GAP_S = 1.0


class Sweeper:
    """Budgeted mode: re-reads swept services after a trigger, and all of them on a sweep."""

    def __init__(self, watcher: SweepHost, fetcher: Fetcher) -> None:
        self._watcher = watcher
        self._fetcher = fetcher
        self._health: dict[str, frozenset[tuple[str, ...]]] = {}
        # node name without case → (node name, address), from the nodes trigger's last answer
        self._addresses: dict[str, tuple[str, str]] | None = None
        self._nodes_answer: frozenset[tuple[str, ...]] | None = None  # its latest answer, compared at its pace
        self._nodes_task: asyncio.Task[None] | None = None  # … by this task, while it waits or compares
        self._nodes_compared_at = -CatalogNodes.min_gap_s  # (monotonic) the last comparison
        self._queued: dict[str, object] = {}  # key → the `read` task whose read of it is not sent yet
        self._sweep_wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._safety: asyncio.Task[None] | None = None  # the background safety sweep, while it runs
        self._full: asyncio.Task[None] | None = None  # a full (or reconcile) sweep, while it runs
        self._safety_again = False  # another safety sweep became due while one ran
        self._reads: set[asyncio.Task[None]] = set()
        self._failed_at: float | None = None
        self._catalog_index = 0  # the catalog trigger's latest index
        self._shown: set[int] = set()  # … and every index it showed since the last decision
        self._earlier_free_at = 0.0  # (monotonic) the next locate for an earlier move alone, not before
        self._carried: set[int] = set()  # earlier moves unexplained, their locate paced out (see `_decide`)
        self._soon_free_at = 0.0  # (monotonic) no safety sweep brought forward before this
        self._safety_later: float | None = None  # (monotonic) the regular safety sweep an early one came before
        self._overflow = False  # more moves were shown than `_shown` keeps (see `_decide`)
        self._urgent = False  # a sweep failed, or a targeted read did: the next one is due (at its pace)
        self._pace = asyncio.Semaphore(BACKGROUND_SWEEP_CONNECTIONS)
        self._full_pace = asyncio.Semaphore(
            max(1, watcher.settings.sweep_connections - FULL_SWEEP_FREE_CONNECTIONS)
        )  # fmt: skip
        self._summaries = ServiceSummaries()
        self._full_free_at = 0.0  # (monotonic) no sweep that asks the servers before this
        self._full_due = False  # a full sweep is due, waiting out that pace
        self._servers_asked_at = time.monotonic()  # when the last sweep that asks the servers ended
        self._later: dict[str, float] = {}  # key → when its re-read after a too-large answer's pause wakes
        self._blind: set[str] = set()  # triggers that cannot be read (see `blind`)
        self._handed: dict[str, HealthService] = {}  # read again once every trigger in `_baselines` answered
        self._baselines: set[str] = set()  # triggers that have not answered since services were handed over
        self._whole: dict[str, bool] = {}  # key → asked again, while a `read_whole` of it runs
        self._lone_sweeps = 0  # reconcile sweeps while a trigger failed, lately (see `_reconcile_at`)
        self._trigger_failed_at = float("-inf")  # (monotonic) when a trigger was last seen failing

    def tasks(self) -> list[asyncio.Task[Any]]:
        running = [task for task in (self._task, self._safety, self._full) if task is not None]
        return [*running, *self._reads]

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run `work` in a task of its own, among the reads `tasks` gives (a stop ends them)."""
        task = asyncio.create_task(work, name=name)
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)
        return task

    def ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="watch sweeps")

    def triggered(
        self,
        trigger: Dependency,
        previous_index: int,
        value: frozenset[tuple[str, ...]] | None,
        value_index: int = 0,
    ) -> None:
        """A trigger's index moved (to `value_index`): re-read what it names, or sweep when it names
        nothing precise. `value`: what its answer tells (see `Watcher._trigger_facts`)."""
        self._blind.discard(trigger.key)  # it answers
        self._baseline_taken(trigger.key)
        if not self._watcher.budgeted:
            return
        if previous_index > 0:
            self._watcher.store.sign(value_index)  # what it tells of is timed from here (Store.sign)
        if isinstance(trigger, CatalogNodes):
            self._compare_nodes(value)
            return
        if isinstance(trigger, HealthState):
            before = self._health.get(trigger.state)
            self._health[trigger.state] = value if value is not None else frozenset()
            if before is None or value is None:
                return  # the first answer is the baseline (the initial sweep reads everything)
            services, nodes = moved(before, value)
            names = services | services_on_nodes(self._watcher.store, self._watcher.swept(), nodes)
            targets = [dep for dep in self._watcher.swept() if dep.name in names]
            if targets:
                log.debug("health moved for %s: re-reading %d service(s)", shown(names), len(targets))
                self.read(targets)
        elif previous_index > 0:
            if value_index < previous_index:
                # Restored from a snapshot, or servers with a fresh data directory: anything may
                # differ, and an answer read before may hold an instance written at the new, lower
                # index by chance (`explains` would take the move as its own): a full sweep, whose
                # reads no answer asked before the restore may overtake (`Store.restored`).
                self._watcher.store.restored()
                self._urgent = True
            self._catalog_index = value_index
            self._show(value_index)
            self._sweep_wanted.set()

    def _compare_nodes(self, value: frozenset[tuple[str, ...]] | None) -> None:
        """Compare the nodes trigger's answer (`_readdressed`) at most once per `CatalogNodes.min_gap_s`,
        the latest answer when several came meanwhile. A template reading `nodes()` has the query
        answer at every node write, and each comparison scans every swept instance: one registrant
        writing its node's meta every 10 ms took 96% of a core at 2,000 services × 10, a port change
        served after 4-5 s (helper-113, /tmp/rev60)."""
        self._nodes_answer = value
        if self._nodes_task is None or self._nodes_task.done():
            self._nodes_task = self._spawn(self._compare_nodes_paced(), "watch node addresses")

    async def _compare_nodes_paced(self) -> None:
        await asyncio.sleep(max(0.0, self._nodes_compared_at + CatalogNodes.min_gap_s - time.monotonic()))
        self._nodes_compared_at = time.monotonic()
        self._readdressed(self._nodes_answer)

    def _readdressed(self, value: frozenset[tuple[str, ...]] | None) -> None:
        """The nodes trigger moved: re-read the swept services on the nodes whose address changed
        (an instance without an address of its own is served at its node's), or whose name did in
        case alone (Consul's node names are without case: `MOVER` registered at a new address
        renames and moves `mover`; helper-111), or that are gone. Nothing else tells of it: the
        catalog's list keeps its index and no check moves (checked on 1.8.7), and such a move waited
        for the reconcile sweep, 5 minutes (helper-110, /tmp/rev57). A node's meta or a new node
        names nothing here. An answer that cannot be read keeps the last baseline and makes a sweep
        due: what it held is not known."""
        if value is None:
            self._full_sweep_due()
            return
        before, self._addresses = self._addresses, {fact[0].lower(): (fact[0], fact[1]) for fact in value}
        if before is None:
            return  # the first answer is the baseline
        nodes = {node for node, now in self._addresses.items() if before.get(node, now) != now}
        # A name gone: the node left (its services go too: a read more each), or it was renamed in a
        # case that Go's ToLower folds (Consul's) and Python's lower() does not ('İ', 'ς': helper-113).
        nodes |= before.keys() - self._addresses.keys()
        swept = self._watcher.swept()
        names = self._served_elsewhere(swept, nodes)
        targets = [dep for dep in swept if dep.name in names]
        if targets:
            log.debug("node addresses moved for %s: re-reading %d service(s)", shown(nodes), len(targets))
            self.read(targets)

    def _served_elsewhere(self, swept: list[HealthService], moved: set[str]) -> set[str]:
        """Names of the swept services with an instance on a node of `moved` (names without case:
        its address changed since the answer before), or read with a node's name or address the
        last answer no longer has. Compared with the answer before alone, a node moved and back
        within one paced ask (`CatalogNodes.min_gap_s`) looked still, while a service read in
        between (its own check flip) kept the address between (helper-112, /tmp/rev59); an address
        given as none (not one HAProxy takes) is known by `moved` alone. One scan: ~2 ms at 1,000
        services × 10, at most about once a second."""
        addresses, names = self._addresses or {}, set()
        for dep in swept:
            _, instances = self._watcher.store.get(dep.key)
            for instance in instances or ():
                node = instance.node.lower()
                now = addresses.get(node)
                if node in moved or (
                    now is not None and instance.node_address and now != (instance.node, instance.node_address)
                ):
                    names.add(dep.name)
                    break
        return names

    def read_after_baselines(self, deps: list[HealthService], triggers: list[str]) -> None:
        """Read `deps` once each of `triggers` (asked anew) has answered, BASELINES_WAIT_S from now at
        the latest (and then again once they have): services the triggers follow from now on. A
        change made between a read and a trigger's first answer is in that answer, and no move of it
        tells of it: lost until the reconcile sweep (5 min). At a switch the services' reset queries
        were read at once and again after (helper-109, /tmp/rev56); at a start past the budget they
        were read at once only, and a change in that window was lost."""
        if not deps or not (triggers or self._baselines):
            self.read(deps)
            return
        self._handed.update((dep.key, dep) for dep in deps)
        if not triggers:
            # Services added while triggers asked before have not answered: read now (the wait
            # for them may be over), and again once they have (helper-114, /tmp/rev61).
            self.read(deps)
            return
        self._baselines.update(triggers)
        self._spawn(self._unless_baselines_late(), "watch reads after the baselines")

    async def _unless_baselines_late(self) -> None:
        await asyncio.sleep(BASELINES_WAIT_S)
        if self._baselines and self._handed:
            log.debug("triggers %s have not answered in %g s: reading the services now, and again once they have",
                      shown(self._baselines), BASELINES_WAIT_S)  # fmt: skip
            self.read([dep for key, dep in self._handed.items() if self._watcher.wants(key)])

    def _baseline_taken(self, key: str) -> None:
        self._baselines.discard(key)
        if not self._baselines and self._handed:
            handed, self._handed = self._handed, {}
            self.read([dep for key, dep in handed.items() if self._watcher.wants(key)])

    def blind(self, key: str) -> None:
        """A trigger (`key`) cannot be read (its answer is over max_answer_bytes): the moves it
        tells of go unseen, so a sweep asks the servers now and then every `backoff_max_s`, not
        every `reconcile_interval`, until it answers again (`triggered`). Before, a critical check
        with a huge output hid every health change of the swept services for up to 5 minutes."""
        if key not in self._blind:
            self._blind.add(key)
            self._full_sweep_due()
        self._baseline_taken(key)  # none to wait for: the sweep covers what it would tell

    def _read_after(self, dep: HealthService, pause: float) -> None:
        """Read `dep` again once its pause is over (one such read per key at a time). A review:
        skipped for its pause and then never read, a service that shrank back meanwhile waited
        for an unrelated move or the reconcile sweep (5 minutes)."""
        wake = time.monotonic() + pause + 0.01
        if self._later.get(dep.key, float("inf")) <= wake:
            return  # one wakes by then already
        self._later[dep.key] = wake  # an earlier wake than a pending one (a shorter pause): its own task

        async def later() -> None:
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            if self._later.get(dep.key) == wake:
                del self._later[dep.key]
            if self._watcher.wants(dep.key) and await self._guarded([dep]):
                self._full_sweep_due()  # failed: the sweep (with its backoff) covers it

        self._spawn(later(), "watch re-read after a pause")

    def read(self, deps: list[HealthService]) -> None:
        """Re-read these services now, within the sweep's connections. One whose read asked before
        is not sent yet is not asked again: that read, still to go, covers this. Each ask made a
        read of its own before: a node's address (or a node check) flipped every 10 ms, with 200
        services on it, left ~1,950 reads waiting and another service's change not served within
        31 s (helper-111, /tmp/rev58); now at most one waits per service."""
        token = object()
        asked = [dep for dep in deps if self._queued.setdefault(dep.key, token) is token]
        if not asked:
            return
        self._spawn(self._read_or_sweep(asked, token), "watch re-read")

    def read_whole(self, deps: list[HealthService]) -> None:
        """Read these services whole now (no probe: their index may not have moved, see claims.py),
        and again after a back-off while that fails: in precise mode no sweep would. One read at a
        time per service: one asked while it runs makes it read once more when done. A loop per
        ask piled up while reads failed: 50 asks, 50 loops, 249 failed reads in 5 s (helper-119,
        /tmp/rev66, `loops.py`)."""
        for dep in deps:
            if dep.key in self._whole:
                self._whole[dep.key] = True
                continue
            self._whole[dep.key] = False
            task = self._spawn(self._read_whole(dep), "watch whole re-read")
            # Let go when it ends, even cancelled before its first step (a `finally` would not run).
            task.add_done_callback(functools.partial(self._whole_done, dep.key))

    def _whole_done(self, key: str, _: asyncio.Task[None]) -> None:
        del self._whole[key]

    async def _read_whole(self, dep: HealthService) -> None:
        while self._watcher.wants(dep.key):
            self._whole[dep.key] = False  # an ask from now on is one more read
            if await self._guarded([dep], whole=True):
                await self._fetcher.back_off(self._watcher.settings.backoff_max_s)
            elif not self._whole[dep.key]:
                return

    async def _loop(self) -> None:
        while True:
            try:
                due = await self._next_sweep()
                if due is Due.SAFETY:
                    self._start_safety_sweep()
                else:
                    self._safety_later = None
                    await self._stop_safety_sweep()  # a full sweep covers what it would
                    self._full = asyncio.create_task(self._full_sweep(due), name=due.value)
            except Exception:  # a bug of ours or an answer of a shape we did not foresee: never a dead loop
                await self._recover()

    async def _full_sweep(self, due: Due) -> None:
        """A full (or reconcile) sweep, in a task of its own as the safety sweep is: a move that
        comes meanwhile is explained or located at once. It waited for the sweep's end before, and
        an attacker whose meta-only changes kept full sweeps running held a victim's new instance
        back for up to a sweep's length, 3.9-4.4 s at 2,000 services (/tmp/rev35)."""
        try:
            await self._sweep(due)
        except Exception:  # as in `_loop`: never a dead sweeper
            await self._recover()

    async def _recover(self) -> None:
        """After an unexpected error (logged here): a full sweep due again, after a backoff."""
        log.exception("a watch sweep failed unexpectedly; sweeping again after a backoff")
        await self._back_off()
        self._full_sweep_due()

    def _full_sweep_due(self) -> None:
        """A read or a sweep failed, or a trigger went blind: a full sweep is due (at its pace)."""
        self._urgent = True
        self._sweep_wanted.set()

    def _full_running(self) -> bool:
        return self._full is not None and not self._full.done()

    def _start_safety_sweep(self) -> None:
        """The safety sweep, in a task of its own (see the module's doc); one at a time: one that
        becomes due while another runs follows it."""
        if self._safety is not None and not self._safety.done():
            self._safety_again = True
            return
        self._safety = asyncio.create_task(self._safety_sweeps(), name="safety sweep")

    async def _safety_sweeps(self) -> None:
        while True:
            self._safety_again = False
            await self._sweep(Due.SAFETY)
            if not self._safety_again:
                return

    async def _stop_safety_sweep(self) -> None:
        task, self._safety_again = self._safety, False
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})  # done cancelling; a cancel of our own (a stop) still raises here
        self._safety = None

    async def _sweep(self, due: Due) -> None:
        """Every swept service, once; a failure makes a full sweep due at once (after a backoff)."""
        deps = self._watcher.swept()
        background = due is Due.SAFETY
        if not background:
            # This one asks the servers: it covers what was due (none: nothing is), earlier moves too.
            self._full_due, self._carried = False, set()
        if not deps:
            self._failed_at = None  # nothing to fail: the next failure backs off from the start
            if not background:  # nothing to ask: due again an interval later, not at every look
                self._servers_asked_at = time.monotonic()
            return
        self._watcher.counters.sweeps += 1
        if not background and self._summaries.usable:
            # The baseline the next move is compared with, taken before the probes: one taken after
            # them held a change made during the sweep after its service's probe, and the next move
            # (an attacker's change elsewhere, located and explaining the catalog's index) left it
            # unnamed until a later sweep, 7-9 s at 2,000 services (an attacker's review, /tmp/rev35).
            await self._summaries.read_changes(self._fetcher)
        started = time.monotonic()
        failed = await self._guarded(deps, due)
        took = time.monotonic() - started
        log.debug("%s of %d service(s) in %.0f ms", due.value, len(deps), took * 1000)
        if not background:
            self._full_free_at = time.monotonic() + max(FULL_SWEEP_GAP_MIN_S, FULL_SWEEP_GAP_FACTOR * took)
            self._servers_asked_at = time.monotonic()  # the reconcile's interval counts from here
        if failed:
            await self._back_off()
            self._full_sweep_due()  # until a sweep succeeds, nothing may be missed
            return
        self._failed_at = None

    async def _next_sweep(self) -> Due:
        """Wait until a sweep is due and say which.

        Due at once (after SWEEP_DELAY_S): a move of the catalog index that no followed service
        explains. A move that one does explain (its own answer shows that very write: it was the
        latest registration change, already taken in) makes a safety sweep due after
        SAFETY_SWEEP_DELAY_S, in case another service changed in the same few milliseconds; the
        moves that come meanwhile join it. Due too: `reconcile_interval` since the last sweep that
        asked the servers ended (not since this call: a located move every few minutes re-armed it
        and the reconcile never ran, an attacker's review, /tmp/rev36)."""
        # The regular safety sweep an early one came before (see below): it still comes.
        safety_at, self._safety_later = self._safety_later, None
        while True:
            self._forget_lone_sweeps()
            due = self._reconcile_at() if safety_at is None else min(safety_at, self._reconcile_at())
            # Looked at again at least this often: a trigger that begins failing brings it forward.
            due = min(due, time.monotonic() + self._watcher.settings.backoff_max_s)
            if self._full_running():
                # Nothing is due before it ends (it is the reconcile, and the safety sweep follows
                # it): look again then. A `safety_at` passed meanwhile made this loop spin (/tmp/rev36).
                due = time.monotonic() + FULL_RUNNING_POLL_S
            else:
                if self._full_due:
                    due = min(due, self._full_free_at)
                if self._carried or self._overflow:
                    due = min(due, self._earlier_free_at)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for returned the event's result when
                # the stop's cancel came in the same turns as a move, the cancel was lost and the
                # sweeper went on, `Watcher.stop` waiting for it for good (/tmp/rev36).
                async with asyncio.timeout(max(0.0, due - time.monotonic())):
                    await self._sweep_wanted.wait()
            except TimeoutError:
                now = time.monotonic()
                if self._full_running():
                    if not (self._carried and now >= self._earlier_free_at):
                        continue  # (moves the pace held back during a full sweep: decided once it allows)
                elif self._full_due and now >= self._full_free_at:
                    return Due.FULL
                elif now >= self._reconcile_at():  # read now: a full sweep may have ended meanwhile
                    self._lone_sweeps += self._trigger_failing()
                    return Due.RECONCILE
                elif safety_at is not None and now >= safety_at:
                    return Due.SAFETY
                elif not ((self._carried or self._overflow) and now >= self._earlier_free_at):
                    continue
            else:
                # A change to a service with its own blocking query arrives within milliseconds of the
                # trigger: let the loop apply it (and learn its index) before deciding.
                await asyncio.sleep(SWEEP_DELAY_S)
                self._sweep_wanted.clear()
            soon = await self._decide()
            now = time.monotonic()
            if self._full_due and not self._full_running() and now >= self._full_free_at:
                return Due.FULL
            # A full sweep waiting out its pace: the moves meanwhile are still explained or located.
            safety_at = safety_at or now + SAFETY_SWEEP_DELAY_S
            if soon:
                at = max(now, self._soon_free_at)
                if at < safety_at:
                    # The early sweep probes the agent's cache ms after the write, which a follower
                    # may not have applied yet: the regular one follows it (helper-123, /tmp/rev69:
                    # not served after 20 s, the reconcile being 5 min away; 4.5 s before 1de2249).
                    self._safety_later = max(self._safety_later or 0.0, safety_at)
                self._soon_free_at, safety_at = at + SAFETY_SOON_GAP_S, min(safety_at, at)

    def _show(self, index: int) -> None:
        """A move to judge at the next decision; past SHOWN_MOVES_MAX of them, only that there were
        more: the moves dropped cannot be judged (one explained by each kept hid a victim's after
        them, helper-123, /tmp/rev69), so the safety sweep is brought forward (`_decide`)."""
        if len(self._shown) < SHOWN_MOVES_MAX:
            self._shown.add(index)
        else:
            self._overflow = True

    async def _decide(self) -> bool:
        """Resolve the catalog's moves since the last decision: explained, located, or a full sweep
        due. True: an earlier move stays unexplained after its locate (the safety sweep comes sooner)."""
        counters = self._watcher.counters
        shown, self._shown = self._shown, set()
        carried, self._carried = self._carried, set()  # kept below only while the pace holds them back
        overflow, self._overflow = self._overflow, False
        if self._urgent:
            self._urgent, self._full_due = False, True
        elif self._full_running() or not explains(self._watcher.store, self._watcher.wanted(), self._catalog_index):
            # Not explained while a full sweep runs: its own reads carry the newest indexes, and a
            # move they explained hid another change made at the same moment (/tmp/rev35). A locate
            # names every service whose summary moved since the last read: the earlier moves too,
            # but for what summaries do not show (a port change shown before a write the summaries
            # name: ~5.2 s in 5 of 20 runs of helper-122's race once that write's service was swept).
            if self._full_running():
                # … at EARLIER_LOCATE_GAP_S at most: each move a registrant's writes showed during a
                # full sweep cost a summaries read (18.8 a second, ~314 KB each at 1,000 services,
                # helper-134, /tmp/rev80); the moves meanwhile are located together at the next.
                if time.monotonic() < self._earlier_free_at:
                    self._carried, self._overflow = shown | carried, self._overflow or overflow
                    return False
                self._earlier_free_at = time.monotonic() + EARLIER_LOCATE_GAP_S
            if await self._locate():
                counters.located += 1
                return not self._full_running() and (overflow or bool(self._earlier_unexplained(shown | carried)))
            self._full_due = True
        elif not (earlier := self._earlier_unexplained(shown | carried)) and not overflow:
            counters.explained += 1
        elif time.monotonic() < self._earlier_free_at:
            # Looked at again at the next decision, or once the pace allows.
            self._carried, self._overflow = earlier, self._overflow or overflow
            counters.explained += 1
        else:
            self._earlier_free_at = time.monotonic() + EARLIER_LOCATE_GAP_S
            log.debug(
                "catalog moved at %s, which no followed service's answer shows: locating", min(earlier, default="?")
            )
            if await self._locate(earlier) and not overflow:
                counters.located += 1
            else:
                # What the summaries do not show (an address, port or meta change): the safety
                # sweep, brought forward, not a full sweep (helper-122, /tmp/rev68: a port change
                # shown just before a hot service's write waited ~5.6 s, counted as located).
                counters.explained += 1
                return True
        return False

    def _earlier_unexplained(self, shown: set[int]) -> set[int]:
        """Those of the moves the catalog trigger showed before its latest (explained) one that no
        followed service's answers show. Only the latest was looked at before: a swept service's
        write the trigger showed, then a hot one's a few ms later, looked explained by the hot one's
        answer, and the swept one waited for the next move nothing explained or the safety sweep
        (helper-120, /tmp/inv20: `web` served after 670-760 ms in the bench's hostile part, `evil`
        flipping its tag every 100 ms beside it; up to ~5 s without such a storm). Two writes Consul
        folds into one answer of the trigger still show as one. Past SHOWN_MOVES_MAX moves (a storm
        of writes) the rest are not kept (`_show`). None counts while the summaries are off (a full
        sweep for each would cost the servers a probe per service: the safety sweep covers them)."""
        if not self._summaries.usable:
            return set()
        return self._unexplained({index for index in shown if index < self._catalog_index})

    def _reconcile_at(self) -> float:
        """When the reconcile is due: its interval after the last sweep that asked the servers;
        `backoff_max_s` while a trigger cannot be read (`blind`). While a trigger's query keeps
        failing and the cluster has a leader (a proxy's 5xx or a token refusing one endpoint), the
        moves it would tell of go unseen (a check gone critical waited for the 5-minute reconcile,
        helper-114, /tmp/rev61): `backoff_max_s`, then twice that at each reconcile, up to the
        interval, until no trigger has failed for the interval (`_forget_lone_sweeps`). Not a fixed
        `backoff_max_s`: 1,000 probes every 10 s for as long as it lasts, and in an outage a loop of
        failing sweeps (helper-115, /tmp/rev62, on 04f7fdd); nor in an outage (no leader, no
        answer), where each sweep only adds failed requests."""
        settings = self._watcher.settings
        interval = settings.reconcile_interval_s
        if self._blind:
            interval = settings.backoff_max_s
        elif self._trigger_failing():
            interval = min(interval, settings.backoff_max_s * 2.0 ** min(self._lone_sweeps, 30))
        return self._servers_asked_at + interval

    def _forget_lone_sweeps(self) -> None:
        """The reconcile's back-off (see `_reconcile_at`) starts again once no trigger has been
        seen failing for its interval: reset at a trigger's first answer, one that a proxy let
        through now and then kept the sweeps at every `backoff_max_s` (helper-119, /tmp/rev66,
        `flap_trigger.py`: 15 sweeps, 3,015 probes in 12 s at 200 services)."""
        now = time.monotonic()
        if self._trigger_failing():
            self._trigger_failed_at = now
        elif now - self._trigger_failed_at > self._watcher.settings.reconcile_interval_s:
            self._lone_sweeps = 0

    def _trigger_failing(self) -> bool:
        """A trigger's last query failed while the cluster has a leader (see `_reconcile_at`)."""
        failing = self._watcher.store.failing_keys
        return any(trigger.key in failing for trigger in TRIGGERS) and self._fetcher.leader_lately()

    async def _locate(self, earlier: set[int] | None = None) -> bool:
        """Name the services behind the catalog's latest move from the agent's service summaries
        and read them now; True when one of them explains the move (see summary.py). `earlier`:
        moves before the latest (explained already) to judge instead: True when each is explained
        after the reads (a hot service's own answer is not waited for: the safety sweep follows)."""
        summaries = self._summaries
        if not summaries.usable:
            return False
        # The move judged: one that comes during the reads is the next decision's (a hot service's
        # write made just after a swept one's port change explained it, and the port change waited
        # for the safety sweep: 5 of 20 runs of helper-122's race on a real agent, ~5.2 s).
        latest = self._catalog_index
        started = time.monotonic()
        names = await self._summaries.read_changes(self._fetcher)
        took_ms = (time.monotonic() - started) * 1000
        targets = [dep for dep in self._watcher.swept() if dep.name in (names or ())]
        if not targets:
            log.debug("catalog moved: the summaries (%.0f ms) name no swept service: %s", took_ms, shown(names or ()))
            if earlier is not None:
                return not self._unexplained(earlier)
            return bool(names) and await self._own_answers_explain(names or set(), latest)
        log.debug(
            "catalog moved for %s (summaries read in %.0f ms): re-reading %d service(s)",
            shown(names or ()), took_ms, len(targets),
        )  # fmt: skip
        # Read whole, not probed: the summaries name these for a change, and Consul 1.8.7 leaves a
        # service's index as it was when an instance of it is registered again under another name
        # (helper-118, /tmp/rev65): a probe saw the same index and the instance stayed served.
        failed = await self._guarded(targets, whole=True)
        if earlier is not None:
            return not failed and not self._unexplained(earlier)
        # While a full sweep runs, only the located reads may explain the move (see `_next_sweep`).
        explaining = targets if self._full_running() else self._watcher.wanted()
        return not failed and explains(self._watcher.store, explaining, latest)

    def _unexplained(self, indexes: set[int]) -> set[int]:
        return unexplained(self._watcher.store, self._watcher.wanted(), indexes)

    async def _own_answers_explain(self, names: set[str], index: int) -> bool:
        """The summaries name only services followed by their own blocking queries (hot ones): the
        move (at `index`) is theirs once one of their answers shows it, which under load can come a
        little after the summaries. Waits up to OWN_ANSWER_WAIT_S for it, or a newer move (True:
        the move is judged again with it, as an earlier one); False: not theirs (an address, port
        or meta change elsewhere moves no summary), a sweep must find it. Either way, without their
        answer they are read whole: an instance of theirs registered again under a name no template
        watches leaves their index as it was (Consul 1.8.7), so their queries are not woken, and
        they served it until their wait had run out twice (helper-119, /tmp/rev66: 29.6 s at a
        15 s wait, 20 min at the default 10)."""
        store = self._watcher.store
        own = [dep for dep in self._watcher.wanted() if isinstance(dep, HealthService) and dep.name in names]
        deadline = time.monotonic() + OWN_ANSWER_WAIT_S
        began = {dep.key: store.state(dep.key).index for dep in own}
        while own:
            if explains(store, own, index):
                log.debug("catalog moved for %s: their own queries have it", shown(names))
                return True
            newer = self._catalog_index != index
            if newer:
                self._show(index)  # judged again with the newer one, as an earlier move (`_decide`)
            if newer or time.monotonic() >= deadline:
                # After a newer move, only those whose queries have not answered meanwhile (a renamed
                # instance leaves the index as it was): a large hot service's lagging answer cost a
                # whole read at each move (helper-123, /tmp/rev69: +41% bytes a write at 1,500 instances).
                unmoved = [dep for dep in own if not newer or store.state(dep.key).index == began[dep.key]]
                log.debug("catalog moved for %s: their own queries do not show it; reading them whole", shown(names))
                self.read_whole(unmoved)
                return newer
            await asyncio.sleep(OWN_ANSWER_POLL_S)
        return False

    async def _read_or_sweep(self, deps: list[HealthService], token: object | None = None) -> None:
        try:
            if self._summaries.usable and self._summaries.last is None:
                # The baseline the first catalog move is compared with: without it, the first change
                # after start could not be located and cost a full sweep. Taken before the reads, so
                # that a change landing during them is named at the next move (see `_sweep`).
                await self._summaries.read_changes(self._fetcher)
            if await self._guarded(deps):
                self._full_sweep_due()  # a targeted read failed: the sweep (with its backoff) covers it
        finally:
            for dep in deps:  # any not sent (no longer wanted, a failure, a stop): asked anew next time
                if self._queued.get(dep.key) is token:
                    del self._queued[dep.key]

    async def _sending(self, key: str) -> None:
        """The gate of a read's first request, right before it is sent: a re-read of `key` asked
        from now on is one more (this one may have missed what it tells of)."""
        self._queued.pop(key, None)
        await self._watcher.sweep_turn()

    async def _guarded(self, deps: list[HealthService], due: Due | None = None, whole: bool = False) -> int:
        """`_read_all`, where even a bug of ours counts as failed reads (retried), never a dead sweep."""
        try:
            return await self._read_all(deps, due, whole)
        except Exception:
            log.exception("re-reading %d service(s) failed unexpectedly; retrying with the next sweep", len(deps))
            return len(deps)

    async def _back_off(self) -> None:
        settings = self._watcher.settings
        now = time.monotonic()
        self._failed_at = self._failed_at or now
        await self._fetcher.back_off(
            min(settings.backoff_max_s, max(settings.backoff_base_s, (now - self._failed_at) / 2))
        )

    async def _read_all(self, deps: list[HealthService], due: Due | None = None, whole: bool = False) -> int:
        """Refresh each service once (non-blocking, a few at a time); the number that failed.

        Each answer is taken in as it comes: a change found early in a sweep wakes the loop and is
        applied while the sweep goes on, instead of after the last of a thousand reads. `due`: the
        sweep these reads are (None: located or targeted reads). A safety sweep goes on fewer
        connections, so that it takes less of the CPU (ours and the agent's) from changes that
        arrive meanwhile, its probes from the agent's cache; a full one leaves
        FULL_SWEEP_FREE_CONNECTIONS of the sweep's connections to the reads of moves located
        meanwhile, which queued behind its thousands of probes before (/tmp/rev35). `whole`: each
        read whole, not probed first (see `_refresh`)."""
        watcher = self._watcher
        if due is None:
            refresh = functools.partial(self._refresh, whole=whole)
        elif due is Due.SAFETY:
            refresh = functools.partial(self._paced, self._pace, cached=True)
        else:
            refresh = functools.partial(self._paced, self._full_pace)
        outcomes = await asyncio.gather(*(refresh(dep) for dep in deps if watcher.wants(dep.key)))
        return outcomes.count(False)

    async def _paced(self, pace: asyncio.Semaphore, dep: HealthService, cached: bool = False) -> bool:
        async with pace:
            return await self._refresh(dep, cached)

    async def _refresh(self, dep: HealthService, cached: bool = False, whole: bool = False) -> bool:
        """Probe the service's index; read its instances only where it moved. False on failure.
        `cached`: the probe from the agent's cache (see the module's doc); `whole`: read them
        without a probe."""
        watcher, store = self._watcher, self._watcher.store
        # No gate of its own: its first request waits for the sweeps' turn (`_sending`). With a gate
        # here too, each read waited out two renders while holding one of the sweep's connections:
        # a safety sweep took 5.3 s on average beside a registrant's renders back to back, 2.9 s
        # without pauses (helper-134, /tmp/rev80). `seen` is then taken before that wait: an answer
        # another read takes in meanwhile is older than this one's, which replaces it.
        state, seen = store.state(dep.key), store.seen(dep.key)
        sending = functools.partial(self._sending, dep.key)
        probed = state.has_data and not whole  # its first request a probe, through `sending`
        if probed:
            path, params = dep.probe(cached)
            probe = await watcher.reader.get_one((path, params, 0), gate=sending)
            if isinstance(probe, ConsulRequestError):
                if not refused_for_form(probe):
                    return self._failed(dep, probe)
                # Refused for its form: the probe's filter, or the name? The full read below tells.
            else:
                too_stale = probe.last_contact_ms > watcher.settings.max_stale_s * 1000 > 0
                unrefreshed = cached and probe.age_s > 0  # the agent's cache lost the servers: ask them (or fail)
                if probe.index == state.index and not (too_stale or unrefreshed):
                    store.recovered(dep.key)
                    return True  # the service's own index did not move: same data
        pause = watcher.read_pause(dep.key)
        if pause > 0:
            self._read_after(dep, pause)  # its last answer was too large: read again once its pause is over
            return True
        path, params = dep.request()
        answer = await watcher.reader.get_one((path, params, 0), gate=watcher.sweep_turn if probed else sending)
        if isinstance(answer, TooLarge):
            self._watcher.refuse(dep, answer)  # kept, or served empty (Watcher._too_large): no failure
            return True
        if isinstance(answer, ConsulRequestError):
            if await self._fetcher.refused_for_its_name(dep, answer):
                self._watcher.refuse(dep, answer)  # served empty (see Watcher.refuse); asked again next sweep
                return True
            return self._failed(dep, answer)
        return await self._absorb(dep, answer, seen)

    def _failed(self, dep: HealthService, error: ConsulError) -> bool:
        """Record a failed read (the next sweep retries it); always False."""
        self._watcher.store.record_error(dep.key, str(error))
        self._fetcher.probe_recovery()
        log.debug("re-reading %s failed (the next sweep retries it): %s", dep.key, error)
        return False

    async def _absorb(self, dep: HealthService, result: QueryResult, seen: Seen) -> bool:
        """Take one answer in; False when it was too stale and the leader could not be asked.

        `seen`: the key as this read found it when it began. If another read or the
        service's own query took an answer in meanwhile (the safety sweep runs next to located
        reads), this one may be the older of the two (answered first, arrived last): it is
        dropped when that one's index is at least its own, never put over newer data (checked
        here, and again once a long answer is parsed: see Watcher.absorb). A newer one is taken:
        dropped too, the asks folded into it while it waited to be sent were lost (a node check
        flipping every 10 ms left 2-6 of 50 services stale until the reconcile; helper-112)."""
        watcher, store = self._watcher, self._watcher.store
        if result.last_contact_ms > watcher.settings.max_stale_s * 1000 > 0:
            path, params = dep.request()  # too stale: ask the leader, as the blocking queries do
            try:
                result = await self._fetcher.read(path, params)
            except ConsulError as err:
                return self._failed(dep, err)
        if store.overtaken(dep.key, seen, result.index):
            log.debug("%s: taken in by another read meanwhile; this answer (index %d) dropped", dep.key, result.index)
            return True
        had_data = store.state(dep.key).has_data
        if await watcher.absorb(dep, result, seen) and had_data:
            watcher.promote(dep)
        return True


def moved(before: frozenset[tuple[str, ...]], after: frozenset[tuple[str, ...]]) -> tuple[set[str], set[str]]:
    """(service names, nodes) whose checks entered or left a state between two answers.

    A check without a service is a node check: every service on that node is affected.
    """
    services: set[str] = set()
    nodes: set[str] = set()
    for node, _check, service, _status in before ^ after:
        if service:
            services.add(service)
        else:
            nodes.add(node)
    return services, nodes


def explains(store: Store, wanted: Sequence[Dependency], index: int) -> bool:
    """True when a followed service's answers show the write at `index`, a move of the catalog: the
    registration change that moved it is that service's, and is taken in already.

    Shown by the index one of its answers with data came at (its last, or one of the few before it:
    `KeyState.answers`), or by one of its instances whose registration Consul last wrote at `index`
    (its ModifyIndex): a new instance's first check result moves the answer's index past the
    catalog's within milliseconds, and the move, explained by nothing else, cost a full sweep that
    asks the servers (CI, ebdbc43). A check write leaves the ModifyIndex as it was, so a check flip
    explains no registration move.

    An answer without instances counts only where it emptied the service (`Store.put`): Consul
    1.8.7 answers a service without any at the index of the latest write that left any service
    without instances (helper-123, /tmp/rev69), so later empty answers tell nothing of this one; the
    one that emptied it carries its own write's index, unless another service lost its last
    instance within the milliseconds before that answer (taken as explained, that one waits for
    the safety sweep). One write that registered two services (a `/v1/txn`) is explained by
    either: the other is read by the safety sweep that follows every explained move
    (SAFETY_SWEEP_DELAY_S), as before this rule when the first's answer carried the index itself.
    A catalog index that went backwards explains nothing (`Sweeper.triggered` sweeps)."""
    return not unexplained(store, wanted, {index})


def unexplained(store: Store, wanted: Sequence[Dependency], indexes: Iterable[int]) -> set[int]:
    """Those of the catalog's moves at `indexes` that no followed service's answers show (the rule
    is `explains`'), in one pass over the services however many moves are judged: a decision judges
    up to SHOWN_MOVES_MAX of them, and a pass per move took 1.55 ms for 16 against 0.13 ms in one
    (1,000 services × 10 instances, /tmp/mb/explains.py; a single move costs about the same)."""
    judged = set(indexes)  # read twice below: not a generator's single pass (helper-124)
    left = {index for index in judged if index > 0}
    never = judged - left  # an index of 0 or less
    if not left:
        return never
    lowest = min(left)
    for dep in wanted:
        state = store.keys.get(dep.key)
        if state is None or state.index < lowest or not isinstance(dep, HealthService):
            continue  # most services: last answered before every move judged
        reached = {index for index in left if index <= state.index}  # moves its answers may show
        left -= reached.intersection(state.answers)
        if state.value and reached & left:
            left -= reached.intersection(instance.changed_at for instance in state.value)
        if not left:
            break
        lowest = min(left)
    return left | never


def services_on_nodes(store: Store, swept: list[HealthService], nodes: set[str]) -> set[str]:
    """Names of the swept services with an instance on one of `nodes` (as last read), node names
    compared without case, as Consul does."""
    names: set[str] = set()
    folded = {node.lower() for node in nodes}
    if not folded:
        return names
    for dep in swept:
        _, instances = store.get(dep.key)
        if any(instance.node.lower() in folded for instance in instances or ()):
            names.add(dep.name)
    return names


def shown(names: Iterable[str], most: int = 8) -> str:
    """Service names for a log line: quoted (a name from Consul cannot forge a line), the first few."""
    ordered = sorted(names)
    more = f" and {len(ordered) - most} more" if len(ordered) > most else ""
    return ", ".join(map(repr, ordered[:most])) + more
