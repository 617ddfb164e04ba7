"""The Store: what it keeps, and from when a change's latency counts."""

from __future__ import annotations

import pytest


def test_latency_counts_from_the_first_sign_of_a_change_not_from_its_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog trigger's move is the first sign; the service read later carries that time."""
    import time as clock

    from renderer.source.store import SIGN_VALID_S, Store

    now = [100.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    store.sign()
    now[0] = 100.2
    store.sign()  # a second move before the read: the first sign stands
    now[0] = 100.5
    assert store.put("health.service(web)", ["a"], 7)
    assert store.last_change == 100.0 and store.first_sign is None
    now[0] = 101.0
    assert store.put("health.service(web)", ["a", "b"], 8)  # no sign: its own answer is the first
    assert store.last_change == 101.0
    store.sign()
    now[0] += SIGN_VALID_S + 1  # a sign nothing read for that long is not this change's start
    assert store.put("health.service(web)", ["b"], 9)
    assert store.last_change == now[0]
