"""Collector: the garbage collector's long runs after a cycle and when idle, never on a change."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from renderer.loop.collector import Collector


class Node:
    """An object that can take part in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A reference cycle nobody else refers to (only the collector frees it); a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process's collector as it was


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_cycle_freezes_what_lives_and_sets_the_full_collection_timer() -> None:
    clock = Clock()
    collector = Collector(full_every_s=600, clock=clock)
    assert collector.due_at() is None, "nothing frozen yet: no timer"
    kept = [Node() for _ in range(1000)]
    collector.after_cycle()
    assert gc.get_freeze_count() >= len(kept)
    assert collector.due_at() == 700.0


def test_garbage_a_cycle_leaves_is_collected_before_the_freeze() -> None:
    collector = Collector()
    collector.after_cycle()
    left = cycle()  # made by "the next change"
    assert left() is not None
    collector.after_cycle()
    assert left() is None, "collected, not frozen with the living"


def test_a_frozen_cycle_that_becomes_garbage_is_freed_by_the_next_full_collection() -> None:
    clock = Clock()
    collector = Collector(full_every_s=600, clock=clock)
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    collector.after_cycle()  # frozen while alive
    del a, b
    collector.after_cycle()
    assert ref() is not None, "frozen: the collections after a cycle do not see it"
    clock.now = 700.0
    collector.full()
    assert ref() is None
    assert gc.get_freeze_count() > 0, "frozen again after the full collection"
    assert collector.due_at() == 1300.0


def test_off_touches_nothing() -> None:
    collector = Collector(enabled=False)
    collector.after_cycle()
    collector.full()
    assert gc.get_freeze_count() == 0 and collector.due_at() is None


def test_a_full_collection_due_while_changes_never_stop_is_done_by_the_next_cycle() -> None:
    """Under changes without an idle moment the loop's timer never fires: the cycle does it."""
    clock = Clock()
    collector = Collector(full_every_s=600, clock=clock)
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    collector.after_cycle()
    del a, b
    clock.now = 699.0
    collector.after_cycle()
    assert ref() is not None, "not due yet"
    clock.now = 700.0
    collector.after_cycle()
    assert ref() is None and collector.due_at() == 1300.0
