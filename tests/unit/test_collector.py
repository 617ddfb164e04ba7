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


def frozen_then_garbage(collector: Collector) -> weakref.ref[Node]:
    """A reference cycle frozen by a cycle's collection while alive, garbage once this returns."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    collector.after_cycle()  # frozen while alive
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
    assert collector.due_at() == 130.0, "the idle freeze comes first (30 s); the full collection at 700"


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
    ref = frozen_then_garbage(collector)
    collector.after_cycle()
    assert ref() is not None, "frozen: the collections after a cycle do not see it"
    clock.now = 700.0
    collector.full()
    assert ref() is None
    assert gc.get_freeze_count() > 0, "frozen again after the full collection"
    assert collector.due_at() == 730.0


def test_off_touches_nothing() -> None:
    collector = Collector(enabled=False)
    collector.after_cycle()
    collector.full()
    assert gc.get_freeze_count() == 0 and collector.due_at() is None


def test_a_full_collection_due_while_changes_never_stop_is_done_by_the_next_cycle() -> None:
    """Under changes without an idle moment the loop's timer never fires: the cycle does it."""
    clock = Clock()
    collector = Collector(full_every_s=600, clock=clock)
    ref = frozen_then_garbage(collector)
    clock.now = 699.0
    collector.after_cycle()
    assert ref() is not None, "not due yet"
    clock.now = 700.0
    collector.after_cycle()
    assert ref() is None and collector.due_at() == 730.0


def test_idle_the_loop_freezes_what_arrived_since_the_last_freeze_and_nothing_more() -> None:
    """Expiries, member reads and check updates leave objects while no change comes: collected and
    frozen while idle, not by the first change after it. A frozen cycle that became garbage waits
    for the full collection (the idle freeze is not one)."""
    clock = Clock()
    collector = Collector(full_every_s=600, freeze_every_s=30, clock=clock)
    frozen_garbage = frozen_then_garbage(collector)
    clock.now = 130.0
    arrived = [Node() for _ in range(1000)]  # what idle work left alive
    left = cycle()  # … and left as garbage
    before = gc.get_freeze_count()
    collector.idle()
    assert left() is None, "idle garbage collected"
    assert gc.get_freeze_count() >= before + len(arrived), "what lives is frozen"
    assert frozen_garbage() is not None, "not a full collection"
    assert collector.due_at() == 160.0
    clock.now = 700.0
    collector.idle()  # the full collection is due: it is the one done
    assert frozen_garbage() is None and collector.due_at() == 730.0


def test_a_cycle_after_the_idle_freeze_is_due_is_not_a_full_collection() -> None:
    clock = Clock()
    collector = Collector(full_every_s=600, freeze_every_s=30, clock=clock)
    frozen_garbage = frozen_then_garbage(collector)
    clock.now = 200.0  # past the idle freeze's time, well before the full one
    collector.after_cycle()
    assert frozen_garbage() is not None and collector.due_at() == 230.0


def test_a_full_collection_comes_early_once_the_process_has_doubled() -> None:
    """helper-134 (/tmp/rev80): reference cycles that became garbage while frozen waited for the full
    collection 10 minutes on (740 MB). Once the process has grown to twice its size after the last
    full one (from FULL_WHEN_RSS_FROM at least), the next cycle does a full one. The size is asked
    cheaply: `gc.get_freeze_count()` walks every frozen object (a first version asked it after each
    cycle, and the bench's removals at 1,000 × 10 took ~35 ms longer)."""
    from renderer.loop.collector import FULL_WHEN_RSS_FROM

    clock, size = Clock(), [0]
    collector = Collector(full_every_s=600, clock=clock)
    collector.after_cycle()  # the first: a full one
    collector.memory = lambda: size[0]
    collector.memory_after_full = 400_000_000
    ref = frozen_then_garbage(collector)
    clock.now = 150.0
    size[0] = 799_999_999
    collector.after_cycle()
    assert ref() is not None, "not doubled yet"
    size[0] = 800_000_000
    collector.after_cycle()
    assert ref() is None and collector.last_full == 150.0 and collector.memory_after_full == 800_000_000
    collector.memory_after_full = 1000  # a small process: doubled from the floor only
    size[0] = 2 * FULL_WHEN_RSS_FROM - 1
    clock.now = 160.0
    collector.after_cycle()
    assert collector.last_full == 150.0
    assert Collector().memory() > 0  # this process's resident size
