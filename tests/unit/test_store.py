"""The Store: what it keeps, and from when a change's latency counts."""

from __future__ import annotations

import pytest


def test_latency_counts_from_the_first_sign_of_a_change_not_from_its_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog trigger's move is the first sign; the service read later carries that time. Each
    move's sign is taken by one change, oldest first: a second move's change read with the first's
    (folded reads, one sweep) is timed from its own trigger, not from its read (helper-112's
    finding 4)."""
    import time as clock

    from renderer.source.store import SIGN_VALID_S, Store

    now = [100.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    store.sign()
    now[0] = 100.2
    store.sign()  # a second move before the read
    now[0] = 100.5
    assert store.put("health.service(web)", ["a"], 7)
    assert store.last_change == 100.0 and store.first_sign == 100.2
    assert not store.put("health.service(web)", ["a"], 7)  # the same data: no change takes a sign
    assert store.put("health.service(api)", ["x"], 7)  # the second move's change, read with the first's
    assert store.last_change == 100.2 and store.first_sign is None
    now[0] = 101.0
    assert store.put("health.service(web)", ["a", "b"], 8)  # no sign: its own answer is the first
    assert store.last_change == 101.0
    store.sign()
    now[0] += SIGN_VALID_S + 1  # a sign nothing read for that long is not this change's start
    assert store.put("health.service(web)", ["b"], 9)
    assert store.last_change == now[0]


def test_a_read_that_explains_its_moves_leaves_the_signs_of_newer_ones() -> None:
    """A located read explains the moves told of when it began: their signs go, a newer move's stays
    (it is still to be read, and timed from its trigger)."""
    from renderer.source.store import Store

    store = Store()
    store.sign()
    store.sign()
    began = store.latest_sign
    store.sign()  # told of while the read ran
    newer = store.latest_sign
    store.signs_read(through=began)
    assert list(store.signs) == [newer]
    store.signs_read()
    assert store.first_sign is None
