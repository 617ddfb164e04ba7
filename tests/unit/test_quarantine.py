"""Leaving out what HAProxy rejected: the part its message names, nothing more (messages as
HAProxy 2.8.25 prints them; the integration test runs the real `haproxy -c`)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from renderer.deliver import quarantine
from renderer.deliver.quarantine import (
    PORT_HOLD_S,
    RECHECK_S,
    PortHolds,
    Quarantine,
    duplicate_binds,
    duplicate_binds_after,
    repair,
)

CONFIG = """global
    maxconn 100
frontend http
    bind 127.0.0.1:80
    default_backend web
backend web
    server a 10.0.0.1:80 check
    server b 10.0.0.2:80 check weight 257
backend api
    option httpchk GET /x'
    server c 10.0.0.3:80 check
backend api
    server d 10.0.0.4:80 check
"""


def alert(text: str) -> str:
    return f"[NOTICE]   (1) : haproxy version is 2.8.25\n[ALERT]    (1) : config : {text}\n"


def test_a_rejected_server_line_is_the_only_thing_left_out() -> None:
    out = alert("[/tmp/.haproxy.cfg.1a2b:8] : 'server web/b' : weight of server b is not within 0 and 256 (257)..")
    repaired = repair(CONFIG, out, None)
    assert repaired is not None
    content, parts = repaired
    assert "server b " not in content and "server a 10.0.0.1:80 check" in content
    assert [p.section for p in parts] == ["backend web"]
    assert "server line" in parts[0].describe() and "weight of server b" in parts[0].describe()


def test_another_bad_line_puts_the_live_version_of_the_backend_back() -> None:
    live = "backend api\n    option httpchk GET /ok\n    server c 10.0.0.3:80 check\n"
    out = alert("parsing [/tmp/x.cfg:10]: unmatched quote at position 26:")
    content, _ = repair(CONFIG, out, live) or ("", [])
    assert "GET /x'" not in content and "GET /ok" in content
    content, _ = repair(CONFIG, out, None) or ("", [])
    assert "GET /x'" not in content and "backend api\n    # left out by consul-renderer" in content


def test_a_second_backend_of_one_name_is_dropped() -> None:
    out = alert("Parsing [/tmp/x.cfg:12]: backend 'api' has the same name as backend 'api' declared at /tmp/x.cfg:9.")
    content, _ = repair(CONFIG, out, None) or ("", [])
    assert content.count("backend api") == 1 and "server d" not in content and "server c" in content


def test_the_templates_own_sections_are_never_repaired() -> None:
    assert repair(CONFIG, alert("parsing [/tmp/x.cfg:4] : unknown keyword 'bnd' in 'frontend' section"), None) is None
    assert repair(CONFIG, alert("Proxy 'http': unable to find required use_backend: 'nope'."), None) is None
    assert repair(CONFIG, "[ALERT] (1) : config : parsing [/tmp/x.cfg:999] : out of range", None) is None


def test_a_quarantine_takes_the_part_out_of_later_renders_and_forgets_it_once_gone() -> None:
    out = alert("[/tmp/x.cfg:8] : 'server web/b' : weight of server b is not within 0 and 256 (257)..")
    _, parts = repair(CONFIG, out, None) or ("", [])
    quarantine = Quarantine(list(parts))
    later = CONFIG.replace("server a 10.0.0.1:80", "server a 10.0.0.9:80")
    assert "weight 257" not in quarantine.apply(later) and len(quarantine.described()) == 1
    fixed = later.replace("weight 257", "weight 7")
    assert quarantine.apply(fixed) == fixed and quarantine.described() == ()


TWO_BACKENDS = """frontend http
    bind 127.0.0.1:80
    use_backend web_tcp if { path_beg /tcp }
    default_backend web
backend web
    server s1 db.example:80 check
    server s2 10.0.0.2:80 check
backend web_tcp
    mode tcp
    server s1 db.example:80 check
"""
TCP_SERVER = "    mode tcp\n    server s1 db.example:80 check\n"


def test_a_server_line_written_in_two_backends_is_left_out_of_the_one_haproxy_named(section_lookup: str) -> None:
    """A custom template may write one instance in two backends, line for line. A review found that
    both the repair and later renders took out the first copy of the text: the backend HAProxy had
    named kept its bad line (and the file stayed rejected) while the other lost a good one."""
    out = alert("[/tmp/x.cfg:10] : 'server web_tcp/s1' : could not resolve address 'db.example'.")
    content, parts = repair(TWO_BACKENDS, out, None) or ("", [])
    assert content == TWO_BACKENDS.replace(TCP_SERVER, "    mode tcp\n")
    quarantine = Quarantine(list(parts))
    later = TWO_BACKENDS.replace("10.0.0.2", "10.0.0.3")
    assert quarantine.apply(later) == later.replace(TCP_SERVER, "    mode tcp\n")
    assert len(quarantine.described()) == 1


def test_a_part_whose_text_moved_to_another_section_is_forgotten_not_taken_from_there(section_lookup: str) -> None:
    out = alert("[/tmp/x.cfg:10] : 'server web_tcp/s1' : could not resolve address 'db.example'.")
    _, parts = repair(TWO_BACKENDS, out, None) or ("", [])
    quarantine = Quarantine(list(parts))
    moved = TWO_BACKENDS.replace(TCP_SERVER, "    mode tcp\n")
    assert quarantine.apply(moved) == moved and quarantine.described() == ()


def test_a_server_line_and_its_whole_section_named_together_leave_out_the_section_once() -> None:
    live = "backend api\n    option httpchk GET /ok\n    server c 10.0.0.3:80 check\n"
    out = alert("parsing [/tmp/x.cfg:11] : 'server api/c' : bad") + alert("parsing [/tmp/x.cfg:10]: unmatched quote")
    content, parts = repair(CONFIG, out, live) or ("", [])
    assert [p.text.splitlines()[0] for p in parts] == ["backend api"]
    assert "GET /x'" not in content and content.count("server c 10.0.0.3:80 check") == 1


def test_a_part_left_out_is_tried_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    out = alert("[/tmp/x.cfg:8] : 'server web/b' : could not resolve address 'db.example'.")
    _, parts = repair(CONFIG, out, None) or ("", [])
    quarantine = Quarantine(list(parts))
    assert "server b " not in quarantine.apply(CONFIG)
    later = time.monotonic() + RECHECK_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert quarantine.apply(CONFIG) == CONFIG and quarantine.described() == ()


def test_a_tcp_listener_on_a_port_another_process_holds_is_the_only_thing_left_out() -> None:
    """The bind pre-check names the section as HAProxy does, so quarantine leaves out that listen
    section alone (a TCP service whose port is taken), and the rest of the file goes on."""
    import socket

    from renderer.errors import ValidationError
    from renderer.haproxy.control import check_new_binds

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        live = "frontend http\n    bind 127.0.0.1:1\n\nbackend web\n    server a 10.0.0.1:80\n"
        new = live + f"listen db\n    mode tcp\n    bind 127.0.0.1:{port}\n    server d 10.0.0.9:5432\n"
        with pytest.raises(ValidationError, match=rf"listen 'db': bind 127.0.0.1:{port} is already in use") as err:
            check_new_binds(live, new)
    repaired = repair(new, str(err.value), live)
    assert repaired is not None
    content, parts = repaired
    assert "bind 127.0.0.1:" + str(port) not in content and "backend web\n    server a" in content
    assert [p.section for p in parts] == ["listen db"] and "already in use" in parts[0].reason


def test_every_listener_on_a_held_port_is_left_out_in_one_round() -> None:
    """A review's freeze: the pre-check named the first taken port only, so each round of checks
    left out one service, and six registrations on ports the host's own daemons hold (the local
    Consul agent alone has five) used up the rounds: the whole file was rejected, every update with it."""
    import socket

    from renderer.deliver.quarantine import MAX_ROUNDS
    from renderer.errors import ValidationError
    from renderer.haproxy.control import check_new_binds

    holders = [socket.socket() for _ in range(MAX_ROUNDS + 2)]
    try:
        for holder in holders:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
        ports = [holder.getsockname()[1] for holder in holders]
        live = "frontend http\n    bind 127.0.0.1:1\n\nbackend web\n    server a 10.0.0.1:80\n"
        new = live + "".join(
            f"listen db{i}\n    mode tcp\n    bind 127.0.0.1:{port}\n    server d 10.0.0.9:5432\n"
            for i, port in enumerate(ports)
        )
        with pytest.raises(ValidationError) as err:
            check_new_binds(live, new)
    finally:
        for holder in holders:
            holder.close()
    repaired = repair(new, str(err.value), live)
    assert repaired is not None
    content, parts = repaired
    assert sorted(p.section for p in parts) == sorted(f"listen db{i}" for i in range(len(ports)))
    assert content.startswith(live) and not any(f":{port}\n" in content for port in ports)  # empty stand-ins


# -- a port two sections bind: the one serving it now keeps it -----------------------------------

FRONT = "frontend http\n    bind *:80\n    default_backend web\n\n"
DB = "listen db\n    mode tcp\n    bind *:5432\n    server d 10.0.0.3:5432\n\n"
NEWCOMER = "listen a-new\n    mode tcp\n    bind *:5432\n    server n 10.0.0.9:5432\n\n"  # sorts before db


def test_a_live_section_keeps_its_port_against_a_newcomer_that_sorts_first() -> None:
    """A registration asking for a port a live listener serves is the one left out: the order of
    the sections (names) never moves a port away from the service using it."""
    live = FRONT + DB
    content, clashes = duplicate_binds(FRONT + NEWCOMER + DB, live)
    assert [c.section for c in clashes] == ["listen a-new"]
    assert content == FRONT + DB
    assert "port 5432 is already bound by listen db" in clashes[0].describe()
    assert "serves it now" in clashes[0].reason and "haproxy_port" in clashes[0].reason


def test_without_a_live_file_the_first_section_keeps_the_port() -> None:
    content, clashes = duplicate_binds(FRONT + NEWCOMER + DB)
    assert [c.section for c in clashes] == ["listen db"] and content == FRONT + NEWCOMER
    # a live file in which neither binds the port changes nothing
    assert duplicate_binds(FRONT + NEWCOMER + DB, FRONT)[0] == FRONT + NEWCOMER


def test_a_live_section_that_moved_off_the_port_does_not_keep_it() -> None:
    """Only a section that is live *and still binds the port* keeps it."""
    moved = DB.replace("5432", "6000")
    taker = NEWCOMER.replace("a-new", "z-new").replace("5432", "6000")
    content, clashes = duplicate_binds(FRONT + moved + taker, FRONT + taker)  # z-new serves 6000 now
    assert [c.section for c in clashes] == ["listen db"] and "listen z-new" in content


def test_the_templates_own_sections_keep_their_port_even_against_a_live_listener() -> None:
    """A frontend cannot be left out: a live TCP service on the port the frontend now asks for
    gives it up (reported), instead of both binding it."""
    grab = DB.replace("5432", "80")
    content, clashes = duplicate_binds(grab + FRONT, grab + FRONT.replace(":80", ":8080"))
    assert [c.section for c in clashes] == ["listen db"] and content == FRONT


def test_a_section_left_out_for_its_port_that_another_names_leaves_a_stand_in(tmp_path: Path, haproxy_bin: str) -> None:
    """The default backend's only instances ask for TCP on the frontend's port: its `listen` is left
    out, and was removed whole, so `haproxy -c` refused the whole file ("unable to find required
    default_backend: 'web'") and every update froze (a review's reproduction). Now an empty section
    of the same name, binding nothing, stands in; the file passes the real `haproxy -c`."""
    defaults = "defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n    timeout connect 1s\n\n"
    front = "frontend http\n    bind 127.0.0.1:18080\n    default_backend web\n\n"
    grab = "listen web\n    mode tcp\n    bind 127.0.0.1:18080\n    server w 10.0.0.9:80\n\n"
    content, clashes = duplicate_binds(defaults + front + grab)
    assert [c.section for c in clashes] == ["listen web"]
    stand_in = "listen web\n    # left out by consul-renderer: the port it binds is another's\n\n"
    assert content == defaults + front + stand_in
    path = tmp_path / "haproxy.cfg"
    path.write_text(content)
    checked = subprocess.run([haproxy_bin, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # a section nobody names is still left out whole
    assert duplicate_binds(defaults + front + grab.replace("listen web", "listen other"))[0] == defaults + front


def test_many_clashes_are_settled_in_one_scan_of_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review's stall: each section left out for its port scanned the whole file for references
    (and was cut out by another scan): 1,000 registrations asking for one port took 4.6 s of the
    event loop at every delivery. The references are now read once, the file rebuilt once."""
    import renderer.deliver.quarantine as quarantine

    scans: list[int] = []
    read = quarantine._referenced_names
    monkeypatch.setattr(quarantine, "_referenced_names", lambda content: scans.append(1) or read(content))
    front = "frontend http\n    bind *:80\n    use_backend evil7 if { path /7 }\n    default_backend web\n\n"
    evil = "".join(
        f"listen evil{i}\n    mode tcp\n    bind *:5432\n    server e 10.0.0.{i % 250 + 1}:5432\n\n" for i in range(300)
    )
    content, parts = duplicate_binds(front + DB + evil)
    assert len(scans) == 1 and len(parts) == 300
    stand_in = "listen evil7\n    # left out by consul-renderer: the port it binds is another's\n\n"
    assert content == front + DB + stand_in  # the one a rule names keeps an empty stand-in, in its place


def settle(content: str, live: Path, holds: PortHolds) -> tuple[str, list[str]]:
    """One delivery's settling of ports (no earlier clash-free content), then `live` made what it applied."""
    settled, clashes = duplicate_binds_after(content, None, live, holds)
    live.write_text(settled)
    return settled, [part.describe() for part in clashes]


def test_a_port_stays_with_its_listener_through_a_redeploy_that_takes_it_out_of_the_catalog(tmp_path: Path) -> None:
    """An attacker's review: a newcomer asking for db's port is left out while db serves it; but when
    db's only instance is deregistered before its new one registers (db leaves the catalog for a
    moment), the newcomer got the port, and kept it once db came back, as the live one."""
    live, holds = tmp_path / "haproxy.cfg", PortHolds()
    assert settle(FRONT + DB, live, holds) == (FRONT + DB, [])
    assert settle(FRONT + NEWCOMER + DB, live, holds)[0] == FRONT + DB
    content, clashes = settle(FRONT + NEWCOMER, live, holds)  # db's redeploy: gone for a moment
    assert content == FRONT and "port 5432 was served by listen db" in clashes[0] and "held for it" in clashes[0]
    content, clashes = settle(FRONT + NEWCOMER + DB, live, holds)  # db back: it keeps its port
    assert content == FRONT + DB and "listen a-new" in clashes[0]
    assert holds.held  # still held: the newcomer still asks (the live file decides from now on)
    assert settle(FRONT + DB, live, holds) == (FRONT + DB, []) and not holds.held


def test_a_restart_holds_the_ports_of_the_live_file_too(tmp_path: Path) -> None:
    """After a restart the template no longer knows db's agreed settings while db has no instance,
    and renders no listener for it: the live file still tells whose port it is."""
    live = tmp_path / "haproxy.cfg"
    live.write_text(FRONT + DB)
    content, clashes = settle(FRONT + NEWCOMER, live, PortHolds())
    assert content == FRONT and "was served by listen db" in clashes[0]


def test_a_held_port_is_free_once_the_hold_is_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live, holds = tmp_path / "haproxy.cfg", PortHolds()
    settle(FRONT + DB, live, holds)
    assert settle(FRONT + NEWCOMER, live, holds)[0] == FRONT
    later = time.monotonic() + PORT_HOLD_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert settle(FRONT + NEWCOMER, live, holds) == (FRONT + NEWCOMER, []) and not holds.held


def test_when_a_hold_or_a_left_out_part_expires_the_loop_delivers_again_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review of what was left undone: once a hold ended, nothing scheduled a delivery, so the
    newcomer waited for some catalog change, however long. Delivery now asks the loop for a pass when
    a hold (or a part left out) expires, and only once: a pass begun after it lets it go."""
    from renderer.config import Config, TemplateSpec
    from renderer.deliver.delivery import Delivery
    from renderer.status import Status

    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0)
    target = TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg")
    door.pass_begins()
    asyncio.run(door.deliver(target, FRONT + DB))
    door.pass_begins()
    asyncio.run(door.deliver(target, FRONT + NEWCOMER))  # db gone for a moment: its port is held
    assert (tmp_path / "out.cfg").read_text() == FRONT
    due = door.next_retry()
    assert due is not None and abs(due - (time.monotonic() + PORT_HOLD_S)) < 5 and not door.retry_due()
    later = due + 0.5
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert door.retry_due()  # the loop renders and delivers: the newcomer needs no catalog change
    door.pass_begins()
    asyncio.run(door.deliver(target, FRONT + NEWCOMER))
    assert (tmp_path / "out.cfg").read_text() == FRONT + NEWCOMER and door.next_retry() is None


def test_an_expiry_a_pass_went_by_is_not_due_again_though_nothing_was_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A template waiting for data is not delivered: its expired part must not keep the loop spinning."""
    from renderer.config import Config
    from renderer.deliver.delivery import Delivery
    from renderer.status import Status

    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0)
    out = alert("[/tmp/x.cfg:8] : 'server web/b' : could not resolve address 'db.example'.")
    door._destination(Path("/nowhere/out.cfg")).quarantine.parts += (repair(CONFIG, out, None) or ("", []))[1]
    later = time.monotonic() + RECHECK_S + 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert door.retry_due()
    door.pass_begins()
    assert not door.retry_due() and door.next_retry() is None


def test_the_templates_own_ports_and_unclaimed_ones_are_never_held(tmp_path: Path) -> None:
    live, holds = tmp_path / "haproxy.cfg", PortHolds()
    settle(FRONT + DB, live, holds)
    moved = FRONT.replace(":80", ":8080")
    assert settle(moved, live, holds) == (moved, [])  # db gone, nobody asks for 5432: nothing left out
    assert list(holds.held) == [5432]  # held for db only; the frontend's old port 80 is not
    grab = "listen grab\n    mode tcp\n    bind *:80\n    server g 10.0.0.7:80\n\n"
    assert settle(moved + grab, live, holds) == (moved + grab, [])


def test_a_live_stand_in_that_brings_back_a_port_now_anothers_is_settled_again(tmp_path: Path) -> None:
    """An attacker's review (a suspicion, checked here): a rejected section is replaced by its live
    version, whose bind line may name a port another section binds by now; the repaired content
    went to its check without the ports being settled again, and HAProxy would share the port."""
    from renderer.config import Config
    from renderer.deliver.delivery import Delivery
    from renderer.errors import ValidationError
    from renderer.status import Status

    live = "listen db\n    mode tcp\n    bind *:5432\n    server d 10.0.0.3:5432\n\n"
    moved = "listen db\n    mode tcp\n    bind *:6000\n    option BAD\n    server d 10.0.0.3:5432\n\n"
    taker = "listen other\n    mode tcp\n    bind *:5432\n    server o 10.0.0.4:5432\n\n"
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0)
    destination = door._destination(tmp_path / "out.cfg")
    check = alert("parsing [/tmp/x.cfg:8] : unknown keyword 'option BAD' in 'listen' section")
    repaired = door._leave_out_rejected(destination, FRONT + moved + taker, FRONT + live, ValidationError(check))
    assert repaired is not None and repaired.count("bind *:5432") == 1, repaired
    assert destination.clashes


@pytest.fixture(params=["read back", "indexed"])
def section_lookup(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Quarantine.apply finds a part's section by reading back from it (a few parts) or through an
    index of every section start (many): each test using this runs both ways."""
    if request.param == "indexed":
        monkeypatch.setattr(quarantine, "FEW_PARTS", 0)
    return str(request.param)


def test_parts_left_out_over_two_rounds_are_taken_out_of_later_renders_as_the_rounds_did(section_lookup: str) -> None:
    """A review of the positional quarantine: round 2 names a section whose text no longer holds the
    server line round 1 took; searched in the raw render, that section was not found and forgotten,
    so each later render failed its check once more."""
    raw = "backend api\n    option httpchk GET /x'\n    server b bad.example:80\n    server a 10.0.0.1:80\n"
    first = repair(raw, alert("[/tmp/x.cfg:3] : 'server api/b' : could not resolve address 'bad.example'."), None)
    assert first is not None
    second = repair(first[0], alert("parsing [/tmp/x.cfg:2]: unmatched quote"), None)
    assert second is not None
    quarantine = Quarantine([*first[1], *second[1]])
    assert quarantine.apply(raw) == second[0] and len(quarantine.described()) == 2


def test_a_server_line_at_column_zero_or_without_a_newline_is_found_as_a_whole_line(section_lookup: str) -> None:
    raw = "backend web\nserver a 10.0.0.1:80\nserver b 10.0.0.2:80 weight 257\n"
    content, parts = repair(raw, alert("[/tmp/x.cfg:3] : 'server web/b' : weight 257"), None) or ("", [])
    quarantine = Quarantine(list(parts))
    assert quarantine.apply(raw) == content == "backend web\nserver a 10.0.0.1:80\n"
    last = "backend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80 weight 257"  # the file's end
    _, parts = repair(last, alert("[/tmp/x.cfg:3] : 'server web/b' : weight 257"), None) or ("", [])
    longer = "backend web\n    server a 10.0.0.1:80\n    server b 10.0.0.2:80 weight 2570\n"
    assert Quarantine(list(parts)).apply(longer) == longer  # never the start of a longer line


def test_a_hold_ends_once_the_live_file_shows_its_listener_back_not_a_render(tmp_path: Path) -> None:
    """A review of the holds: one ended as soon as a render bound the port again; if that render was
    never applied (a failed reload, a rejected check), the next put the newcomer first in the file
    with no hold left, and it took the port as the live one."""
    live, holds = tmp_path / "haproxy.cfg", PortHolds()
    settle(FRONT + DB, live, holds)
    settle(FRONT + NEWCOMER, live, holds)  # db gone for a moment: applied without it
    content, _ = duplicate_binds_after(FRONT + DB, None, live, holds)  # db back, in a render never applied
    assert content == FRONT + DB and list(holds.held) == [5432]
    content, clashes = settle(FRONT + NEWCOMER + DB, live, holds)
    assert content == FRONT + DB and "listen a-new" in clashes[0]


def test_a_listener_on_an_ipv6_any_address_written_without_brackets_is_seen() -> None:
    """`bind :::18080` is port 18080 on `::` to HAProxy; it was read as no port, so a listener could
    share the frontend's port unseen (no clash, no hold)."""
    front = "frontend http\n    bind :::18080\n    default_backend web\n\n"
    evil = "listen evil\n    mode tcp\n    bind :::18080\n    server e 10.0.0.66:80\n\n"
    content, clashes = duplicate_binds(front + evil)
    assert content == front and "port 18080 is already bound by frontend http" in clashes[0].reason


def test_the_settle_after_a_repair_honours_the_holds_too() -> None:
    """A review: the ports of repaired content were settled again without the destination's holds
    (and, with an apply pending, without a live file), so file order decided."""
    holds = PortHolds({5432: ("listen db", time.monotonic())})
    content, clashes = duplicate_binds(FRONT + NEWCOMER, None, holds)
    assert content == FRONT and "held for it" in clashes[0].reason


def test_a_hold_counts_from_when_its_listener_last_left_the_live_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a hold kept the time of the first absence, so a listener back for a while and gone
    again had its port free to a newcomer seconds later."""
    live, holds, now = tmp_path / "haproxy.cfg", PortHolds(), [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    settle(FRONT + DB, live, holds)
    settle(FRONT, live, holds)  # db gone at 1000
    now[0] = 1590.0
    settle(FRONT + DB, live, holds)  # back, and applied (the changes after it touch no bind line)
    now[0] = 1595.0
    settle(FRONT + NEWCOMER, live, holds)  # gone again
    now[0] = 1601.0
    content, clashes = settle(FRONT + NEWCOMER, live, holds)
    assert content == FRONT and "held for it" in clashes[0]


def test_the_bind_pre_check_lets_haproxy_move_its_own_port_to_the_ipv6_any_address() -> None:
    """A review: once `:::PORT` was read, changing `bind *:P` to `bind :::P` was refused at every
    retry: the probe of `::` found the port held by HAProxy's own `*:P` (bindv6only=0)."""
    import socket

    from renderer.haproxy.control import check_new_binds

    with socket.socket() as haproxy:  # HAProxy's listener on *:P
        haproxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        haproxy.bind(("0.0.0.0", 0))
        haproxy.listen()
        port = haproxy.getsockname()[1]
        check_new_binds(f"frontend http\n    bind *:{port}\n", f"frontend http\n    bind :::{port}\n")


def test_the_bind_pre_check_still_probes_another_address_of_a_port_haproxy_binds() -> None:
    """A review of the test above's first fix: it skipped every port the running config binds, so a
    listener on 127.0.0.2:P beside HAProxy's 127.0.0.1:P passed, with another process holding it."""
    import socket

    from renderer.errors import ValidationError
    from renderer.haproxy.control import check_new_binds

    with socket.socket() as other:
        other.bind(("127.0.0.2", 0))
        other.listen()
        port = other.getsockname()[1]
        running = f"frontend http\n    bind 127.0.0.1:{port}\n"
        with pytest.raises(ValidationError, match=f"bind 127.0.0.2:{port} is already in use"):
            check_new_binds(running, running + f"listen db\n    bind 127.0.0.2:{port}\n")


def test_port_holds_outlive_a_restart_and_end_when_they_would_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Left undone last session (a review's script): a restart within the 10 minutes after db's
    listener left the applied file forgot the hold, and a newcomer asking for db's port took it.
    The holds are kept beside the destination with their wall-clock end."""
    live = tmp_path / "haproxy.cfg"
    holds = PortHolds.for_destination(live)
    settle(FRONT + DB, live, holds)
    settle(FRONT, live, holds)  # db's redeploy: the applied file no longer binds its port
    assert list(holds.held) == [5432]
    kept = tmp_path / ".haproxy.cfg.port-holds.json"
    assert kept.exists()
    restarted = PortHolds.for_destination(live)  # a new process: only the file remembers
    assert list(restarted.held) == [5432]
    content, clashes = settle(FRONT + NEWCOMER, live, restarted)
    assert content == FRONT and "held for it" in clashes[0]
    settle(FRONT + DB, live, restarted)  # db back, applied …
    settle(FRONT + DB, live, restarted)  # … and the live file shows it: its hold ends, the file goes
    assert restarted.held == {} and not kept.exists()
    settle(FRONT + DB, live, holds := PortHolds.for_destination(live))
    settle(FRONT, live, holds)
    later = time.time() + PORT_HOLD_S + 1  # a restart after the hold would have ended: none
    monkeypatch.setattr(time, "time", lambda: later)
    assert PortHolds.for_destination(live).held == {}


@pytest.mark.parametrize(
    "kept",
    [
        "not json",
        "[1, 2]",
        '{"x": ["listen db", 9e9]}',  # a port that is no number
        '{"5432": ["frontend http", 9e9]}',  # the template's own section
        '{"5432": ["listen db", "9e9"]}',  # an end that is no number
        '{"5432": ["listen db\\rFAKE LINE", 9e9]}',  # a header no section has
        '{"5432": ["listen db", ' + "9" * 400 + "]}",  # an end too large for a float (a review: crashed)
        '{"' + "1" * 5000 + '": ["listen db", 9e9]}',  # a port of 5,000 digits (a review: crashed)
        '{"5432": ["listen db", 1e999]}',  # infinity
    ],
)
def test_a_holds_file_that_makes_no_sense_holds_nothing(tmp_path: Path, kept: str) -> None:
    (tmp_path / ".haproxy.cfg.port-holds.json").write_text(kept)
    assert PortHolds.for_destination(tmp_path / "haproxy.cfg").held == {}
    (tmp_path / ".haproxy.cfg.port-holds.json").write_text('{"5432": ["listen db", 9e9]}')  # the wall clock went back
    since = PortHolds.for_destination(tmp_path / "haproxy.cfg").held[5432][1]
    assert 0 <= time.monotonic() - since < 1  # held for PORT_HOLD_S from now, no longer
