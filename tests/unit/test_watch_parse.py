"""A long answer is parsed on the watcher's parse thread: the loop, and every other key, go on.

Found by an attacker's review: one service of 200,000 instances (45 MB, under max_answer_bytes)
held the event loop for 23 s each time it changed, so no other backend was updated meanwhile.
The parse here waits on a threading.Event the loop sets: on the loop itself it could not finish
before the wait's timeout, and the other key's answer would come second."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from renderer.source.client import QueryResult
from renderer.source.dependency import KVKey
from renderer.source.watch import PARSE_AWAY_CHARS, Store, Watcher, WatchSettings
from tests.unit.fakes import FakeAgent, keyed

LONG = "x" * PARSE_AWAY_CHARS  # the body's length is all that decides where it is parsed
GATE_S = 5.0  # how long a held parse waits for the loop before it gives up


@dataclass(frozen=True)
class HeldKey(KVKey):
    """A KV key whose parse of a value starting `held:` waits until `gate` is set (or GATE_S
    passed), saying which thread ran it."""

    gate: threading.Event | None = field(default=None, compare=False)
    threads: list[str] | None = field(default=None, compare=False)

    def parse(self, data: Any) -> Any:
        if self.threads is not None:
            self.threads.append(threading.current_thread().name)
        if self.gate is not None and str(data).startswith("held:"):
            self.gate.wait(GATE_S)
        return data


class Agent(FakeAgent):
    """One answer per path, given after `delay` seconds; then nothing more (a query held)."""

    def __init__(self, answers: dict[str, tuple[float, QueryResult]]) -> None:
        super().__init__()
        self.answers = answers

    async def answer(self, path: str, index: int) -> QueryResult:
        answer = self.answers.pop(path, None)
        if answer is None:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")
        delay, result = answer
        await asyncio.sleep(delay)
        return result


SETTINGS = WatchSettings(min_gap_s=0.0, backoff_base_s=0.001, backoff_max_s=0.002)


@contextlib.asynccontextmanager
async def watching(store: Store, *keys: KVKey, agent: FakeAgent | None = None) -> AsyncIterator[Watcher]:
    """A watcher following `keys` (with no answer coming, unless `agent` gives some), stopped after."""
    watcher = Watcher(agent or Agent({}), store, SETTINGS)
    watcher.watch(keyed(*keys))
    try:
        yield watcher
    finally:
        await watcher.stop()


def test_a_long_answer_is_parsed_off_the_loop_while_other_keys_are_taken_in() -> None:
    gate, threads = threading.Event(), list[str]()
    big, small = HeldKey("big", gate=gate, threads=threads), KVKey("small")
    store, order = Store(), list[str]()

    async def scenario() -> None:
        agent = Agent({
            "/v1/kv/big": (0.0, QueryResult(3, "held: big", body=LONG)),
            "/v1/kv/small": (0.05, QueryResult(4, [{"Value": "c21hbGw="}], body="short")),
        })  # fmt: skip
        watcher = Watcher(agent, store, SETTINGS)
        watcher.watch(keyed(big, small))
        try:
            async with asyncio.timeout(3 * GATE_S):
                while len(order) < 2:
                    for key in (big.key, small.key):
                        if store.get(key)[0] and key not in order:
                            order.append(key)
                    if store.get(small.key)[0]:
                        gate.set()  # the loop saw the other key: the long parse may end now
                    await asyncio.sleep(0.005)
        finally:
            await watcher.stop()

    asyncio.run(scenario())
    assert order == [small.key, big.key], "the long answer's parse held the loop and the other key"
    assert store.get(big.key) == (True, "held: big")
    assert threads and threads[0].startswith("consul-parse"), threads


def test_a_short_answer_is_parsed_on_the_loop() -> None:
    threads = list[str]()
    key = HeldKey("k", threads=threads)

    async def scenario() -> None:
        async with watching(Store(), key) as watcher:
            assert await watcher.absorb(key, QueryResult(2, "v", body="v" * (PARSE_AWAY_CHARS - 1)))

    asyncio.run(scenario())
    assert threads == [threading.main_thread().name]


def test_an_answer_put_while_a_long_one_is_parsed_is_kept_when_newer() -> None:
    """Two reads of one key (its own query and a sweep's) may cross: the lower index is dropped."""
    gate = threading.Event()
    key = HeldKey("k", gate=gate)
    store = Store()

    async def scenario() -> tuple[bool, bool]:
        async with watching(store, key) as watcher:
            older = asyncio.create_task(watcher.absorb(key, QueryResult(5, "held: older", body=LONG)))
            await asyncio.sleep(0.05)  # the long one is being parsed …
            newer = await watcher.absorb(key, QueryResult(7, "newer", body="short"))  # … when a newer comes
            gate.set()
            return newer, await older

    newer, older = asyncio.run(scenario())
    assert (newer, older) == (True, False)
    assert store.get(key.key) == (True, "newer") and store.state(key.key).index == 7


def test_an_older_answer_put_while_a_long_newer_one_is_parsed_is_overwritten() -> None:
    gate = threading.Event()
    key = HeldKey("k", gate=gate)
    store = Store()

    async def scenario() -> None:
        async with watching(store, key) as watcher:
            newer = asyncio.create_task(watcher.absorb(key, QueryResult(9, "held: newer", body=LONG)))
            await asyncio.sleep(0.05)
            await watcher.absorb(key, QueryResult(6, "older", body="short"))
            gate.set()
            assert await newer

    asyncio.run(scenario())
    assert store.get(key.key) == (True, "held: newer") and store.state(key.key).index == 9


@dataclass(frozen=True)
class BrokenKey(KVKey):
    """A KV key whose parse waits until `gate` is set, then fails (an answer of a shape Consul never sends)."""

    gate: threading.Event | None = field(default=None, compare=False)

    def parse(self, data: Any) -> Any:
        if self.gate is not None:
            self.gate.wait(GATE_S)
        raise TypeError("an answer of a shape Consul never sends")


@pytest.mark.parametrize("kind", [HeldKey, BrokenKey], ids=["parsed", "failing"])
def test_a_key_dropped_while_its_answer_is_parsed_is_neither_put_back_nor_reported(kind: type[KVKey]) -> None:
    """A failing parse of a key dropped meanwhile brought the key back in the store as failing, for
    good (a review of the parse thread: the outage log every 10 s)."""
    gate = threading.Event()
    key, other = kind("k", gate=gate), KVKey("other")  # type: ignore[call-arg]
    store = Store()

    async def scenario() -> bool:
        async with watching(store, key, other) as watcher:
            parsed = asyncio.create_task(watcher.absorb(key, QueryResult(5, "held: v", body=LONG)))
            await asyncio.sleep(0.05)
            watcher.watch(keyed(other))  # the template no longer uses the key
            gate.set()
            return await parsed

    assert asyncio.run(scenario()) is False
    assert key.key not in store.keys and store.failing() == 0


def test_a_key_dropped_before_its_turn_on_the_parse_thread_is_not_parsed_nor_reported() -> None:
    """A review of the parse thread: a key dropped while its long answer waited behind another's
    parse was parsed all the same (23 s for nobody at 200,000 instances)."""
    gate, threads = threading.Event(), list[str]()
    big, dropped = HeldKey("big", gate=gate), HeldKey("cfg", threads=threads)
    store = Store()

    async def scenario() -> bool:
        async with watching(store, big, dropped) as watcher:
            first = asyncio.create_task(watcher.absorb(big, QueryResult(5, "held: big", body=LONG)))
            await asyncio.sleep(0.05)  # the big one is being parsed …
            queued = asyncio.create_task(watcher.absorb(dropped, QueryResult(9, "v", body=LONG)))
            await asyncio.sleep(0.05)
            watcher.watch(keyed(big))  # … when the template stops reading `cfg`
            gate.set()
            await first
            return await queued

    assert asyncio.run(scenario()) is False
    assert threads == [] and store.failing() == 0 and dropped.key not in store.keys


def test_a_sweep_answer_parsed_while_an_older_one_was_put_is_kept() -> None:
    """With the sweeper's `seen`, the newer of two answers was dropped when it came second."""
    gate = threading.Event()
    key = HeldKey("k", gate=gate)
    store = Store()

    async def scenario() -> bool:
        async with watching(store, key) as watcher:
            seen = store.seen(key.key)
            newer = asyncio.create_task(watcher.absorb(key, QueryResult(200, "held: v200", body=LONG), seen))
            await asyncio.sleep(0.05)
            await watcher.absorb(key, QueryResult(150, "v150", body="short"))
            gate.set()
            return await newer

    assert asyncio.run(scenario()) is True
    assert store.get(key.key) == (True, "held: v200") and store.state(key.key).index == 200


def test_the_parse_thread_never_holds_the_process_exit() -> None:
    gate = threading.Event()
    key = HeldKey("k", gate=gate)

    async def scenario() -> None:
        watcher = Watcher(Agent({}), Store(), SETTINGS)
        watcher.watch(keyed(key))
        parsed = asyncio.create_task(watcher.absorb(key, QueryResult(5, "held: v", body=LONG)))
        await asyncio.sleep(0.05)
        await watcher.stop()
        parsed.cancel()
        await asyncio.gather(parsed, return_exceptions=True)

    asyncio.run(scenario())
    parsing = [t for t in threading.enumerate() if t.name.startswith("consul-parse") and t.is_alive()]
    gate.set()
    assert parsing and all(t.daemon for t in parsing)


def decoding_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads the client's JSON decodes run on, from now on."""
    import json

    from renderer.source import client

    names: list[str] = []
    real = json.loads

    def loads(text: str) -> Any:
        names.append(threading.current_thread().name)
        return real(text)

    monkeypatch.setattr(client.json, "loads", loads)
    return names


def test_a_long_answer_is_decoded_on_the_parse_thread_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The JSON decode of a long answer runs where its parse runs: 45 MB held the loop ~1 s."""
    import json

    from renderer.source import client

    decoded_on = decoding_threads(monkeypatch)
    big = HeldKey("big", threads=[])
    body = json.dumps("y" * PARSE_AWAY_CHARS)
    store = Store()

    async def scenario() -> None:
        agent = Agent({"/v1/kv/big": (0.0, QueryResult(3, client.UNDECODED, body=body))})
        async with watching(store, big, agent=agent):
            async with asyncio.timeout(GATE_S):
                while not store.get(big.key)[0]:
                    await asyncio.sleep(0.005)

    asyncio.run(scenario())
    assert store.get(big.key) == (True, "y" * PARSE_AWAY_CHARS)
    assert decoded_on and all(name.startswith("consul-parse") for name in decoded_on), decoded_on


def test_a_long_answer_that_does_not_decode_keeps_the_last_value_and_ends_nothing() -> None:
    from renderer.source import client

    key = KVKey("deep")
    store = Store()
    store.put(key.key, "before", 1)

    async def scenario() -> None:
        async with watching(store, key) as watcher:
            bad = QueryResult(3, client.UNDECODED, body="[" * 100_000)
            assert not await watcher.absorb(key, bad)

    asyncio.run(scenario())
    assert store.get(key.key) == (True, "before") and store.state(key.key).error is not None


def test_a_too_large_answer_older_than_the_one_served_says_nothing() -> None:
    """A review: a sweep's read overtaken by a newer, fitting answer came back too large, and the
    key was then reported as "its last answer is served" until it changed again."""
    from renderer.source.client import TooLarge

    key = KVKey("k")
    store = Store()
    store.put(key.key, "fresh", 170)

    async def scenario() -> None:
        async with watching(store, key) as watcher:
            watcher.refuse(key, TooLarge("Consul's answer for /v1/kv/k is over max_answer_bytes", 160))
            assert store.refused_among([key.key]) == {} and store.state(key.key).index == 170
            watcher.refuse(key, TooLarge("Consul's answer for /v1/kv/k is over max_answer_bytes", 180))
            assert "its last answer is served" in store.refused_among([key.key])[key.key]
            assert watcher.read_pause(key.key) > 0  # a sweep reads it whole again only after a pause

    asyncio.run(scenario())


def test_too_large_answers_landing_together_pause_the_key_once() -> None:
    """A CI run: under load, reads of one too-large service begun together (a located change, the
    safety sweep, a re-read after a pause) came back together, each doubled the pause, and it
    reached a minute: the service, once it fitted again, waited that long to be read."""
    from renderer.source.client import TooLarge

    key = KVKey("k")
    store = Store()
    store.put(key.key, "served", 100)

    async def scenario() -> None:
        async with watching(store, key) as watcher:
            for index in range(101, 107):  # six answers at once
                watcher.refuse(key, TooLarge("Consul's answer for /v1/kv/k is over max_answer_bytes", index))
            assert 0.5 < watcher.read_pause(key.key) <= 1.0  # the first pause: 1 s
            watcher._oversize_reads[key.key] = (time.monotonic(), 1)  # that pause is over
            watcher.refuse(key, TooLarge("Consul's answer for /v1/kv/k is over max_answer_bytes", 108))
            assert 1.5 < watcher.read_pause(key.key) <= 2.0  # the next one in a row: doubled

    asyncio.run(scenario())


def test_a_trigger_that_fits_again_is_no_longer_too_large_and_says_so_next_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A review: a health trigger's oversize mark was never cleared (it is in no store), and the
    next episode said nothing."""
    from renderer.source.client import TooLarge
    from renderer.source.dependency import HealthState

    trigger = HealthState("critical")
    store = Store()

    async def scenario() -> None:
        async with watching(store) as watcher:
            for _ in range(2):
                watcher.refuse(trigger, TooLarge("Consul's answer for /v1/health/state/critical is too big", 5))
                assert trigger.key in store.oversize and watcher.read_pause(trigger.key) > 0
                watcher._fits(trigger.key)  # it answered within the limit
                assert trigger.key not in store.oversize and watcher.read_pause(trigger.key) == 0

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert sum("waiting for an answer that fits" in r.getMessage() for r in caplog.records) == 2


def test_a_long_trigger_answer_is_decoded_on_the_parse_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: the health triggers' answers were still decoded on the loop (many long critical
    checks under the limit stalled it)."""
    import json

    from renderer.source import client
    from renderer.source.dependency import HealthState

    decoded_on = decoding_threads(monkeypatch)
    checks = [{"Node": "n", "CheckID": f"c{i}", "ServiceName": "s", "Status": "critical", "Output": "x" * 1000}
              for i in range(80)]  # fmt: skip
    body = json.dumps(checks)
    assert len(body) >= PARSE_AWAY_CHARS

    async def scenario() -> Any:
        async with watching(Store()) as watcher:
            return await watcher._trigger_facts(HealthState("critical"), QueryResult(3, client.UNDECODED, body=body))

    found = asyncio.run(scenario())
    assert found is not None and len(found) == 80
    assert decoded_on and all(name.startswith("consul-parse") for name in decoded_on), decoded_on
