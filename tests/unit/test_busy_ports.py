"""A port another program held is taken by a catalog listener only once it has stayed free
(helper-142's and helper-144's general fix: a try that fell in a daemon's restart took its port)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from renderer.deliver.busy_ports import FREE_FOR_S, BusyPorts
from renderer.deliver.quarantine import repair
from renderer.errors import ValidationError
from renderer.haproxy.control import IN_USE, check_new_binds


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_port_seen_held_is_refused_until_seen_free_twice_far_enough_apart() -> None:
    clock = Clock()
    busy = BusyPorts(clock=clock)
    assert busy.judge("listen", 5432, True) == IN_USE
    clock.now += 5  # the daemon restarts: free for a moment
    why = busy.judge("listen", 5432, False)
    assert why is not None and "was held by another process 5 s ago" in why and "240 s" in why
    clock.now += FREE_FOR_S - 1
    assert busy.judge("listen", 5432, False) is not None  # not free long enough
    clock.now += 1
    assert busy.judge("listen", 5432, False) is None  # free for FREE_FOR_S: the program is gone
    assert busy.seen == {}
    assert busy.judge("listen", 5432, False) is None


def test_a_sighting_of_the_port_held_between_two_free_ones_starts_the_wait_again() -> None:
    """Free at a restart, held once the daemon is back, free at the next restart: never taken."""
    clock = Clock()
    busy = BusyPorts(clock=clock)
    busy.judge("listen", 6379, True)
    for _ in range(5):  # restarts a little over FREE_FOR_S apart, each probed
        clock.now += 2
        assert busy.judge("listen", 6379, False) is not None
        clock.now += FREE_FOR_S
        assert busy.judge("listen", 6379, True) == IN_USE


def test_staggered_registrations_during_a_restart_take_nothing() -> None:
    """helper-142's twelve registrations 5 s apart, each a new section probed at once: the first
    saw the port held, the ones during the restart see it free, and none may bind it."""
    clock = Clock()
    busy = BusyPorts(clock=clock)
    answers = []
    for second in range(0, 60, 5):
        clock.now += 5
        answers.append(busy.judge("listen", 8080, not 20 <= second < 27))
    assert all(answer is not None for answer in answers)


def test_a_frontend_and_a_port_never_seen_held_are_judged_by_the_probe_alone() -> None:
    """The template's own frontend cannot be left out (the whole file would be rejected)."""
    clock = Clock()
    busy = BusyPorts(clock=clock)
    assert busy.judge("frontend", 80, True) == IN_USE
    clock.now += 1
    assert busy.judge("frontend", 80, False) is None
    assert busy.judge("listen", 9000, False) is None
    assert list(busy.seen) == [80]  # a listener asking for it later still waits


def test_the_memory_outlives_a_restart_and_its_file_is_checked(tmp_path: Path) -> None:
    """A reboot with HAProxy up before the daemon: the port seen held before is not taken at once."""
    clock = Clock()
    destination = tmp_path / "haproxy.cfg"
    busy = BusyPorts.for_destination(destination, clock)
    busy.judge("listen", 5432, True)
    kept = destination.with_name(".haproxy.cfg.busy-ports.json")
    assert json.loads(kept.read_text()) == {"5432": [clock.now, None]}
    clock.now += 600
    again = BusyPorts.for_destination(destination, clock)
    assert again.judge("listen", 5432, False) is not None
    clock.now += FREE_FOR_S
    assert BusyPorts.for_destination(destination, clock).judge("listen", 5432, False) is None
    assert not kept.exists()  # nothing left to remember

    hostile = {
        "0": [clock.now, None],
        "65536": [clock.now, None],
        "+22": [clock.now, None],
        "22": [True, None],
        "25": [clock.now + 10, None],  # in the future
        "80": [10**400, None],
        "110": [clock.now - 31 * 86400, None],  # forgotten
        "443": [clock.now - 10, clock.now + 5],  # free_since in the future: not free yet
        "5000": [clock.now - 10, "x"],
        "6000": "nonsense",
    }
    kept.write_text(json.dumps(hostile))
    read = BusyPorts.for_destination(destination, clock)
    assert sorted(read.seen) == [443, 5000]
    assert read.seen[443].free_since is None and read.seen[5000].free_since is None
    kept.write_text("[" * 100_000)
    assert BusyPorts.for_destination(destination, clock).seen == {}


def test_a_held_port_seen_again_and_again_is_not_written_each_time(tmp_path: Path) -> None:
    clock = Clock()
    destination = tmp_path / "haproxy.cfg"
    busy = BusyPorts.for_destination(destination, clock)
    busy.judge("listen", 5432, True)
    kept = destination.with_name(".haproxy.cfg.busy-ports.json")
    inode = os.stat(kept).st_ino
    for _ in range(100):
        clock.now += 10
        busy.judge("listen", 5432, True)
    assert os.stat(kept).st_ino == inode  # an hour's sightings: written once
    clock.now += 3600
    busy.judge("listen", 5432, True)
    assert os.stat(kept).st_ino != inode


def test_a_memory_that_cannot_be_kept_is_said_and_lives_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    destination = tmp_path / "haproxy.cfg"
    destination.with_name(".haproxy.cfg.busy-ports.json").mkdir()
    busy = BusyPorts.for_destination(destination, Clock())
    assert busy.judge("listen", 5432, True) == IN_USE
    assert "busy ports not kept" in caplog.text
    assert busy.judge("listen", 5432, False) is not None


def test_the_pre_check_leaves_out_a_listener_on_a_port_its_program_freed_a_moment_ago() -> None:
    """End to end through the real probe: a daemon's port taken while it restarts, before the fix."""
    busy = BusyPorts()
    live = "frontend http\n    bind 127.0.0.1:1\n\nbackend web\n    server a 10.0.0.1:80\n"
    with socket.socket() as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.listen()
        port = daemon.getsockname()[1]
        first = live + f"listen evil-1\n    mode tcp\n    bind 127.0.0.1:{port}\n    server d 10.0.0.9:5432\n"
        with pytest.raises(ValidationError, match="is already in use"):
            check_new_binds(live, first, busy.judge)
    # The daemon restarts; a second registration for its port comes now.
    second = live + f"listen evil-2\n    mode tcp\n    bind 127.0.0.1:{port}\n    server d 10.0.0.9:5432\n"
    check_new_binds(live, second)  # the probe alone would let it bind
    with pytest.raises(ValidationError, match="was held by another process") as err:
        check_new_binds(live, second, busy.judge)
    repaired = repair(second, str(err.value), live)
    assert repaired is not None
    assert [part.section for part in repaired[1]] == ["listen evil-2"] and f":{port}\n" not in repaired[0]
    with socket.socket() as daemon:  # and the daemon starts again
        daemon.bind(("127.0.0.1", port))
