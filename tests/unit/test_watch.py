"""The watcher's own logic against a fake client (our seam), never a fake Consul in integration tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

from renderer.errors import ConsulError
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.dependency import KVKey
from renderer.source.watch import Store, Watcher, WatchSettings
from tests.helpers import Pace
from tests.unit.fakes import FakeAgent, keyed


class FakeClient(FakeAgent):
    def __init__(self, answers: list[QueryResult | Exception]) -> None:
        super().__init__()
        self.answers = answers
        self.calls: list[int] = []

    async def answer(self, path: str, index: int) -> QueryResult:
        self.calls.append(index)
        if not self.answers:
            await asyncio.sleep(3600)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def kv(value: str, index: int) -> QueryResult:
    import base64

    return QueryResult(index, [{"Value": base64.b64encode(value.encode()).decode()}])


async def run_until(store: Store, key: str, value: str, client: FakeClient) -> None:
    settings = WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002)
    watcher = Watcher(client, store, settings)
    watcher.watch(keyed(KVKey("k")))
    for _ in range(500):
        if store.get(key) == (True, value) and not client.answers:
            break
        await asyncio.sleep(0.002)
    await watcher.stop()


def test_index_reset_when_it_goes_backwards_and_errors_retried() -> None:
    store = Store()
    client = FakeClient([kv("a", 10), ConsulRequestError("down"), kv("a", 10), kv("b", 3), kv("c", 4)])
    asyncio.run(run_until(store, "kv.key(k)", "c", client))
    assert store.get("kv.key(k)") == (True, "c")
    # 0 first; 10 fails; the retry does not block (0); 10 again → answer 3 went backwards → reset to 0.
    assert client.calls[:5] == [0, 10, 0, 10, 0]
    assert store.watch_errors == 1


def test_acl_refusal_before_any_success_is_fatal() -> None:
    store = Store()
    client = FakeClient([ConsulRequestError("Permission denied", status=403)])
    refused: list[ConsulError] = []

    async def go() -> None:
        told = asyncio.Event()

        def on_fatal(error: ConsulError) -> None:
            refused.append(error)
            told.set()

        watcher = Watcher(client, store, WatchSettings(backoff_base_s=0.001), on_fatal=on_fatal)
        watcher.watch(keyed(KVKey("k")))
        await asyncio.wait_for(told.wait(), 5)
        await watcher.stop()

    asyncio.run(go())
    assert isinstance(refused[0], ConsulRequestError) and refused[0].status == 403


def test_equal_data_signals_no_change() -> None:
    store = Store()
    assert store.put("k", (1, 2), 5)
    store.changed.clear()
    assert not store.put("k", (1, 2), 6)
    assert not store.changed.is_set()


def test_a_key_that_answers_again_ends_the_backoff_of_the_others(pace: Pace) -> None:
    """After an outage (a leader election), nobody keeps sleeping off the backoff it built up."""

    class Outage(FakeAgent):
        intercept_probes = False  # the probe fails while Consul is down, as everything does

        def __init__(self) -> None:
            super().__init__()
            self.down = True
            self.calls: dict[str, int] = {}

        async def answer(self, path: str, index: int) -> QueryResult:
            self.calls[path] = self.calls.get(path, 0) + 1
            if index > 0:
                await asyncio.sleep(3600)  # blocking queries of keys that have data: nothing changes
            if self.down:
                raise ConsulRequestError("no leader")
            return kv(path, 5)

    async def scenario() -> float:
        client = Outage()
        store = Store()
        settings = WatchSettings(min_gap_s=0.0, backoff_base_s=2.0, backoff_max_s=30.0)
        watcher = Watcher(client, store, settings)
        watcher.watch(keyed(KVKey("a"), KVKey("b")))
        arrived: dict[str, float] = {}
        try:
            while min(client.calls.get("/v1/kv/a", 0), client.calls.get("/v1/kv/b", 0)) < 3:
                await asyncio.sleep(0.01)
            client.down = False  # Consul is back; both keys are sleeping off backoffs of seconds
            while len(arrived) < 2:
                for key in ("a", "b"):
                    if store.get(f"kv.key({key})")[0]:
                        arrived.setdefault(key, asyncio.get_running_loop().time())
                await asyncio.sleep(0.005)
            return abs(arrived["a"] - arrived["b"])
        finally:
            await watcher.stop()

    # Without the wake-up, each key waits out its own random backoff (0-8 s at the third failure);
    # with it, the first key to get an answer wakes the other at once.
    assert asyncio.run(asyncio.wait_for(scenario(), 60)) < pace(0.3)


class Election(FakeAgent):
    """An agent through an election: its key fails ("No cluster leader") until `elected`, and the
    recovery probe is told `leader` ("" at first: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.leader = ""
        self.elected = False
        self.key_calls = 0

    async def answer(self, path: str, index: int) -> QueryResult:
        self.key_calls += 1
        if index > 0:
            await asyncio.sleep(3600)
        if not self.elected:
            raise ConsulRequestError("No cluster leader", status=500)
        return kv("v", 5)


async def seconds_to_answer_after_election(
    before: Callable[[Election], Awaitable[None]], leader: str, first: str = ""
) -> float:
    """One key watched through an election: failed twice (sleeping off a backoff of seconds) and the
    probe was told `first` ("": no leader); `before(agent)`, then `leader` elected: how long until
    the key's answer."""
    client = Election()
    client.leader = first
    store = Store()
    watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0, backoff_base_s=5.0, backoff_max_s=30.0))
    watcher.watch(keyed(KVKey("k")))
    try:
        while client.key_calls < 2 or client.probes < 1:
            await asyncio.sleep(0.01)
        await before(client)
        client.leader, client.elected = leader, True
        elected = asyncio.get_running_loop().time()
        while not store.get("kv.key(k)")[0]:
            await asyncio.sleep(0.005)
        return asyncio.get_running_loop().time() - elected
    finally:
        await watcher.stop()


def test_a_leader_seen_again_ends_every_backoff(pace: Pace) -> None:
    """One key, failing through an election: the recovery probe (`/v1/status/leader`, answered by
    any server) sees "no leader" turn into a leader and ends the key's backoff at once."""

    async def nothing(client: Election) -> None:
        return None

    # Without the probe the key would sleep out its backoff (up to 10 s at the second failure).
    took = asyncio.run(asyncio.wait_for(seconds_to_answer_after_election(nothing, "10.0.0.1:8300"), 60))
    assert took < pace(0.5)


def test_the_real_election_after_a_stale_leader_answer_ends_every_backoff(pace: Pace) -> None:
    """Measured in the cluster lab (1.8.7, a leader's SIGKILL): within 0.1 s of the kill the probe
    was told a leader, the dead one (a follower that had not noticed), and woke the keys, which
    failed again; the real election ~2.5 s later changed only the name, and no wake told of it."""

    async def stale_leader(client: Election) -> None:
        client.leader = "10.0.0.1:8300"  # the dead leader, named by a follower
        calls = client.key_calls
        while client.key_calls < calls + 1:  # woken, failed again: sleeping a backoff of seconds
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)

    took = asyncio.run(asyncio.wait_for(seconds_to_answer_after_election(stale_leader, "10.0.0.2:8300"), 120))
    assert took < pace(0.5)


def test_the_real_election_is_seen_when_the_first_answer_already_named_the_dead_leader(pace: Pace) -> None:
    """helper-149's G3: no "no leader" first, only the dead leader's name: the probe counted that as
    a leader all along and slowed to every 2 s, so the real election was seen up to 2 s late."""

    async def later(client: Election) -> None:
        await asyncio.sleep(1.5)  # the probe's pace would have doubled to 1.6 s by now

    # The dead leader's name from the first probe on, then the real election.
    took = asyncio.run(asyncio.wait_for(seconds_to_answer_after_election(later, "10.0.0.2:8300", "10.0.0.1:8300"), 60))
    assert took < pace(0.5)


def test_answers_naming_servers_in_turn_wake_the_failing_keys_at_most_every_2_s() -> None:
    """helper-148: a leader name changing at every probe (an inconsistent or hostile answer, an agent
    asking servers with different views in turn) woke every failing key every 0.1 s: 498 requests a
    second at 50 keys failing with 429, against 14 before."""

    class Flapping(FakeAgent):
        def __init__(self) -> None:
            super().__init__()
            self.key_calls = 0
            self.turn = 0

        @property  # type: ignore[override]
        def leader(self) -> str:
            self.turn += 1
            return f"10.0.0.{self.turn % 2 + 1}:8300"

        async def answer(self, path: str, index: int) -> QueryResult:
            self.key_calls += 1
            raise ConsulRequestError("Too Many Requests", status=429)

    async def scenario() -> int:
        client = Flapping()
        settings = WatchSettings(min_gap_s=0.0, backoff_base_s=1.0, backoff_max_s=10.0)
        watcher = Watcher(client, Store(), settings)
        watcher.watch(keyed(*(KVKey(f"k{n}") for n in range(5))))
        await asyncio.sleep(3.0)
        await watcher.stop()
        return client.key_calls

    # Woken at each probe: ~30 retries a key in 3 s; at most every 2 s: its own backoff and two wakes.
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) < 5 * 8
    Flapping.leader = property(lambda self: "" if next(turns) % 2 else "10.0.0.1:8300")  # type: ignore[assignment]
    turns = itertools.count()  # helper-149's G1: a leader and none in turn, 255 requests a second at 50 keys
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) < 5 * 8
    pairs = itertools.count()  # and names in pairs: each change from an answer seen twice in a row
    Flapping.leader = property(lambda self: f"10.0.0.{next(pairs) // 2 % 2 + 1}:8300")  # type: ignore[assignment]
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) < 5 * 8


def test_the_recovery_probe_wakes_nobody_when_a_leader_was_there_all_along(pace: Pace) -> None:
    """An error a leader does not cure (here a 403 on one key): the probe sees a leader every
    time, never a change, so the key keeps its backoff instead of retrying every 100 ms."""

    class Refusing(FakeAgent):
        def __init__(self) -> None:
            super().__init__()
            self.key_calls = 0

        async def answer(self, path: str, index: int) -> QueryResult:
            self.key_calls += 1
            raise ConsulRequestError("Permission denied", status=500)

    async def scenario() -> int:
        client = Refusing()
        settings = WatchSettings(min_gap_s=0.0, backoff_base_s=1.0, backoff_max_s=2.0)
        watcher = Watcher(client, Store(), settings)
        watcher.watch(keyed(KVKey("k")))
        while client.probes < 5:  # 0.1 + 0.2 + 0.4 + 0.8 s: the probe slows down, a leader is there
            await asyncio.sleep(0.01)
        await watcher.stop()
        return client.key_calls

    # Random backoffs up to 1-2 s: a few calls in those 1.5 s; woken at every probe it would be
    # one call per probe on top, and retrying every 100 ms about 15.
    assert asyncio.run(asyncio.wait_for(scenario(), 30)) < pace(10)


def test_watching_the_same_keys_again_starts_and_stops_nothing_but_restarts_an_ended_query() -> None:
    """After every render the loop hands the watcher the keys again: the same keys change nothing
    (no new query, none stopped); a key whose query ended is started again; a dropped key stops."""

    async def scenario() -> None:
        client = FakeClient([])
        watcher = Watcher(client, Store(), WatchSettings(min_gap_s=0.0))
        keys = keyed(KVKey("a"), KVKey("b"))
        watcher.watch(keys)
        first = dict(watcher._polls)
        watcher.watch(dict(keys))
        assert watcher._polls == first and not watcher._draining
        first["kv.key(a)"].cancel()
        await asyncio.sleep(0)
        watcher._finished("kv.key(a)", first["kv.key(a)"])  # as its task does when its query ends
        watcher.watch(dict(keys))
        assert (
            set(watcher._polls) == {"kv.key(a)", "kv.key(b)"} and watcher._polls["kv.key(a)"] is not first["kv.key(a)"]
        )
        watcher.watch(keyed(KVKey("b")))
        assert watcher._draining == {"kv.key(a)"}
        await watcher.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_over_http2_a_dropped_key_resets_its_stream_at_once_and_can_come_back() -> None:
    """Over HTTP/2 a held query is a stream, not one of the agent's connections: a key the
    templates no longer use is cancelled at once, not held for the rest of its wait (which
    `block_wait` may make hours long); wanted again right away, it gets a query of its own, and
    the reset one ending later does not take that one's place (over HTTP/1.1 it drains)."""

    async def scenario(streams: int) -> tuple[bool, bool, bool]:
        client = FakeClient([])  # every query held (an hour)
        watcher = Watcher(client, Store(), WatchSettings(min_gap_s=0.0, streams_per_connection=streams))
        watcher.watch(keyed(KVKey("a"), KVKey("b")))
        await asyncio.sleep(0.01)
        held = watcher._polls["kv.key(a)"]
        watcher.watch(keyed(KVKey("b")))
        reset_at_once = held.cancelling() > 0 and "kv.key(a)" not in watcher._polls
        watcher.watch(keyed(KVKey("a"), KVKey("b")))  # back before the reset one has ended
        if streams > 1:
            await asyncio.wait({held})  # the reset one ends after its key came back
        await asyncio.sleep(0.01)
        again = watcher._polls.get("kv.key(a)")
        watched_again = again is not None and again is not held and not again.done()
        drained = "kv.key(a)" in watcher._draining
        await watcher.stop()
        return reset_at_once, watched_again, drained

    assert asyncio.run(asyncio.wait_for(scenario(100), 10)) == (True, True, False)
    reset_at_once, _, _ = asyncio.run(asyncio.wait_for(scenario(1), 10))
    assert not reset_at_once  # HTTP/1.1: the query drains (the agent would keep its connection slot)


def test_an_answer_that_came_while_its_key_was_dropped_is_asked_for_again_when_it_is_wanted_again() -> None:
    """Found in an attacker's re-review (/tmp/rev18): a service redeployed (its last instance gone,
    back 1.5 s later). Its held query (HTTP/1.1: it drains) answered the re-registration while the
    key was dropped, a moment before the catalog answer that made the templates want it again; the
    next query asked from that answer's index, so it blocked past it, and the service was served
    only when its 60 s wait ran out. The answer not taken in is asked for again."""

    class Gated(FakeAgent):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []
            self.go = asyncio.Event()

        async def answer(self, path: str, index: int) -> QueryResult:
            self.calls.append(index)
            if index == 0:
                return kv("1", 5)
            if len(self.calls) == 2:
                await self.go.wait()  # held until the service comes back
                return kv("2", 6)
            if index < 6:
                return kv("2", 6)
            await asyncio.sleep(3600)  # a query from index 6 blocks past the answer
            raise AssertionError("unreachable")

    async def scenario() -> None:
        client, store = Gated(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=1.0))  # the poll's gap: room to come back in
        watcher.watch(keyed(KVKey("k")))
        for _ in range(200):
            if len(client.calls) == 2:
                break
            await asyncio.sleep(0.01)
        assert store.get("kv.key(k)") == (True, "1") and client.calls == [0, 5]
        watcher.watch({})  # dropped: its held query drains
        client.go.set()
        await asyncio.sleep(0.05)  # the answer came, not taken in; the poll waits out its gap
        watcher.watch(keyed(KVKey("k")))  # wanted again
        for _ in range(500):
            if store.get("kv.key(k)") == (True, "2"):
                break
            await asyncio.sleep(0.01)
        assert store.get("kv.key(k)") == (True, "2"), client.calls
        assert client.calls[:3] == [0, 5, 0]  # wanted again with no data: read afresh (see the next test)
        await watcher.stop()


def test_a_key_wanted_again_while_its_query_is_still_held_is_read_afresh_at_once() -> None:
    """Found in an attacker's re-review (/tmp/rev20): a key dropped (a render that read less) and
    wanted again while its query (HTTP/1.1: it drains) was still held. The store had forgotten it;
    the old poll went on from its old index, Consul answered "unchanged" at the end of each wait,
    and the key never had data again, so its template never rendered until the value changed."""

    class Held(FakeAgent):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[int] = []
            self.release = asyncio.Event()

        async def answer(self, path: str, index: int) -> QueryResult:
            self.calls.append(index)
            if index == 0:
                return kv("1", 5)
            await self.release.wait()  # a blocking query: its wait ends with nothing new
            self.release.clear()
            return QueryResult(index, None, unchanged=True)

    async def scenario() -> None:
        client, store = Held(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.05))
        watcher.watch(keyed(KVKey("k")))
        for _ in range(200):
            if len(client.calls) == 2:
                break
            await asyncio.sleep(0.01)
        watcher.watch({})  # dropped: the store forgets it, its held query drains
        watcher.watch(keyed(KVKey("k")))  # wanted again while that query is held
        for _ in range(100):
            if store.get("kv.key(k)")[0]:
                break
            await asyncio.sleep(0.01)
        assert store.get("kv.key(k)") == (True, "1"), client.calls  # at once, not after the wait
        client.release.set()  # the old query's wait ends, nothing changed: it ends, and the data stays
        await asyncio.sleep(0.2)
        assert store.get("kv.key(k)") == (True, "1") and client.calls[:3] == [0, 5, 0], client.calls
        await watcher.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_trimming_the_hot_services_stops_the_excess_not_all_of_them() -> None:
    """Two hot services more than the slots: two are handed back to the sweeps. A stopped query
    keeps its slot until it ends, so counting the excess again after each stop found it again
    and stopped every hot service."""

    async def scenario() -> tuple[int, int, int]:
        watcher = Watcher(FakeClient([]), Store(), WatchSettings(min_gap_s=0.0))
        slots = watcher.settings.blocking_slots
        for i in range(slots + 2):
            watcher._hot[f"k{i}"] = None
            watcher._polls[f"k{i}"] = asyncio.create_task(asyncio.sleep(3600))
        watcher._trim_hot()
        for task in watcher._polls.values():
            task.cancel()
        return len(watcher._draining), len(watcher._hot), slots

    stopped, hot, slots = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert (stopped, hot) == (2, slots)


def test_an_answer_does_not_live_through_the_next_held_query() -> None:
    """Each watched key's loop waits up to 10 minutes in its next query: the answer before it (its
    parsed JSON, ~32 KB a service) must be gone by then, only its body kept (1,000 services over
    HTTP/2 held 34 MB of such answers)."""
    import base64
    import gc
    import weakref

    class Tracked(list[dict[str, str]]):
        pass

    def answer() -> tuple[QueryResult, weakref.ref[Tracked]]:
        data = Tracked([{"Value": base64.b64encode(b"v").decode()}])
        return QueryResult(5, data, body='[{"Value": "dg=="}]'), weakref.ref(data)

    async def scenario() -> None:
        store = Store()
        first, parsed = answer()
        client = FakeClient([first])  # then the next query is held (the fake waits an hour)
        del first
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0))
        watcher.watch(keyed(KVKey("k")))
        for _ in range(500):
            if store.get("kv.key(k)") == (True, "v") and len(client.calls) == 2:
                break
            await asyncio.sleep(0.002)
        assert client.calls == [0, 5]  # the second query is held now
        gc.collect()
        assert parsed() is None, gc.get_referrers(parsed())
        await watcher.stop()

    asyncio.run(scenario())


WEB_ANSWER = [{"Node": {"Node": "n1", "Address": "10.0.0.1"},
               "Service": {"ID": "w1", "Service": "web", "Address": "10.0.0.1", "Port": 80}}]  # fmt: skip


class Refusing(FakeAgent):
    """Answers 400 for paths holding `evil`, or for every path (the leader too) while `all_refused`;
    500 for `down` and the catalog; else one instance of web (blocking queries held)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: dict[str, int] = {}
        self.all_refused = False

    async def get(self, path: str, *args: Any, **kwargs: Any) -> QueryResult:
        if self.all_refused:
            self.asked[path] = self.asked.get(path, 0) + 1
            raise ConsulRequestError(
                f"Consul answered 400 for {path}: Client sent an HTTP request to an HTTPS server", 400
            )
        return await super().get(path, *args, **kwargs)

    async def answer(self, path: str, index: int) -> QueryResult:
        self.asked[path] = self.asked.get(path, 0) + 1
        if "evil" in path:
            raise ConsulRequestError(f"Consul answered 400 for {path}: ", status=400)
        if "down" in path or path == "/v1/catalog/services":
            raise ConsulRequestError(f"Consul answered 500 for {path}: ", status=500)
        if index:
            await asyncio.sleep(3600)
        name = path.rsplit("/", 1)[1]  # each service its one instance w1
        return QueryResult(7, [{**WEB_ANSWER[0], "Service": {**WEB_ANSWER[0]["Service"], "Service": name}}])


def test_a_key_consul_refuses_to_be_asked_about_is_served_empty_and_asked_again_slowly() -> None:
    """A service name with a character Consul will not take in a path (measured on 1.8.7: a newline,
    U+2028 or a zero-width space get 400; a 1.1 MB name 431): its key never gets an answer, and a key
    without data held every render of the template for good. Now, once Consul answers another
    request at once (the leader) and refuses the key's read once more, it is served as a name
    Consul does not know (no instances) and
    asked again 1 s later, then 2 s, … at most every minute, holding no query meanwhile; dropped,
    its pause ends at once. The other keys go on; a 500 is still retried; a trigger too."""
    from renderer.source.dependency import CatalogServices, HealthService

    async def scenario() -> tuple[Store, Refusing, list[int], bool]:
        client, store = Refusing(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002))
        evil, web, down = HealthService("evil\nname"), HealthService("web"), HealthService("down")
        watcher.watch(keyed(evil, web, down, CatalogServices()))
        path = "/v1/health/service/evil%0Aname"
        asked = []
        for pause in (0.3, 1.0, 1.0):
            await asyncio.sleep(pause)
            asked.append(client.asked[path])
        watcher.watch(keyed(web))  # the templates stop asking: its pause ends at once
        await asyncio.sleep(0.01)
        gone = evil.key not in watcher._polls and not watcher._resting and evil.key not in watcher._refusals
        await watcher.stop()
        return store, client, asked, gone

    store, client, asked, gone = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert asked == [2, 4, 4] and gone  # the read and its confirmation at 0 s, again 1 s later; the next 2 s after
    assert store.get("health.service(web)")[1][0].id == "w1"
    assert client.asked["/v1/health/service/down"] > 3 and client.asked["/v1/catalog/services"] > 3
    assert "health.service(evil\nname)" not in store.failing_keys


def test_a_burst_of_refusals_of_everything_never_empties_a_key() -> None:
    """Everything refused with 400 for a while (an agent restarted with TLS on the port answers plain
    HTTP so; a proxy may too), then answered again: a key that had data keeps it, and one that had
    none waits for its answer, as before; neither is ever served empty (the leader is refused too,
    so the name is not at fault)."""
    from renderer.source.dependency import HealthService

    async def scenario() -> tuple[Store, bool]:
        client, store = Refusing(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002))
        web = HealthService("web")
        watcher.watch(keyed(web))
        for _ in range(100):
            if store.get(web.key)[0]:
                break
            await asyncio.sleep(0.01)
        client.all_refused = True
        watcher.watch(keyed(web, HealthService("api")))  # a new key during the burst
        watcher._polls[web.key].cancel()  # its held query ends: asked again, refused
        watcher._finished(web.key, watcher._polls[web.key])
        watcher.watch(keyed(web, HealthService("api")))
        await asyncio.sleep(0.3)
        during = store.get(web.key)[1]
        api_empty = store.get("health.service(api)")[0]
        client.all_refused = False
        for _ in range(200):
            if store.get("health.service(api)")[0]:
                break
            await asyncio.sleep(0.01)
        await watcher.stop()
        return store, bool(during) and not api_empty

    store, kept = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert kept  # web kept its instance, api was never served empty
    assert store.get("health.service(web)")[1][0].id == "w1"
    assert store.get("health.service(api)")[1][0].id == "w1"  # api's answer came once Consul answered
    assert not store.refusals


def test_an_answer_of_any_shape_keeps_the_key_watched() -> None:
    """A parse that raises something other than the usual four (a Port of 1e400 is infinity to
    JSON, and int() of it an OverflowError, before instances checked their port one by one) ended
    the key's watch silently: its next change was never asked for. Now the last good data is kept,
    the error recorded, and the key asked again."""
    from renderer.source.dependency import HealthService

    good = QueryResult(
        5, [{"Node": {"Node": "n1"}, "Service": {"ID": "w1", "Service": "web", "Address": "10.0.0.1", "Port": 80}}]
    )
    odd = QueryResult(6, {"not": "a list"})
    later = QueryResult(
        8, [{"Node": {"Node": "n1"}, "Service": {"ID": "w2", "Service": "web", "Address": "10.0.0.2", "Port": 80}}]
    )

    class Odd(HealthService):
        def parse(self, data: object) -> object:
            if isinstance(data, dict):
                raise OverflowError("cannot convert float infinity to integer")
            return super().parse(data)

    async def scenario() -> Store:
        client, store = FakeClient([good, odd, later]), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0))
        dep = Odd("web")
        watcher.watch({dep.key: dep})
        for _ in range(500):
            present, value = store.get(dep.key)
            if present and value[0].id == "w2":
                break
            await asyncio.sleep(0.002)
        await watcher.stop()
        return store

    store = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert store.get("health.service(web)")[1][0].id == "w2"
    assert store.watch_errors == 1 and "OverflowError" in (store.last_error or "")


def test_a_blocking_query_refused_is_asked_plainly_before_the_key_is_served_empty() -> None:
    """A 400 may be for our index or wait, not the name: the key is refused only when a plain read
    (no index, no wait) is refused too. Here only blocking queries are refused: the key keeps its
    data, and is never served empty."""
    from renderer.source.dependency import HealthService

    class BlockingRefused(FakeAgent):
        def __init__(self) -> None:
            super().__init__()
            self.plain = 0

        async def answer(self, path: str, index: int) -> QueryResult:
            if index:
                raise ConsulRequestError(f"Consul answered 400 for {path}: bad wait", status=400)
            self.plain += 1
            instance = {"ID": "w1", "Service": "web", "Address": "10.0.0.1", "Port": 80}
            return QueryResult(7, [{"Node": {"Node": "n1", "Address": "10.0.0.1"}, "Service": instance}])

    async def scenario() -> tuple[Store, BlockingRefused, set[str]]:
        client, store = BlockingRefused(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002))
        watcher.watch(keyed(HealthService("web")))
        await asyncio.sleep(0.3)
        parked = set(watcher._resting) | set(store.refusals)
        await watcher.stop()
        return store, client, parked

    store, client, parked = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not parked and client.plain > 2
    assert store.get("health.service(web)")[1][0].id == "w1"


def test_a_refusal_that_ends_before_the_leader_answers_empties_nothing() -> None:
    """Everything refused, and the refusal ends between a key's refused read and the leader's
    answer: the read asked again to confirm is answered, so the key (which never had data) is not
    served empty but read."""
    from renderer.source.dependency import HealthService

    class Once(Refusing):
        async def get(self, path: str, *args: Any, **kwargs: Any) -> QueryResult:
            if path == "/v1/health/service/api" and not self.asked.get(path):
                self.asked[path] = 1
                raise ConsulRequestError(f"Consul answered 400 for {path}: a proxy reloading", 400)
            return await super().get(path, *args, **kwargs)

    refused: list[str] = []

    async def scenario() -> Store:
        client, store = Once(), Store()
        watcher = Watcher(client, store, WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002))
        real = watcher.refuse

        def counted(dep: Any, error: Any) -> None:
            refused.append(dep.key)
            real(dep, error)

        watcher.refuse = counted  # type: ignore[method-assign]
        watcher.watch(keyed(HealthService("api")))
        for _ in range(200):
            if store.get("health.service(api)")[0]:
                break
            await asyncio.sleep(0.01)
        await watcher.stop()
        return store

    store = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert refused == [] and store.get("health.service(api)")[1][0].id == "w1"


class EchoClient(FakeAgent):
    """Answers every query at once with the same value at `index` (None: no index at all)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.calls: list[int] = []

    async def answer(self, path: str, index: int) -> QueryResult:
        self.calls.append(index)
        return kv("a", self.index)


def test_answers_that_come_at_once_with_no_index_or_the_same_one_slow_down_instead_of_spinning() -> None:
    """A review's finding: an agent answering at once with no index, 0, the same index or one going
    backwards made each key ask again every ~7.5 ms, forever (122 requests a second per key). A
    missing index now blocks from the last one (at least 1), and answers that come at once without
    the index moving wait 50 ms, doubling up to backoff_max_s, for as long as they go on."""

    async def calls_in(client: EchoClient, seconds: float) -> list[int]:
        watcher = Watcher(client, Store(), WatchSettings(min_gap_s=0.005, backoff_max_s=10.0))
        watcher.watch(keyed(KVKey("k")))
        await asyncio.sleep(seconds)
        await watcher.stop()
        return client.calls

    none = asyncio.run(calls_in(EchoClient(0), 0.8))
    assert none[:3] == [0, 1, 1]  # blocks from 1, never asks with 0 again
    assert len(none) <= 6, none  # 50 + 100 + 200 + 400 ms of pauses; 5 ms apart, it asked ~100 times
    same = asyncio.run(calls_in(EchoClient(42), 0.8))
    assert same[:2] == [0, 42] and len(same) <= 6, same
