"""The sweeper's safety sweep next to its other work, and cancellation on the way out.

Each case here was found by a review of the sweeper's concurrent safety sweep and reproduced
before it was mended: a stop that hung, a cancel swallowed, a check flip taken for an
explanation, an older answer put over a newer one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from renderer.source import sweep
from renderer.source.client import QueryResult
from renderer.source.dependency import CatalogServices, HealthService, HealthState
from renderer.source.stall import StallWatch
from renderer.source.store import Store, WatchCounters, WatchSettings


class Host:
    """The narrow SweepHost a Sweeper needs: one swept service `a`, one hot `h`, budgeted."""

    budgeted = True

    def __init__(self) -> None:
        self.store, self.counters, self.settings = Store(), WatchCounters(), WatchSettings()
        self.swept_deps = [HealthService("a")]
        self.hot = HealthService("h")
        self.reader: Any = None
        self.absorbed: list[int] = []

    def swept(self) -> list[HealthService]:
        return self.swept_deps

    def wanted(self) -> list[HealthService]:
        return [*self.swept_deps, self.hot]

    def wants(self, key: str) -> bool:
        return True

    def read_pause(self, key: str) -> float:
        return 0.0

    async def sweep_turn(self) -> None:
        return None

    async def absorb(self, dep: HealthService, result: QueryResult, seen: tuple[int, float] | None = None) -> bool:
        self.absorbed.append(result.index)
        return self.store.put(dep.key, result.data, result.index)

    def promote(self, dep: HealthService) -> None:
        return None


async def slow_to_cancel() -> None:
    """A read whose cancellation takes a moment (a connection being closed)."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)
        raise


def test_a_stop_during_the_safety_sweeps_cancellation_ends_the_sweeper() -> None:
    async def scenario() -> bool:
        host = Host()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._summaries.usable = False

        async def guarded(deps: list[HealthService], due: sweep.Due | None = None, whole: bool = False) -> int:
            if due is sweep.Due.SAFETY:
                await slow_to_cancel()
            return 0

        sweeper._guarded = guarded  # type: ignore[method-assign]
        sweeper._start_safety_sweep()  # a safety sweep under way …
        await asyncio.sleep(0.01)
        sweeper._urgent = True  # … when a move needs a full sweep: the loop stops the safety sweep
        sweeper._sweep_wanted.set()
        sweeper.ensure_running()
        await asyncio.sleep(0.03)
        tasks = sweeper.tasks()
        for task in tasks:  # as Watcher.stop()
            task.cancel()
        done, _ = await asyncio.wait([asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))], timeout=2)
        return bool(done)

    assert asyncio.run(scenario()), "the sweeper went on after being stopped"


def test_a_cancel_while_a_held_query_is_asked_again_is_not_swallowed() -> None:
    class Agent:
        async def get(self, *args: object, **kwargs: object) -> QueryResult:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    async def scenario() -> bool:
        watch = StallWatch(Agent(), interval_s=3600)  # type: ignore[arg-type]
        caller = asyncio.create_task(watch.held(slow_to_cancel))
        await asyncio.sleep(0.01)
        watch.saw({"srv1": 1})
        watch.saw({"srv1": 4})  # a server left the alive state: a round of asking again
        watch._ask_again_if_due()
        await asyncio.sleep(0.01)  # held() now waits for the query it cancelled
        caller.cancel()  # a stop
        done, _ = await asyncio.wait([caller], timeout=1)
        for task in watch.tasks():
            task.cancel()
        return bool(done)

    assert asyncio.run(scenario()), "the caller's cancel was swallowed and the query asked again"


def test_a_check_flip_during_the_wait_for_hot_answers_explains_nothing() -> None:
    """The catalog moved for a swept service's port (summaries equal for it) and the summaries
    name only the hot `h`: a check flip elsewhere must not end the wait as if it explained it."""

    async def scenario() -> bool:
        host = Host()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._catalog_index = 99
        host.store.put(host.hot.key, ("x",), 50)  # its answer never carries 99
        sweeper._health["critical"] = frozenset()

        async def flip() -> None:
            await asyncio.sleep(0.05)
            sweeper.triggered(HealthState("critical"), 5, frozenset({("n1", "c", "other", "critical")}), 6)

        flipping = asyncio.create_task(flip())
        explained = await sweeper._own_answers_explain({"h"}, 99)
        await flipping
        return explained

    assert asyncio.run(scenario()) is False


def test_a_newer_move_during_the_wait_for_hot_answers_puts_the_move_back_and_reads_the_unmoved() -> None:
    """The summaries named the hot `h` and `g` for the move at 99; before either answer showed it,
    the catalog moved again. The move at 99 goes back among those shown, to be judged at the next
    decision with the newer one as an earlier move (a locate judged only the latest and let a swept
    service's port change before it wait for the safety sweep: f3ae925), and only `h` is read
    whole: `g`'s query answered meanwhile, and a large hot service's lagging answer read whole at
    each move cost +41% bytes a write at 1,500 instances (helper-123, /tmp/rev69; ed051d8)."""

    class TwoHot(Host):
        def __init__(self) -> None:
            super().__init__()
            self.other_hot = HealthService("g")

        def wanted(self) -> list[HealthService]:
            return [*self.swept_deps, self.hot, self.other_hot]

    async def scenario() -> tuple[bool, set[int], list[str]]:
        host = TwoHot()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._catalog_index = 99
        host.store.put(host.hot.key, ("x",), 50)
        host.store.put(host.other_hot.key, ("y",), 50)
        read: list[str] = []
        sweeper.read_whole = lambda deps: read.extend(dep.name for dep in deps)  # type: ignore[method-assign]

        async def meanwhile() -> None:
            await asyncio.sleep(0.05)
            written = SimpleNamespace(changed_at=100)  # an instance: g's own write, not the move at 99
            host.store.put(host.other_hot.key, (written,), 100)
            sweeper._catalog_index = 100

        moving = asyncio.create_task(meanwhile())
        explained = await sweeper._own_answers_explain({"h", "g"}, 99)
        await moving
        return explained, sweeper._shown, read

    explained, shown, read = asyncio.run(scenario())
    assert explained is True  # judged again at the next decision, not a full sweep now
    assert 99 in shown
    assert read == ["h"]


def test_an_answer_overtaken_by_a_newer_one_is_dropped_not_put_over_it() -> None:
    """The safety sweep's read of `a` answered first and arrived last: a located read (or the
    service's own query) took a newer answer in meanwhile."""

    class Reader:
        def __init__(self, store: Store, key: str) -> None:
            self.store, self.key = store, key

        async def get_one(self, request: tuple[str, list[tuple[str, str]], int], gate: object = None) -> QueryResult:
            _, params, _ = request
            if any(name == "filter" for name, _ in params):
                return QueryResult(20, [])  # the probe: the index moved past what the store had
            self.store.put(self.key, ("newer",), 30)  # meanwhile, another read took index 30 in
            return QueryResult(20, ["older"])

    async def scenario() -> tuple[Any, int, list[int]]:
        host = Host()
        dep = host.swept_deps[0]
        host.store.put(dep.key, ("first",), 10)
        host.reader = Reader(host.store, dep.key)
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        assert await sweeper._refresh(dep) is True
        state = host.store.state(dep.key)
        return state.value, state.index, host.absorbed

    value, index, absorbed = asyncio.run(scenario())
    assert (value, index, absorbed) == (("newer",), 30, [])


def test_an_unexpected_error_in_a_sweep_is_logged_and_the_sweeps_go_on() -> None:
    """A review's finding: an error the sweep did not foresee (an OverflowError from a summary)
    escaped `_loop`: the task died silently and no change was followed any more."""

    async def scenario() -> tuple[int, bool]:
        host = Host()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._summaries.usable = False
        sweeps = 0

        async def failing(due: object) -> None:
            nonlocal sweeps
            sweeps += 1
            if sweeps == 1:
                raise OverflowError("cannot convert float infinity to integer")

        async def no_backoff() -> None:
            return None

        sweeper._sweep = failing  # type: ignore[method-assign]
        sweeper._back_off = no_backoff  # type: ignore[method-assign]
        sweeper._urgent = True
        sweeper._sweep_wanted.set()
        sweeper.ensure_running()
        for _ in range(200):
            if sweeps >= 2:
                break
            await asyncio.sleep(0.01)
        alive = not sweeper.tasks()[0].done()
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return sweeps, alive

    sweeps, alive = asyncio.run(scenario())
    assert sweeps >= 2 and alive


def sweeps_with_nothing_swept(arrange: Callable[[sweep.Sweeper], None], seconds: float = 0.5) -> int:
    """How many sweeps a sweeper with no swept service runs in `seconds`, `arrange` having set it up."""

    async def scenario() -> int:
        host = Host()
        host.swept_deps = []
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._summaries.usable = False
        calls = 0
        real = sweeper._sweep

        async def counting(due: Any) -> None:
            nonlocal calls
            calls += 1
            await real(due)

        sweeper._sweep = counting  # type: ignore[method-assign]
        arrange(sweeper)
        sweeper.ensure_running()
        await asyncio.sleep(seconds)
        assert sweeper._task is not None
        sweeper._task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return calls

    return asyncio.run(scenario())


def test_a_full_sweep_due_with_no_swept_service_does_not_spin() -> None:
    """A review: with no swept service (budgeted mode on KV keys only, or just after leaving it),
    a full sweep due returned at once, left itself due, and the sweeper spun a core (81,304
    sweeps a second)."""

    def moved(sweeper: sweep.Sweeper) -> None:
        sweeper._catalog_index = 99  # a catalog move nothing explains
        sweeper._sweep_wanted.set()

    assert sweeps_with_nothing_swept(moved) <= 2


def test_a_reconcile_with_no_swept_service_waits_its_interval_again() -> None:
    """An attacker's review (/tmp/rev54): with no swept service (precise mode again, or every one
    hot), a reconcile returned before noting when it ran, stayed due, and ran again at each look:
    43 empty reconciles in 3 s, for good."""

    def overdue(sweeper: sweep.Sweeper) -> None:
        sweeper._servers_asked_at = time.monotonic() - 3600  # the reconcile is overdue

    assert sweeps_with_nothing_swept(overdue) == 1


def test_a_reread_after_a_pause_is_not_held_back_by_an_older_longer_one() -> None:
    """Review round 3: one pending re-read per key slept the pause it was scheduled with, so a key
    whose pause was reset (dropped and added back) waited up to a minute instead of ~1 s."""

    async def scenario() -> tuple[list[list[str]], float]:
        host = Host()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        reads: list[list[str]] = []
        read = asyncio.Event()

        async def guarded(deps: list[HealthService], background: bool = False, whole: bool = False) -> int:
            reads.append([dep.key for dep in deps])
            read.set()
            return 0

        sweeper._guarded = guarded  # type: ignore[method-assign]
        dep = host.swept_deps[0]
        started = asyncio.get_running_loop().time()
        sweeper._read_after(dep, 30.0)  # a long pause pending …
        sweeper._read_after(dep, 0.02)  # … then a short one: its own wake
        sweeper._read_after(dep, 10.0)  # a later one adds nothing
        await asyncio.wait_for(read.wait(), 5.0)
        took = asyncio.get_running_loop().time() - started
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return reads, took

    reads, took = asyncio.run(scenario())
    assert reads == [["health.service(a)"]] and took < 5.0


def test_a_reread_after_a_pause_leaves_a_newer_moves_sign() -> None:
    """Review round 3: the re-read after a pause cleared the latency sign of an unrelated catalog
    move that came meanwhile, so that move's latency was timed from its read, not its trigger."""

    async def scenario() -> tuple[dict[int, float], dict[int, float]]:
        host = Host()
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._summaries.usable = False
        signed: list[dict[int, float]] = []

        async def guarded(deps: list[HealthService], background: bool = False, whole: bool = False) -> int:
            host.store.sign(42)  # a newer move signed while the re-read ran
            signed.append(dict(host.store.signs))
            return 0

        sweeper._guarded = guarded  # type: ignore[method-assign]
        sweeper._read_after(host.swept_deps[0], 0.0)
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return host.store.signs, signed[0]

    kept, signed = asyncio.run(scenario())
    assert kept == signed and 42 in kept


def test_a_sweep_with_nothing_to_sweep_resets_the_failure_backoff() -> None:
    """Review round 3: the backoff's start outlived a spell with no swept service, so the next
    failure, maybe an hour later, backed off at the maximum at once."""

    async def scenario() -> float | None:
        host = Host()
        host.swept_deps = []
        sweeper = sweep.Sweeper(host, None)  # type: ignore[arg-type]
        sweeper._failed_at = 1.0  # failures long ago
        await sweeper._sweep(sweep.Due.FULL)
        return sweeper._failed_at

    assert asyncio.run(scenario()) is None


class Summaries:
    """The agent's service summaries as a fetcher reads them: `catalog` is name → instance count."""

    def __init__(self) -> None:
        self.catalog = {"a": 1, "shop": 1, "evil": 1}

    async def read(self, path: str, params: list[tuple[str, str]]) -> QueryResult:
        assert path == "/v1/internal/ui/services"
        return QueryResult(1, [{"Name": name, "InstanceCount": count} for name, count in self.catalog.items()])


def test_a_change_made_during_a_full_sweep_is_named_at_the_next_move() -> None:
    """An attacker's review (/tmp/rev35): the baseline the next catalog move is compared with was
    read when a full sweep ended, so it held a change made during the sweep after its service's
    probe; the attacker's next change, located and explaining the catalog's index, left it unnamed
    until a later sweep: a victim's new instance served 6.7-8.8 s after its registration."""

    async def scenario() -> set[str] | None:
        fetcher = Summaries()
        sweeper = sweep.Sweeper(Host(), fetcher)  # type: ignore[arg-type]
        await sweeper._summaries.read_changes(fetcher)  # an earlier baseline

        async def probes(deps: list[HealthService], background: bool = False, whole: bool = False) -> int:
            fetcher.catalog["shop"] += 1  # shop's new instance, after the sweep probed it
            return 0

        sweeper._guarded = probes  # type: ignore[method-assign]
        await sweeper._sweep(sweep.Due.FULL)
        fetcher.catalog["evil"] += 1  # the attacker's next move
        return await sweeper._summaries.read_changes(fetcher)  # what `_locate` names for it

    assert asyncio.run(scenario()) == {"shop", "evil"}


async def hold_a_full_sweep(sweeper: sweep.Sweeper, fetcher: Summaries) -> tuple[list[list[str]], asyncio.Event]:
    """Start a full sweep that holds until the event returned is set; the lists of services each
    read asked for (the full sweep's first)."""
    reads: list[list[str]] = []
    sweeping, release = asyncio.Event(), asyncio.Event()

    async def guarded(deps: list[HealthService], background: bool = False, whole: bool = False) -> int:
        reads.append([dep.name for dep in deps])
        if len(deps) > 1:  # the full sweep, a long one
            sweeping.set()
            await release.wait()
        return 0

    sweeper._guarded = guarded  # type: ignore[method-assign]
    await sweeper._summaries.read_changes(fetcher)
    sweeper._urgent = True  # a full sweep due
    sweeper._sweep_wanted.set()
    sweeper.ensure_running()
    await asyncio.wait_for(sweeping.wait(), 2)
    return reads, release


def test_a_move_during_a_full_sweep_is_located_while_the_sweep_runs() -> None:
    """The same hunt: after that fix, a victim's instance registered during a full sweep waited for
    the sweep's end, 3.9-4.4 s at 2,000 services: moves were explained or located only between
    sweeps. A full sweep runs in a task of its own now, as the safety sweep does."""

    async def scenario() -> bool:
        host = Host()
        host.swept_deps = [HealthService("a"), HealthService("shop")]
        fetcher = Summaries()
        sweeper = sweep.Sweeper(host, fetcher)  # type: ignore[arg-type]
        reads, release = await hold_a_full_sweep(sweeper, fetcher)
        fetcher.catalog["shop"] += 1  # the victim's new instance, during the sweep
        sweeper.triggered(CatalogServices(), 10, None, 11)
        for _ in range(100):
            if ["shop"] in reads:
                break
            await asyncio.sleep(0.01)
        located = ["shop"] in reads
        release.set()
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return located

    assert asyncio.run(scenario())


def test_a_stop_in_the_same_turn_as_a_move_ends_the_sweeper() -> None:
    """A review (/tmp/rev36): on Python 3.11 `asyncio.wait_for` returned the event's result when
    the stop's cancel came in the same turns as a move; the cancel was lost, the sweeper went on
    and `Watcher.stop` waited for it for good."""

    async def scenario() -> tuple[bool, bool]:
        sweeper = sweep.Sweeper(Host(), None)  # type: ignore[arg-type]
        sweeper._summaries.usable = False

        async def guarded(deps: list[HealthService], due: sweep.Due | None = None, whole: bool = False) -> int:
            await asyncio.sleep(0.01)
            return 0

        sweeper._guarded = guarded  # type: ignore[method-assign]
        sweeper.ensure_running()
        await asyncio.sleep(0.05)
        sweeper.triggered(CatalogServices(), 10, None, 11)  # a move, just before the stop
        tasks = sweeper.tasks()
        for task in tasks:  # as Watcher.stop
            task.cancel()
        done, _ = await asyncio.wait([asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))], timeout=2)
        alive = sweeper._task is not None and not sweeper._task.done()
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return bool(done), alive

    assert asyncio.run(scenario()) == (True, False)


def located_moves(host: Host, fetcher: Summaries, sweeper: sweep.Sweeper, dues: list[str]) -> Any:
    """A `_guarded` recording the sweeps started (`dues`) and taking in located reads with the
    catalog's index (each move is located and explained)."""

    async def guarded(deps: list[HealthService], due: sweep.Due | None = None, whole: bool = False) -> int:
        if due is not None:
            dues.append(due.value)
            await asyncio.sleep(0.01)
        else:
            for dep in deps:
                host.store.put(dep.key, ("x", sweeper._catalog_index), sweeper._catalog_index)
        return 0

    return guarded


def test_the_reconcile_sweep_runs_though_located_moves_keep_coming(monkeypatch: Any) -> None:
    """The same review: the reconcile's time was counted from each call of `_next_sweep`, and a
    located move every few minutes re-armed it: the one sweep that asks the servers when every
    move is located never ran. (Scaled: a 0.5 s reconcile, a 0.05 s safety delay.)"""
    monkeypatch.setattr(sweep, "SAFETY_SWEEP_DELAY_S", 0.05)

    async def scenario() -> list[str]:
        host = Host()
        host.settings = WatchSettings(reconcile_interval_s=0.5)
        host.swept_deps = [HealthService("a"), HealthService("shop")]
        fetcher, dues = Summaries(), []
        sweeper = sweep.Sweeper(host, fetcher)  # type: ignore[arg-type]
        sweeper._guarded = located_moves(host, fetcher, sweeper, dues)  # type: ignore[method-assign]
        await sweeper._summaries.read_changes(fetcher)
        sweeper.ensure_running()
        for index in range(10, 45):  # 1.4 s of moves every 40 ms
            await asyncio.sleep(0.04)
            fetcher.catalog["shop"] += 1
            sweeper.triggered(CatalogServices(), index, None, index + 1)
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return dues

    dues = asyncio.run(scenario())
    assert dues.count(sweep.Due.RECONCILE.value) >= 1, dues


def test_the_sweeper_does_not_spin_while_a_long_full_sweep_runs(monkeypatch: Any) -> None:
    """The same review: a move located during a full sweep set its safety sweep's time, and once
    that passed with the full sweep still running, `_next_sweep` woke at once again and again."""
    monkeypatch.setattr(sweep, "SAFETY_SWEEP_DELAY_S", 0.05)

    async def scenario() -> int:
        host = Host()
        host.swept_deps = [HealthService("a"), HealthService("shop")]
        fetcher, dues = Summaries(), []
        sweeper = sweep.Sweeper(host, fetcher)  # type: ignore[arg-type]
        located = located_moves(host, fetcher, sweeper, dues)
        release = asyncio.Event()

        async def guarded(deps: list[HealthService], due: sweep.Due | None = None, whole: bool = False) -> int:
            if due is sweep.Due.FULL:
                await release.wait()  # a long full sweep
            return int(await located(deps, due))

        sweeper._guarded = guarded  # type: ignore[method-assign]
        looks = 0
        running = sweeper._full_running

        def counting() -> bool:
            nonlocal looks
            looks += 1
            return running()

        sweeper._full_running = counting  # type: ignore[method-assign]
        await sweeper._summaries.read_changes(fetcher)
        sweeper._urgent = True
        sweeper._sweep_wanted.set()
        sweeper.ensure_running()
        await asyncio.sleep(0.05)
        fetcher.catalog["shop"] += 1
        sweeper.triggered(CatalogServices(), 10, None, 11)  # located during the sweep: a safety sweep after it
        await asyncio.sleep(0.2)  # its time passes, the full sweep still runs
        before = looks
        await asyncio.sleep(0.5)
        during = looks - before
        release.set()
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return during

    assert asyncio.run(scenario()) < 50  # one look every FULL_RUNNING_POLL_S: ~10 in 0.5 s


def test_a_sweeps_read_waits_for_the_sweeps_turn_once() -> None:
    """helper-134 (/tmp/rev80): each read waited at two gates (its own, then its request's), each a
    render long beside a registrant's renders back to back, holding one of the sweep's connections:
    a safety sweep took 5.3 s on average, 2.9 s with one gate."""

    async def scenario() -> int:
        host, turns = Host(), 0

        async def sweep_turn() -> None:
            nonlocal turns
            turns += 1

        class Reader:
            async def get_one(self, request: object, gate: Callable[[], Any]) -> QueryResult:
                await gate()
                return QueryResult(5, [])  # the probe: the service's index did not move

        host.sweep_turn = sweep_turn  # type: ignore[method-assign]
        host.reader = Reader()
        host.store.put(HealthService("a").key, [], 5)
        sweeper = sweep.Sweeper(host, Summaries())  # type: ignore[arg-type]
        assert await sweeper._refresh(HealthService("a"))
        return turns

    assert asyncio.run(scenario()) == 1


def test_moves_during_a_full_sweep_read_the_summaries_at_the_locate_pace() -> None:
    """helper-134 (/tmp/rev80): during a full sweep each catalog move a registrant's writes showed
    cost a summaries read (18.8 a second, ~314 KB each at 1,000 services; 3.9 outside). They are
    read at EARLIER_LOCATE_GAP_S at most, and a victim's move among them is still located."""

    async def scenario() -> tuple[int, bool]:
        host = Host()
        host.swept_deps = [HealthService("a"), HealthService("shop")]
        fetcher, summaries_reads = Summaries(), [0]
        read = fetcher.read

        async def counted(path: str, params: list[tuple[str, str]]) -> QueryResult:
            summaries_reads[0] += 1
            return await read(path, params)

        fetcher.read = counted  # type: ignore[method-assign]
        sweeper = sweep.Sweeper(host, fetcher)  # type: ignore[arg-type]
        reads, release = await hold_a_full_sweep(sweeper, fetcher)
        before = summaries_reads[0]
        for index in range(11, 51):  # 40 moves 10 ms apart: the attacker's, and the victim's in the middle
            fetcher.catalog["shop" if index == 30 else "evil"] += 1
            sweeper.triggered(CatalogServices(), index - 1, None, index)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)
        during = summaries_reads[0] - before
        release.set()
        for task in sweeper.tasks():
            task.cancel()
        await asyncio.gather(*sweeper.tasks(), return_exceptions=True)
        return during, ["shop"] in reads

    during, located = asyncio.run(scenario())
    assert located and during <= 6, during  # ~0.8 s at one read each 0.25 s (40 before)
