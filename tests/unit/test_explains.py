"""Which of the catalog's moves the followed services' answers show: `unexplained` judges many
moves in one pass over the services, and must agree with the rule for one move taken move by move."""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import SimpleNamespace

from renderer.source.dependency import CatalogServices, Dependency, HealthService
from renderer.source.store import Store
from renderer.source.sweep import explains, unexplained


def shows(store: Store, wanted: Sequence[Dependency], index: int) -> bool:
    """The rule for one move as `explains` said it before `unexplained` (dcac70a), service by service."""
    if index <= 0:
        return False
    for dep in wanted:
        state = store.keys.get(dep.key)
        if state is None or not isinstance(dep, HealthService) or state.index < index:
            continue
        if index in state.answers:
            return True
        if state.value and any(instance.changed_at == index for instance in state.value):
            return True
    return False


def random_store(rng: random.Random) -> tuple[Store, list[Dependency]]:
    store, wanted = Store(), list[Dependency]()
    for s in range(rng.randint(0, 12)):
        dep = HealthService(f"svc-{s}")
        wanted.append(dep)
        index = 0
        for _ in range(rng.randint(0, 10)):  # answers, some empty, some at an index gone backwards
            index = max(1, index + rng.randint(-3, 6))
            count = rng.choice((0, 1, 3))
            # A ModifyIndex past its answer's index is hostile input (no Consul sends it): judged the same.
            instances = tuple(SimpleNamespace(changed_at=rng.randint(1, index + 3)) for _ in range(count))
            store.put(dep.key, instances, index)
    wanted.append(CatalogServices())  # not a service: shows nothing
    store.put(CatalogServices().key, {"x": []}, 40)
    return store, wanted


def test_one_pass_agrees_with_the_rule_move_by_move() -> None:
    rng = random.Random(20261206)
    for _ in range(3000):
        store, wanted = random_store(rng)
        indexes = {rng.randint(-2, 60) for _ in range(rng.randint(0, 20))}
        expected = {index for index in indexes if not shows(store, wanted, index)}
        assert unexplained(store, wanted, indexes) == expected
        assert all(explains(store, wanted, index) is (index not in expected) for index in indexes)


def test_nothing_to_judge_is_nothing_unexplained() -> None:
    store = Store()
    assert unexplained(store, [HealthService("a")], set()) == set()
    assert unexplained(store, [], {0, -1, 5}) == {0, -1, 5}
