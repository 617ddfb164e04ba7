"""The watcher's own logic against a fake client (our seam), never a fake Consul in integration tests."""

from __future__ import annotations

import asyncio
from typing import Any

from renderer.consul_client import ConsulRequestError, QueryResult
from renderer.dependency import KVKey
from renderer.watch import Store, Watcher, WatchSettings


class FakeClient:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[int] = []

    async def get(
        self, path: str, params: Any, index: int, wait_s: float, stale: bool = False, known_index: int = 0
    ) -> QueryResult:
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
    watcher = Watcher(client, store, settings)  # type: ignore[arg-type]
    watcher.watch([KVKey("k")])
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

    async def go() -> None:
        watcher = Watcher(client, store, WatchSettings(backoff_base_s=0.001))  # type: ignore[arg-type]
        watcher.watch([KVKey("k")])
        await asyncio.wait_for(store.changed.wait(), 5)
        await watcher.stop()

    asyncio.run(go())
    assert store.fatal is not None and store.fatal.status == 403  # type: ignore[attr-defined]


def test_equal_data_signals_no_change() -> None:
    store = Store()
    assert store.put("k", (1, 2), 5)
    store.changed.clear()
    assert not store.put("k", (1, 2), 6)
    assert not store.changed.is_set()


def test_a_key_that_answers_again_ends_the_backoff_of_the_others() -> None:
    """After an outage (a leader election), nobody keeps sleeping off the backoff it built up."""

    class Outage:
        def __init__(self) -> None:
            self.down = True
            self.calls: dict[str, int] = {}

        async def get(
            self, path: str, params: Any, index: int, wait_s: float, stale: bool = False, known_index: int = 0
        ) -> QueryResult:
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
        watcher = Watcher(client, store, settings)  # type: ignore[arg-type]
        watcher.watch([KVKey("a"), KVKey("b")])
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
    assert asyncio.run(asyncio.wait_for(scenario(), 60)) < 0.3
