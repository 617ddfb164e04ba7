"""The Store: what it keeps, and from when a change's latency counts."""

from __future__ import annotations

import pytest


def test_latency_counts_from_the_first_sign_of_a_change_not_from_its_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalog trigger's move is the first sign; the service read later carries that time. Signs
    are matched by index: a change's answer at index N is timed from the first move told of at N or
    past it (seen after that write, so never before it). A second move's change read with the
    first's (folded reads, one sweep) is timed from its own trigger (helper-112's finding 4)."""
    import time as clock

    from renderer.source.store import SIGN_VALID_S, Store

    now = [100.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    store.sign(7)
    now[0] = 100.2
    store.sign(8)  # a second move before the read
    store.sign(7)  # the same move told again (another trigger): the first time stands
    now[0] = 100.5
    assert store.put("health.service(web)", ["a"], 7)
    assert store.last_change == 100.0
    assert not store.put("health.service(web)", ["a"], 7)  # the same data: no change, no figure
    assert store.put("health.service(api)", ["x"], 8)  # the second move's change, read with the first's
    assert store.last_change == 100.2
    now[0] = 101.0
    assert store.put("health.service(web)", ["a", "b"], 9)  # no move told of at 9 or past it: its read
    assert store.last_change == 101.0
    store.sign(10)
    now[0] += SIGN_VALID_S + 1  # a sign nothing read for that long is not this change's start
    assert store.put("health.service(web)", ["b"], 10)
    assert store.last_change == now[0]


def test_a_move_of_a_service_nobody_follows_never_times_a_later_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-117 (/tmp/rev64, signs_churn.py): a service no template follows re-registering every
    0.05 s signed at each move, and the watched change, a few ms old, was timed from one of those:
    741-992 ms. An earlier move at a lower index is no sign of a change at a higher one."""
    import time as clock

    from renderer.source.store import Store

    now = [200.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    for index in range(50, 70):  # the other registrant's moves, 0.05 s apart
        store.sign(index)
        now[0] += 0.05
    store.sign(70)  # the watched service's own move, told at once
    told = now[0]
    now[0] += 0.004
    assert store.put("health.service(web)", ["new"], 70)
    assert store.last_change == told


def test_a_restore_forgets_the_signs_whose_indexes_no_longer_compare(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as clock

    from renderer.source.store import Store

    now = [300.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    store.sign(900)  # before the restore
    store.restored()
    now[0] = 302.0
    assert store.put("health.service(web)", ["restored"], 40)  # an index lower than any before
    assert store.last_change == 302.0


def test_a_change_at_no_index_past_the_one_held_is_timed_from_its_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-118 (/tmp/rev65): a refusal served empty (index 0) took the oldest sign, up to 10 s
    before; an answer at an index gone backwards (a restore, seen before the catalog trigger saw it)
    took a sign from before the restore; an instance registered again under another name leaves
    its old service's index as it was (Consul 1.8.7), and that service's next answer took its own
    earlier move. None of them matches a move: each is timed from its read."""
    import time as clock

    from renderer.source.store import Store

    now = [400.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    store = Store()
    store.sign(35)
    now[0] = 401.0
    assert store.put("health.service(api)", ["api1", "api2"], 35)
    assert store.last_change == 400.0
    store.sign(36)  # the rename's write: another service's
    now[0] = 402.0
    assert store.put("health.service(api)", ["api2"], 35)  # api1 gone, api's index as it was
    assert store.last_change == 402.0
    now[0] = 403.0
    assert store.put("health.service(refused)", [], 0)
    assert store.last_change == 403.0
    now[0] = 404.0
    assert store.put("health.service(api)", ["restored"], 20)  # lower: a restore
    assert store.last_change == 404.0


def test_the_oldest_change_of_some_keys_since_a_generation_and_none_when_the_log_is_overrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where an apply's latency begins (`first_told`): the oldest first sign among the changes of the
    keys its render read since the last render delivered; a key nobody read does not count (None:
    the apply carries no Consul change), and when that is not known (no render delivered yet, a log
    that no longer reaches back) the latest change of any key."""
    import time as clock

    from renderer.source import store as module
    from renderer.source.store import Store

    now = [200.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])
    monkeypatch.setattr(module, "CHANGE_LOG", 4)
    store = Store()
    assert store.put("a", 1, 1)
    delivered = store.generation
    now[0] = 201.0
    store.sign(3)  # a trigger told of the change at 3 before it was read
    now[0] = 202.0
    assert store.put("b", 1, 2)  # the move told of at 3 came after this write: timed from it (201)
    now[0] = 203.0
    assert store.put("c", 1, 4)
    assert store.first_told({"a", "b", "c"}, delivered) == 201.0
    assert store.first_told({"c"}, delivered) == 203.0
    assert store.first_told({"z"}, delivered) is None and store.first_told({"a"}, None) == 203.0
    assert store.first_told({"c"}, store.generation) is None  # nothing since
    store.forget("a")
    for index in range(5, 8):
        now[0] += 1
        assert store.put("c", index, index)
    assert store.first_told({"c"}, delivered) == now[0] == store.last_change  # the log (4) no longer reaches back
