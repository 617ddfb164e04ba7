"""A catalog listener never takes a port another program on this host has listened on (the general
fix of helper-142's and helper-144's host-daemon finding; helper-146 and helper-147 broke the two
versions that let a port in once it had stayed free long enough)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from renderer.deliver import busy_ports
from renderer.deliver.busy_ports import (
    FORGET_S,
    OURS_FOR_S,
    UNBINDABLE_S,
    BusyPorts,
    listening_ports,
)
from renderer.deliver.quarantine import repair
from renderer.errors import ValidationError
from renderer.haproxy.control import IN_USE, IN_USE_REASON, BindFailure, bind_failures, check_new_binds
from tests.helpers import Pace

FRONT = "frontend http\n    bind *:80\n    default_backend web\n\nbackend web\n    server a 10.0.0.1:80\n"


def listen(name: str, port: int) -> str:
    return f"listen {name}\n    mode tcp\n    bind *:{port}\n    server d 10.0.0.9:5432\n"


class Host:
    """The clocks, the listening sockets and HAProxy's live file of a host, as the memory sees them."""

    def __init__(self, tmp_path: Path) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0
        self.listening: set[int] | None = {22, 80}
        self.destination = tmp_path / "haproxy.cfg"
        self.destination.write_text(FRONT)

    def later(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def memory(self) -> BusyPorts:
        return BusyPorts.for_destination(
            self.destination,
            clock=lambda: self.wall,
            monotonic=lambda: self.mono,
            listening=lambda: None if self.listening is None else set(self.listening),
            background=False,
        )

    @property
    def kept(self) -> Path:
        return self.destination.with_name(".haproxy.cfg.busy-ports.json")


def test_a_port_another_program_listened_on_is_never_given_to_a_listener(tmp_path: Path) -> None:
    """helper-147's R1 and R5: the attacker times its registration by a connect probe to land in a
    restart, or waits out a crash loop's back-off (up to 300 s under Kubernetes): once seen, never."""
    host = Host(tmp_path)
    busy = host.memory()
    host.listening = {22, 80, 6379}
    busy.scan()  # the periodic read, long before any registration asks for 6379
    assert busy.judge("listen", "0.0.0.0", 6379, True) is not None
    host.listening = {22, 80}  # the daemon restarts, or crash-loops
    for _ in range(30):
        host.later(300)
        busy.scan()
        why = busy.judge("listen", "0.0.0.0", 6379, False)
        assert why is not None
    assert (
        "is a port another program on this host listened on" in why
        and '"6379" from .haproxy.cfg.busy-ports.json' in why
    )


def test_haproxys_own_ports_are_not_remembered_even_a_while_after_they_left_the_file(tmp_path: Path) -> None:
    """A redeploy takes a TCP service out of the file for a moment: its port, still listened on by
    HAProxy's old worker, must not become another program's."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))
    host.listening = {22, 80, 5432}
    busy = host.memory()
    busy.scan()
    assert sorted(busy.seen) == [22]
    host.destination.write_text(FRONT)  # db's redeploy: out of the live file, the old worker still listens
    host.later(OURS_FOR_S - 5)
    busy.scan()
    assert 5432 not in busy.seen
    assert busy.judge("listen", "0.0.0.0", 5432, False) is None  # back in the render
    host.later(10)  # and something else listens on it long after
    busy.scan()
    assert 5432 in busy.seen


def test_nothing_is_learnt_while_the_live_file_cannot_be_read(tmp_path: Path) -> None:
    """HAProxy's own ports are those its file binds: unread, they would count as another program's."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))
    host.listening = {80, 5432}
    busy = host.memory()
    host.destination.unlink()
    host.destination.mkdir()  # a directory there: live_bytes refuses it
    busy.scan()
    assert busy.seen == {}


def test_a_frontend_and_a_port_never_seen_listened_on_are_judged_by_the_probe_alone(tmp_path: Path) -> None:
    """The template's own frontend cannot be left out (the whole file would be rejected)."""
    host = Host(tmp_path)
    host.destination.write_text("")
    busy = host.memory()
    busy.scan()
    assert busy.judge("frontend", "0.0.0.0", 80, True) == IN_USE
    assert busy.judge("frontend", "0.0.0.0", 80, False) is None
    assert busy.judge("listen", "0.0.0.0", 9000, False) is None
    assert busy.judge("listen", "0.0.0.0", 9000, True) == IN_USE
    assert 9000 not in busy.seen  # an outbound connection's port: refused now, never remembered
    assert busy.judge("listen", "0.0.0.0", 80, False) is not None


def test_without_the_listening_sockets_every_port_the_probe_found_held_is_remembered(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.listening = None  # not Linux
    busy = host.memory()
    busy.scan()
    assert busy.judge("listen", "0.0.0.0", 6379, True) is not None
    assert busy.judge("listen", "0.0.0.0", 6379, False) is not None  # remembered


def test_the_hosts_listening_ports_are_read_from_proc() -> None:
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())
        found = listening_ports()
        assert found is not None
        assert server.getsockname()[1] in found and client.getsockname()[1] not in found


HEADER = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def row(slot: int, port: int, state: str) -> bytes:
    return (
        f"{slot:4}: 0100007F:{port:04X} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 0 0 1 1\n".encode()
    )


def test_a_host_without_ipv6_still_has_its_ipv4_listeners_read(tmp_path: Path) -> None:
    """helper-148's F1 (high, end to end): with no /proc/net/tcp6 (ipv6.disable=1) the read gave up
    on both tables, and the memory went blind, silently: a daemon's port was taken again."""
    tcp = tmp_path / "tcp"
    tcp.write_bytes(HEADER + row(0, 6379, "0A"))
    assert listening_ports((str(tcp), str(tmp_path / "tcp6"))) == {6379}
    assert listening_ports((str(tmp_path / "none"), str(tcp))) is None


def test_the_tables_are_read_up_to_the_first_connection(tmp_path: Path) -> None:
    """The kernel lists listening sockets first: a busy load balancer's hundreds of thousands of
    connections are not parsed (helper-148: one pass over 400k lines held the loop 242 ms)."""
    tcp = tmp_path / "tcp"
    lines = [row(0, 22, "0A"), row(1, 80, "0A"), row(2, 80, "03"), row(3, 80, "01"), row(4, 9, "0A")]
    tcp.write_bytes(HEADER + b"".join(lines))
    assert listening_ports((str(tcp),)) == {22, 80}


def test_the_other_haproxy_outputs_ports_are_haproxys_too(tmp_path: Path) -> None:
    """helper-148's F2: destination B remembered A's TCP ports as another program's, so a service
    moved from A to B on its port was refused in B for 30 days."""
    host = Host(tmp_path)
    other = tmp_path / "other.cfg"
    other.write_text(listen("db", 5432))
    host.listening = {80, 5432}
    busy = BusyPorts.for_destination(
        host.destination,
        clock=lambda: host.wall,
        monotonic=lambda: host.mono,
        listening=lambda: host.listening,
        background=False,
        also_ours=lambda: [other],
    )
    busy.scan()
    assert busy.seen == {}
    other.unlink()  # never rendered, or renamed: binds nothing, and the learning goes on
    host.later(OURS_FOR_S)
    busy.scan()
    assert busy.seen == {5432: host.wall}


def test_a_table_listed_in_any_order_is_read_whole(tmp_path: Path) -> None:
    """helper-149: gVisor prints socket ids in any order, connections before listeners: reading up to
    the first connection found nothing there."""
    tcp = tmp_path / "tcp"
    tcp.write_bytes(HEADER + row(7, 80, "01") + row(3, 5432, "0A") + row(9, 80, "06") + row(1, 6379, "0A"))
    assert listening_ports((str(tcp),)) == {5432, 6379}


def test_without_proc_nothing_is_learnt_while_the_live_file_is_missing(tmp_path: Path) -> None:
    """helper-149's B3: blind, a port held by HAProxy itself (its file removed to render it again)
    was remembered as another program's."""
    host = Host(tmp_path)
    host.listening = None
    busy = host.memory()
    host.destination.unlink()
    busy.scan()
    assert busy.judge("listen", "0.0.0.0", 5432, True) == IN_USE
    assert busy.seen == {}


def test_nothing_is_learnt_without_a_live_file(tmp_path: Path) -> None:
    """helper-148's F8: a first start, or the file removed to render it again: HAProxy's own ports
    were learnt as another program's."""
    host = Host(tmp_path)
    host.destination.unlink()
    busy = host.memory()
    busy.scan()
    assert busy.seen == {}


def test_the_sightings_outlive_a_restart_and_are_forgotten_after_30_days(tmp_path: Path) -> None:
    """A reboot with HAProxy up before the daemon, even with the clock started behind the kept time
    (helper-146's F3): the port stays the daemon's."""
    host = Host(tmp_path)
    busy = host.memory()
    busy.scan()
    assert json.loads(host.kept.read_text()) == {"22": host.wall}
    host.listening = {80}
    host.wall -= 120
    again = host.memory()
    assert again.seen == {22: host.wall}  # the future counted as now
    assert again.judge("listen", "0.0.0.0", 22, False) is not None
    host.later(FORGET_S)
    again.scan()
    assert again.seen == {} and not host.kept.exists()


def test_a_hostile_file_is_read_checked(tmp_path: Path) -> None:
    host = Host(tmp_path)
    hostile = {
        "0": host.wall,
        "65536": host.wall,
        "+22": host.wall,
        "22": True,
        "80": 10**400,
        "110": host.wall - 31 * 86400,
        "443": host.wall + 5,
        "5000": "x",
        "6000": [host.wall, None],
    }
    host.kept.write_text(json.dumps(hostile)[:-1] + ', "7000": NaN, "7001": Infinity}')
    assert host.memory().seen == {443: host.wall}
    host.kept.write_text("[" * 100_000)
    assert host.memory().seen == {}


def test_sightings_are_written_when_they_change_not_at_each_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[Path] = []
    write = busy_ports.write_atomically
    monkeypatch.setattr(busy_ports, "write_atomically", lambda path, text: writes.append(path) or write(path, text))
    host = Host(tmp_path)
    host.listening = set(range(6000, 6100))
    busy = host.memory()
    busy.scan()
    assert len(json.loads(host.kept.read_text())) == 100 and len(writes) == 1
    for _ in range(100):
        host.later(30)
        busy.scan()
    assert len(writes) == 1  # 50 minutes of scans: the file as it was
    host.later(600)
    busy.scan()
    assert len(writes) == 2


def test_a_memory_that_cannot_be_kept_is_said_and_lives_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = Host(tmp_path)
    host.kept.mkdir()
    busy = host.memory()
    busy.scan()
    assert "busy ports not kept" in caplog.text
    assert busy.judge("listen", "0.0.0.0", 22, False) is not None


def test_the_scanner_thread_reads_the_ports_again_and_again(monkeypatch: pytest.MonkeyPatch, pace: Pace) -> None:
    monkeypatch.setattr(busy_ports, "SCAN_S", 0.01)
    reads = threading.Semaphore(0)

    def listening() -> set[int]:
        reads.release()
        return set()

    busy = BusyPorts(listening=listening)
    busy.start()
    busy.start()  # once
    for _ in range(3):
        assert reads.acquire(timeout=pace(5))
    assert busy._scanner is not None and busy._scanner.daemon


def test_the_pre_check_leaves_out_a_listener_on_the_port_of_a_program_restarting(tmp_path: Path) -> None:
    """Through the real sockets: a daemon seen listening, then restarting when a registration asks."""
    busy = BusyPorts(background=False)
    live = "frontend http\n    bind 127.0.0.1:1\n\nbackend web\n    server a 10.0.0.1:80\n"
    with socket.socket() as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.listen()
        port = daemon.getsockname()[1]
        busy.scan()
    evil = live + f"listen evil\n    mode tcp\n    bind 127.0.0.1:{port}\n    server d 10.0.0.9:5432\n"
    check_new_binds(live, evil)  # the probe alone would let it bind
    with pytest.raises(ValidationError, match="is a port another program on this host listened on") as err:
        check_new_binds(live, evil, busy.judge)
    repaired = repair(evil, str(err.value), live)
    assert repaired is not None
    assert [part.section for part in repaired[1]] == ["listen evil"] and f":{port}\n" not in repaired[0]
    with socket.socket() as daemon:  # and the daemon starts again
        daemon.bind(("127.0.0.1", port))


RELOAD_LOG = (
    "HAProxy refused the reload; old workers keep serving:\n"
    "[NOTICE]   (2429) : haproxy version is 2.8.25-5cf5d0683\n"
    "[ALERT]    (2429) : Binding [{file}:{line}] for proxy db: cannot bind socket ({reason}) for [{address}]\n"
    "[ALERT]    (2429) : [/usr/sbin/haproxy.main()] Some protocols failed to start their listeners! Exiting.\n"
    "[WARNING]  (2429) : Loading failure!"
)


def test_a_reloads_startup_log_names_each_listener_it_could_not_bind() -> None:
    """HAProxy 2.8's words (measured on 2.8.25, IPv4 and IPv6); a line that only quotes them, not
    at a line's start, is not HAProxy's alert."""
    log = RELOAD_LOG.format(file="/etc/haproxy/haproxy.cfg", line=81, reason="Address already in use",
                            address="0.0.0.0:6379")  # fmt: skip
    log += "\n[ALERT]    (2429) : Binding [v6.cfg:7] for proxy a: cannot bind socket (Permission denied) for [::1:80]"
    log += "\n[WARNING]  (9) : x [ALERT]    (9) : Binding [h.cfg:3] for proxy b: cannot bind socket (x) for [1.2.3.4:5]"
    assert bind_failures(log) == [
        BindFailure("/etc/haproxy/haproxy.cfg", 81, "0.0.0.0", 6379, IN_USE_REASON),
        BindFailure("v6.cfg", 7, "::1", 80, "Permission denied"),
    ]


def test_a_port_a_reload_could_not_bind_is_remembered_and_no_longer_haproxys(tmp_path: Path) -> None:
    """helper-148's F3: a file whose reload failed on a port kept that port HAProxy's (the live file
    binds it), so the program holding it was never learnt. HAProxy's own words teach it now."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))  # the file whose reload failed
    host.listening = {22, 80, 5432}  # another program took 5432 between the check and the reload
    busy = host.memory()
    busy.scan()
    assert 5432 not in busy.seen  # the live file binds it: HAProxy's, for all the scan can tell
    busy.learn(5432)
    assert 5432 in busy.seen and json.loads(busy.kept_at.read_text()).keys() >= {"5432"}  # type: ignore[union-attr]
    host.later(3600)
    busy.scan()  # still bound by the live file, still not HAProxy's: seen again
    assert busy.seen[5432] == host.wall
    assert busy.judge("listen", "0.0.0.0", 5432, False) is not None
    busy.loaded(confirmed=False)  # a reload went through: what the file binds is HAProxy's again
    host.later(60)
    busy.scan()
    assert busy.seen[5432] == host.wall - 60


def test_a_port_a_reload_could_not_bind_for_another_reason_is_refused_for_an_hour(tmp_path: Path) -> None:
    """A privileged port with HAProxy not root: the probe cannot tell (it is left to HAProxy), so
    each try of the listener was a failed reload, each a ~2 s pause of HAProxy's listeners."""
    host = Host(tmp_path)
    busy = host.memory()
    busy.unbindable(443, "Permission denied")
    why = busy.judge("listen", "0.0.0.0", 443, False)
    assert why is not None and "Permission denied" in why and "in 60 min" in why
    assert busy.judge("frontend", "0.0.0.0", 443, False) is None  # a frontend: the probe's say alone
    assert 443 not in busy.seen  # no other program's: nothing kept
    host.later(UNBINDABLE_S + 1)
    assert busy.judge("listen", "0.0.0.0", 443, False) is None


def test_a_port_a_confirmed_reload_no_longer_binds_is_not_haproxys_once_seen_free(tmp_path: Path) -> None:
    """helper-148's F3: a port an attacker's section held counted as HAProxy's for 10 minutes after
    it left the file, so a program that started on it then and restarted within them was never
    learnt. After a reload HAProxy confirmed without it, once a scan finds it free."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("evil", 5432))
    host.listening = {22, 80, 5432}
    busy = host.memory()
    busy.scan()
    host.destination.write_text(FRONT)  # evil deregistered: the reload without it went through
    busy.loaded(confirmed=True)
    busy.loaded(confirmed=True)  # another service's reload
    host.listening = {22, 80}
    host.later(1)
    busy.scan()  # the scan after the load: nobody listens there now
    host.listening = {22, 80, 5432}  # a program starts on 5432
    host.later(1)
    busy.scan()
    assert 5432 in busy.seen  # learnt: a registration in its restart is refused


def test_a_port_haproxys_old_worker_still_listens_on_is_not_learnt(tmp_path: Path) -> None:
    """helper-151's A: with `grace` in the global section an old worker listens on for that long
    after the reload answered; a fixed 10 s learnt a redeployed TCP service's own port."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))
    host.listening = {22, 80, 5432}
    busy = host.memory()
    busy.scan()
    host.destination.write_text(FRONT)  # db redeploying: out of the file, the reload confirmed
    busy.loaded(confirmed=True)
    for _ in range(4):  # `grace 60s`: the old worker listens on
        host.later(15)
        busy.scan()
    assert 5432 not in busy.seen
    host.listening = {22, 80}  # the old worker is done
    busy.scan()
    host.listening = {22, 80, 5432}
    busy.scan()
    assert 5432 in busy.seen


def test_a_port_that_left_the_file_after_the_confirmed_reload_stays_haproxys_until_the_next(tmp_path: Path) -> None:
    """The reload that takes it out has not gone yet (it waits for the gap, or failed): HAProxy
    still listens on it, and it must not be learnt as another program's."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))
    host.listening = {22, 80, 5432}
    busy = host.memory()
    busy.loaded(confirmed=True)  # HAProxy runs db
    host.destination.write_text(FRONT)  # db out of the file; its reload not confirmed
    for _ in range(5):
        host.later(60)
        busy.scan()
    assert 5432 not in busy.seen
    busy.loaded(confirmed=False)  # a command ran: whether HAProxy reloaded is not known
    host.later(60)
    busy.scan()
    assert 5432 not in busy.seen


def test_a_port_a_reload_found_in_use_by_no_listener_is_not_remembered(tmp_path: Path) -> None:
    """helper-150's F3: a connection's local port fails HAProxy's bind too ("Address already in
    use"); it is no program's listener, and was kept for 30 days."""
    host = Host(tmp_path)
    busy = host.memory()
    assert not busy.learn(51452)  # not listening: a connection's port
    assert 51452 not in busy.seen and not host.kept.exists()
    host.listening = {22, 80, 51452}
    assert busy.learn(51452) and 51452 in busy.seen
    host.listening = None  # no /proc: every port HAProxy found held is remembered, as the probe's are
    assert busy.learn(40000) and 40000 in busy.seen


def test_the_last_confirmed_loads_ports_stay_haproxys_while_its_reloads_are_refused(tmp_path: Path) -> None:
    """helper-152's F1: a reload refused again and again (a frontend's port taken: it cannot be left
    out) for over 10 minutes had a port the refused file dropped, which the old workers still
    served, learnt as another program's."""
    host = Host(tmp_path)
    host.destination.write_text(FRONT + listen("db", 5432))
    host.listening = {22, 80, 5432}
    busy = host.memory()
    busy.loaded(confirmed=True)  # HAProxy runs db on 5432
    host.destination.write_text(FRONT + listen("db", 6000))  # the refused file: db moved
    for _ in range(12):
        host.later(60)
        busy.scan()
    assert 5432 not in busy.seen


def test_without_proc_a_port_haproxys_old_worker_holds_is_not_remembered(tmp_path: Path) -> None:
    """helper-152's F2: a blind host's judge asked the live file only: a TCP service redeployed while
    the old worker still held its port (`grace`) had HAProxy's own port remembered for 30 days."""
    host = Host(tmp_path)
    host.listening = None
    host.destination.write_text(FRONT + listen("db", 5432))
    busy = host.memory()
    busy.loaded(confirmed=True)
    busy.scan()
    host.destination.write_text(FRONT)  # db redeploying, the reload confirmed, the old worker listening on
    busy.loaded(confirmed=True)
    host.later(5)
    busy.scan()
    assert busy.judge("listen", "0.0.0.0", 5432, True) is not None  # held now: not this time
    assert 5432 not in busy.seen
