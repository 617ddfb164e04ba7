"""An instance registered again under another name: the old service's answer, which Consul leaves at
its index, is found stale and read again (claims.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from renderer.source.claims import Claims
from renderer.source.dependency import HealthService, ServiceInstance
from renderer.source.watch import Store, Watcher, WatchSettings
from tests.helpers import Pace
from tests.unit.fakes import keyed
from tests.unit.test_watch_budget import FakeCatalog, eventually


def instance(service: str, node: str = "n1", ident: str = "i1", changed_at: int = 5) -> ServiceInstance:
    return ServiceInstance(node, ident, service, "10.0.0.1", 80, datacenter="dc1", changed_at=changed_at)


def test_the_older_copy_of_an_instance_in_another_service_is_stale() -> None:
    claims = Claims()
    assert claims.update("health.service(api)", "api", [instance("api", changed_at=35)]) == set()
    assert claims.update("health.service(web)", "web", [instance("web", changed_at=36)]) == {"health.service(api)"}
    # Read again without the instance: nothing held twice any more.
    assert claims.update("health.service(api)", "api", []) == set()
    assert claims.update("health.service(web)", "web", [instance("web", changed_at=36)]) == set()
    # The old service's answer coming after the new one's (its first, or a stale one) is the stale one.
    assert claims.update("health.service(api)", "api", [instance("api", changed_at=35)]) == {"health.service(api)"}
    # The same instances again (a check's status changed) are not compared again.
    assert claims.update("health.service(api)", "api", [instance("api", changed_at=35)]) == set()


def test_the_same_service_through_two_keys_or_other_instances_is_no_conflict() -> None:
    claims = Claims()
    claims.update("health.service(api)", "api", [instance("api", changed_at=35)])
    assert claims.update("health.service(api|tag=v2)", "api", [instance("api", changed_at=35)]) == set()
    assert claims.update("health.service(web)", "web", [instance("web", node="n2", changed_at=40)]) == set()
    assert claims.update("health.service(db)", "db", [instance("db", ident="i2", changed_at=40)]) == set()
    other_dc = ServiceInstance("n1", "i1", "dc2svc", "10.0.0.1", 80, datacenter="dc2", changed_at=50)
    assert claims.update("health.service(dc2svc)", "dc2svc", [other_dc]) == set()


def test_an_unknown_modify_index_or_a_dropped_key_is_never_taken_as_stale() -> None:
    claims = Claims()
    claims.update("health.service(api)", "api", [instance("api", changed_at=0)])
    assert claims.update("health.service(web)", "web", [instance("web", changed_at=36)]) == set()
    claims.drop("health.service(web)")
    claims.update("health.service(db)", "db", [instance("db", changed_at=0)])
    assert claims.update("health.service(web)", "web", [instance("web", changed_at=37)]) == set()
    claims.drop("health.service(api)")
    claims.drop("health.service(db)")
    claims.update("health.service(web)", "web", [instance("web", changed_at=37)])
    # The unreadable entry's empty node and ID are no instance.
    empty = ServiceInstance("", "", "api", "", 0, changed_at=99, unsafe="unreadable")
    assert claims.update("health.service(api)", "api", [empty]) == set()


def entry(name: str, node: str, ident: str, port: int, modified: int) -> dict[str, Any]:
    return {
        "Node": {"Node": node, "Address": "10.0.0.1", "Datacenter": "dc1"},
        "Service": {"ID": ident, "Service": name, "Port": port, "ModifyIndex": modified},
        "Checks": [],
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("max_connections", "new_name_watched"),
    [(64, True), (16, True), (16, False)],
    ids=["precise", "budgeted-hot", "budgeted-hot-to-an-unwatched-name"],
)
def test_a_service_with_its_own_query_lets_go_of_an_instance_renamed_away(
    pace: Pace, max_connections: int, new_name_watched: bool
) -> None:
    """helper-118's finding left open (/tmp/rev65): a service with a blocking query of its own
    (precise mode; a hot one past the budget) kept serving an instance registered again under
    another name until its wait ran out twice: Consul does not move the old service's index. The new
    name's answer shows the instance written later: the old service is read again at once. A new
    name no template watches (helper-119's finding 3, /tmp/rev66: 29.6 s at a 15 s wait): past the
    budget the summaries name the old service for the catalog's move, its own answer does not come,
    and it is read whole (`Sweeper._own_answers_explain`)."""

    async def scenario() -> None:
        catalog = FakeCatalog(20)
        settings = WatchSettings(min_gap_s=0.0, max_connections=max_connections, block_wait_s=30.0)
        store = Store()
        watcher = Watcher(catalog, store, settings)
        target, renamed = HealthService("svc-0007"), HealthService("renamed")
        others = [HealthService(name) for name in catalog.services if name != target.name]
        try:
            two = [entry(target.name, "n1", "a", 8080, 10), entry(target.name, "n2", "b", 8081, 10)]
            await catalog.change(target.name, two)
            watcher.watch(keyed(target, *([renamed] if new_name_watched else []), *others))
            await eventually(lambda: len(store.get(target.key)[1] or ()) == 2, pace(5.0))
            assert watcher.budgeted == (max_connections == 16)
            if watcher.budgeted:  # a change makes it hot: a blocking query of its own
                await catalog.change(target.name, [*two, entry(target.name, "n3", "c", 8082, catalog.index + 1)])
                await eventually(lambda: target.key in watcher._polls, pace(5.0))
                await eventually(lambda: len(store.get(target.key)[1]) == 3, pace(5.0))
            await asyncio.sleep(0.3)  # its query held
            async with catalog.moved:  # `b` registered again as `renamed`: svc-0007's index stays
                catalog.index += 1
                catalog.services[target.name] = [e for e in catalog.services[target.name] if e["Service"]["ID"] != "b"]
                catalog.services["renamed"] = [entry("renamed", "n2", "b", 8081, catalog.index)]
                catalog.service_index["renamed"] = catalog.index
                catalog.moved.notify_all()
            if new_name_watched:
                await eventually(lambda: len(store.get(renamed.key)[1] or ()) == 1, pace(5.0))
            await eventually(lambda: "b" not in {i.id for i in store.get(target.key)[1]}, pace(5.0))
        finally:
            await watcher.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_asks_to_read_a_failing_service_again_share_one_loop(pace: Pace) -> None:
    """helper-119 (/tmp/rev66, loops.py): each ask started a loop of its own, retrying for as long as
    the service's reads failed (a proxy's 502 for that path alone): 50 writes of the attacker's
    service, 50 loops, 249 failed reads in 5 s. One loop per service; an ask while it runs is one
    more read."""
    from renderer.source.client import ConsulRequestError, QueryResult

    class Proxy(FakeCatalog):
        failing = False

        async def get(self, path: str, params: Any = None, *args: Any, **kw: Any) -> QueryResult:
            if self.failing and path.endswith("/svc-0001"):
                raise ConsulRequestError(f"Consul answered 502 for {path}", status=502)
            return await super().get(path, params, *args, **kw)

    async def scenario() -> None:
        catalog = Proxy(5)
        catalog.services["svc-0001"] = [entry("svc-0001", "n1", "x", 80, 10), entry("svc-0001", "n2", "z", 81, 10)]
        store = Store()
        watcher = Watcher(catalog, store, WatchSettings(min_gap_s=0.0, block_wait_s=30.0, backoff_max_s=0.5))
        victim = HealthService("svc-0001")
        deps = [HealthService(name) for name in catalog.services]
        try:
            watcher.watch(keyed(*deps, HealthService("att")))
            await eventually(lambda: all(store.get(dep.key)[0] for dep in deps), pace(5.0))
            catalog.failing = True
            catalog.services["svc-0001"] = catalog.services["svc-0001"][1:]  # `x` gone, the index as it was
            for k in range(10):  # `x` written again under `att` each time: newer than the victim's copy
                await catalog.change("att", [entry("att", "n1", "x", 80, 11 + k)])
                await asyncio.sleep(0.05)
            loops = [task for task in asyncio.all_tasks() if task.get_name() == "watch whole re-read"]
            assert len(loops) == 1
            catalog.failing = False
            await eventually(lambda: [i.id for i in store.get(victim.key)[1]] == ["z"], pace(5.0))
            await eventually(lambda: not any(t.get_name() == "watch whole re-read" for t in asyncio.all_tasks()))
        finally:
            await watcher.stop()

    asyncio.run(scenario())


def test_a_whole_re_read_stopped_before_its_first_step_lets_its_service_go() -> None:
    """helper-121 (/tmp/rev67, whole_books.py d): a re-read task cancelled before it ran left its key
    marked as being read, and no later ask would have read it."""

    async def scenario() -> dict[str, bool]:
        catalog = FakeCatalog(3)
        watcher = Watcher(catalog, Store(), WatchSettings(min_gap_s=0.0, block_wait_s=30.0))
        dep = HealthService("svc-0001")
        watcher.watch(keyed(dep))
        watcher._sweeper.read_whole([dep])
        await watcher.stop()
        await asyncio.sleep(0)  # the done callbacks
        return watcher._sweeper._whole

    assert asyncio.run(scenario()) == {}
