"""A port another program held is taken by a catalog listener only once it has stayed free without a
break (helper-142's and helper-144's general fix: a try that fell in a daemon's restart took its
port; helper-146's review of the first version: two restarts 4 minutes apart took it too)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest

from renderer.deliver import busy_ports
from renderer.deliver.busy_ports import CHAIN_GAP_S, FREE_FOR_S, PROBE_S, WAIT_S, BusyPorts
from renderer.deliver.quarantine import repair
from renderer.errors import ValidationError
from renderer.haproxy.control import IN_USE, check_new_binds
from tests.helpers import Pace


class Host:
    """The clocks and the one daemon of a host, as the memory sees them."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0
        self.daemon_up = True

    def later(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def memory(self, path: Path | None = None) -> BusyPorts:
        options = dict(
            clock=lambda: self.wall,
            monotonic=lambda: self.mono,
            probe=lambda host, port: self.daemon_up,
            listening=lambda port: self.daemon_up,
            background=False,
        )
        return BusyPorts.for_destination(path, **options) if path is not None else BusyPorts(**options)

    def ask(self, busy: BusyPorts, port: int = 6379, kind: str = "listen") -> str | None:
        """A section asking for `port` now (a registration, or the quarantine's retry)."""
        return busy.judge(kind, "0.0.0.0", port, self.daemon_up)

    def wait(self, busy: BusyPorts, seconds: float) -> None:
        """`seconds` of the prober's ticks."""
        for _ in range(round(seconds / PROBE_S)):
            self.later(PROBE_S)
            busy.tick()


def test_a_port_seen_held_is_refused_until_it_stayed_free_without_a_break() -> None:
    host = Host()
    busy = host.memory()
    assert host.ask(busy) == IN_USE
    host.daemon_up = False  # gone for good
    why = host.ask(busy)
    assert why is not None and "was held by another process 0 s ago and has stayed free for 0 s" in why
    host.wait(busy, FREE_FOR_S - PROBE_S)
    assert host.ask(busy) is not None  # the quarantine's retry, a little early
    host.wait(busy, PROBE_S)
    assert host.ask(busy) is None and busy.seen == {}


def test_two_restarts_4_minutes_apart_take_nothing() -> None:
    """helper-146's F1: a registration in one restart, deregistered at once, another in a restart
    more than 240 s later: the first version counted the time between as free."""
    host = Host()
    busy = host.memory()
    host.ask(busy)  # evil-1, left out: the daemon listens
    host.daemon_up = False  # restart #1
    assert host.ask(busy) is not None  # evil-2: refused, and deregistered at once
    host.wait(busy, 5)
    host.daemon_up = True  # back: the prober sees it
    host.wait(busy, FREE_FOR_S)
    host.daemon_up = False  # restart #2
    assert host.ask(busy) is not None  # evil-3
    # Nothing probed between the two restarts (the prober had stopped): the wait starts again too.
    quiet = host.memory()
    host.daemon_up = True
    host.ask(quiet)
    host.daemon_up = False
    host.ask(quiet)
    host.later(FREE_FOR_S + 60)  # no tick: the thread was not running
    assert host.ask(quiet) is not None


def test_staggered_registrations_during_a_restart_take_nothing() -> None:
    """helper-142's twelve registrations 5 s apart, each a new section probed at once."""
    host = Host()
    busy = host.memory()
    answers = []
    for second in range(0, 60, 5):
        host.daemon_up = not 20 <= second < 27
        answers.append(host.ask(busy))
        host.wait(busy, 5)
    assert all(answer is not None for answer in answers)


def test_the_wall_clock_counts_for_nothing_in_the_wait() -> None:
    """helper-146's F2: a wall-clock step of +300 s between two probes of one restart let it in."""
    host = Host()
    busy = host.memory()
    host.ask(busy)
    host.daemon_up = False
    host.ask(busy)
    host.wall += 300
    host.mono += 3
    assert host.ask(busy) is not None


def test_a_port_the_renderer_stopped_waiting_for_starts_its_wait_again() -> None:
    """Once no section asked for the port for WAIT_S the prober stops, and the run of free probes
    ends: a section asking later waits FREE_FOR_S from then."""
    host = Host()
    busy = host.memory()
    host.ask(busy)
    host.daemon_up = False
    host.ask(busy)
    while busy.tick():
        host.later(PROBE_S)
    host.later(PROBE_S)
    assert busy.seen[6379].free_since is None and not busy.tick()
    assert host.ask(busy) is not None


def test_an_outbound_connections_port_is_refused_but_not_remembered() -> None:
    """helper-146's F5: a connection's local port fails the probe too; an attacker's backend sees
    HAProxy's, and registering services on them filled the memory (64,512 entries)."""
    busy = BusyPorts(listening=lambda port: False, background=False)
    assert busy.judge("listen", "0.0.0.0", 40000, True) == IN_USE
    assert busy.seen == {}
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())
        assert busy_ports._listening(server.getsockname()[1])
        assert not busy_ports._listening(client.getsockname()[1])


def test_a_frontend_is_judged_by_the_probe_alone_but_a_listener_after_it_waits() -> None:
    """The template's own frontend cannot be left out (the whole file would be rejected)."""
    host = Host()
    busy = host.memory()
    assert host.ask(busy, 80, "frontend") == IN_USE
    host.daemon_up = False
    assert host.ask(busy, 80, "frontend") is None
    assert host.ask(busy, 9000) is None  # never seen held
    assert host.ask(busy, 80) is not None


def test_the_sightings_outlive_a_restart_and_every_wait_starts_again(tmp_path: Path) -> None:
    """A reboot with HAProxy up before the daemon: the port seen held before is not taken at once,
    even with the clock started behind the kept time (helper-146's F3)."""
    host = Host()
    destination = tmp_path / "haproxy.cfg"
    busy = host.memory(destination)
    host.ask(busy)
    busy.keep()
    kept = destination.with_name(".haproxy.cfg.busy-ports.json")
    assert json.loads(kept.read_text()) == {"6379": host.wall}
    host.daemon_up = False
    host.ask(busy)
    host.wait(busy, FREE_FOR_S - 60)  # almost there when the host reboots
    host.wall -= FREE_FOR_S  # and comes back with its clock behind the kept sighting
    again = host.memory(destination)
    assert host.ask(again) is not None
    assert again.seen[6379].held_at == host.wall  # kept, as of now
    host.wait(again, FREE_FOR_S)
    assert host.ask(again) is None
    again.keep()
    assert not kept.exists()  # nothing left to remember


def test_a_hostile_file_is_read_checked(tmp_path: Path) -> None:
    host = Host()
    destination = tmp_path / "haproxy.cfg"
    kept = destination.with_name(".haproxy.cfg.busy-ports.json")
    hostile = {
        "0": host.wall,
        "65536": host.wall,
        "+22": host.wall,
        "22": True,
        "80": 10**400,  # in the future, and past a float
        "110": host.wall - 31 * 86400,  # forgotten
        "443": host.wall + 5,  # in the future: now
        "5000": "x",
        "6000": [host.wall, None],
        "7000": float("nan"),
    }
    kept.write_text(json.dumps(hostile).replace('"NaN"', "NaN"))
    read = host.memory(destination)
    assert sorted(read.seen) == [443] and read.seen[443].held_at == host.wall
    kept.write_text("[" * 100_000)
    assert host.memory(destination).seen == {}


def test_sightings_are_written_once_a_check_and_not_for_each_sighting(tmp_path: Path) -> None:
    host = Host()
    destination = tmp_path / "haproxy.cfg"
    busy = host.memory(destination)
    for port in range(6000, 6100):
        host.ask(busy, port)
    kept = destination.with_name(".haproxy.cfg.busy-ports.json")
    assert not kept.exists()
    busy.keep()
    assert len(json.loads(kept.read_text())) == 100
    inode = os.stat(kept).st_ino
    for _ in range(100):
        host.later(10)
        host.ask(busy, 6000)
        busy.keep()
    assert os.stat(kept).st_ino == inode  # 1,000 s of sightings: the file as it was
    host.later(3600)
    host.ask(busy, 6000)
    busy.keep()
    assert os.stat(kept).st_ino != inode


def test_a_memory_that_cannot_be_kept_is_said_and_lives_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = Host()
    destination = tmp_path / "haproxy.cfg"
    destination.with_name(".haproxy.cfg.busy-ports.json").mkdir()
    busy = host.memory(destination)
    assert host.ask(busy) == IN_USE
    busy.keep()
    assert "busy ports not kept" in caplog.text
    host.daemon_up = False
    assert host.ask(busy) is not None


def test_the_prober_thread_probes_while_a_section_waits_and_then_ends(
    monkeypatch: pytest.MonkeyPatch, pace: Pace
) -> None:
    monkeypatch.setattr(busy_ports, "PROBE_S", 0.01)
    monkeypatch.setattr(busy_ports, "CHAIN_GAP_S", 60.0)
    monkeypatch.setattr(busy_ports, "WAIT_S", 0.3)
    probed = threading.Event()

    def probe(host: str, port: int) -> bool:
        probed.set()
        return False

    busy = BusyPorts(probe=probe, listening=lambda port: True)
    assert busy.judge("listen", "0.0.0.0", 6379, True) == IN_USE
    assert busy.judge("listen", "0.0.0.0", 6379, False) is not None
    assert probed.wait(pace(5))
    prober = busy._prober
    assert prober is not None
    prober.join(pace(5))
    assert not prober.is_alive() and busy.seen[6379].free_since is None  # stopped waiting: the run ended


def test_the_pre_check_leaves_out_a_listener_on_a_port_its_program_freed_a_moment_ago() -> None:
    """Through the real probe: a daemon's port taken while it restarts, before the fix."""
    busy = BusyPorts(background=False)
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


def test_the_constants_keep_the_quarantines_retry_within_a_wait() -> None:
    """The quarantine asks again every RECHECK_S: within WAIT_S, so a waiting port stays probed."""
    from renderer.deliver.quarantine import RECHECK_S

    assert RECHECK_S < WAIT_S and PROBE_S < CHAIN_GAP_S < FREE_FOR_S
