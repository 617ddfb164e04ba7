"""Per-service settings from meta, and TCP services, against real Consul and HAProxy.

A TCP service is added, scaled and removed through Consul under load with 0 failed connections and
no reload after its listener exists; settings are not only in the file but in effect (stickiness
keeps a client on one server, `balance first` fills the first server, a health check that expects
another status takes the servers out).
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ManagedProcess, free_port, get_json, http_get, wait_until
from lab.stack import LocalStack
from lab.webapp import WebApp
from renderer.deliver.busy_ports import SCAN_AFTER_LOAD_S
from tests.helpers import Load, Pace, consul_client, register, reloads, settled_reloads, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
Backends = Callable[[str], WebApp]


def ask(url: str, host: str, cookie: str | None = None) -> tuple[int, str, str]:
    """(status, body, Set-Cookie) of one GET with a Host header (and a cookie)."""
    headers = {"Host": host, **({"Cookie": cookie} if cookie else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as answer:
            return answer.status, answer.read().decode().strip(), answer.headers.get("Set-Cookie") or ""
    except urllib.error.HTTPError as err:
        return err.code, "", ""


def left_out(stack: LocalStack) -> list[str]:
    """What the renderer reports left out (its /status), every destination's items together."""
    found = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(found, dict)
    return [item for items in found["left_out"].values() for item in items]


def test_a_tcp_service_is_added_scaled_and_removed_under_load_without_a_failed_connection(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    port = free_port()
    meta = {"haproxy_mode": "tcp", "haproxy_port": str(port)}
    for name in ("tcp-a", "tcp-b"):
        register(consul_agent, backends(name), name="pg", meta=meta)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: http_get(url)[0] == 200, 30, "the TCP listener serving")
    assert "listen pg\n" in stack.config_path.read_text()
    before = settled_reloads(stack, "pg", {"dev_tcp-a", "dev_tcp-b"})
    load = Load(url).start()
    try:
        load.wait_for("tcp-a")
        load.wait_for("tcp-b")
        register(consul_agent, backends("tcp-c"), name="pg", meta=meta)  # scaled up
        load.wait_for("tcp-c")
        consul = consul_agent.extra["http_addr"]
        urllib.request.urlopen(
            urllib.request.Request(f"http://{consul}/v1/agent/service/deregister/tcp-a", method="PUT"), timeout=5
        ).close()
        load.wait_gone("tcp-a")  # removed: its app keeps running, so a late server would show
        # The changes can all land within fewer requests than that (93 in one CI run): the load goes
        # on until enough have gone through the listener for "no failed connection" to mean something.
        wait_until(lambda: load.ok > 100, 30, "100 connections through the listener")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert load.ok > 100
    assert reloads(stack) == before  # membership of a TCP service: Runtime API only
    assert "acl host_pg" not in stack.config_path.read_text()  # no HTTP route to a TCP service


def test_a_tcp_service_on_a_port_another_process_holds_is_left_out_alone(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """The bind pre-check refuses the listener (a reload would fail on it); only that listen
    section is left out and reported: the file is applied, and later changes still go through."""
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: ask(stack.url, "web")[0] == 200, 30, "web served")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        register(consul_agent, backends("db-1"), name="pg", meta={"haproxy_mode": "tcp", "haproxy_port": str(taken)})
        wait_until(lambda: any("listen pg" in item and "already in use" in item for item in left_out(stack)), 30,
                   "the pg listener reported left out")  # fmt: skip
        register(consul_agent, backends("web-1"))  # a later change is not frozen behind it
        wait_until(lambda: "web-1" in stack.config_path.read_text(), 30, "web-1 in the file")
        assert wait_until(lambda: ask(stack.url, "web")[1] == "web-1", 30, "web-1 served")
        text = stack.config_path.read_text()
        assert f":{taken}" not in text and "listen pg" in text  # an empty stand-in keeps the name


def test_a_port_another_program_held_is_not_taken_while_that_program_restarts(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """helper-142 and helper-144: a registration asking for a host daemon's port was left out, and a
    try that fell in the daemon's restart bound it; the daemon could not start again. Here the
    daemon's socket closes (a restart) and a second registration asks for its port then: it is left
    out ("was held by another process"), and the daemon binds its port again."""
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: ask(stack.url, "web")[0] == 200, pace(30), "web served")
    with socket.socket() as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.listen()
        port = daemon.getsockname()[1]
        meta = {"haproxy_mode": "tcp", "haproxy_port": str(port)}
        register(consul_agent, backends("evil-1"), name="evil-1", meta=meta)
        wait_until(lambda: any("listen evil-1" in item and "already in use" in item for item in left_out(stack)),
                   pace(30), "evil-1 left out: the daemon holds the port")  # fmt: skip
    # the daemon restarts (its socket closed)
    register(consul_agent, backends("evil-2"), name="evil-2", meta=meta)
    held_a_moment_ago = "is a port another program on this host listened on"
    wait_until(lambda: any("listen evil-2" in item and held_a_moment_ago in item for item in left_out(stack)),
               pace(30), "evil-2 left out: the port was held a moment ago")  # fmt: skip
    register(consul_agent, backends("web-1"))  # the file went on meanwhile
    assert wait_until(lambda: ask(stack.url, "web")[1] == "web-1", pace(30), "web-1 served")
    with socket.socket() as daemon:  # and the daemon starts again
        daemon.bind(("127.0.0.1", port))
    assert f":{port}\n" not in stack.config_path.read_text()


def bind_once_written(path: Path, port: int, pace: Pace) -> socket.socket | None:
    """A listening socket on `port` bound the moment `path` binds it (between the bind pre-check and
    HAProxy's reload); None when HAProxy bound it first (the caller tries another port)."""
    deadline = time.monotonic() + pace(30)
    while f":{port}\n" not in path.read_text():
        assert time.monotonic() < deadline, f"no bind of port {port} written to {path}"
        time.sleep(0.001)
    daemon = socket.socket()
    try:
        daemon.bind(("127.0.0.1", port))
        daemon.listen()
    except OSError:
        daemon.close()
        return None
    return daemon


def test_a_port_taken_between_the_check_and_the_reload_freezes_nothing(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """A program that binds a TCP service's port after the bind pre-check passed and before HAProxy's
    reload made the reload fail, and every reload after it (the live file binding the port was
    applied again, never checked again): no change reached HAProxy while that program held the port.
    Now the failed reload's "cannot bind socket" leaves that listener out like the pre-check does, the
    port is remembered as another program's, and the next change goes through."""
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: ask(stack.url, "web")[0] == 200, pace(30), "web served")
    daemon = None
    for attempt in range(5):  # HAProxy may bind the port before this test does: another port then
        port = free_port()
        register(consul_agent, backends(f"evil-{attempt}"), name=f"evil-{attempt}",
                 meta={"haproxy_mode": "tcp", "haproxy_port": str(port)})  # fmt: skip
        daemon = bind_once_written(stack.config_path, port, pace)
        if daemon is not None:
            break
    assert daemon is not None, "HAProxy bound the port first five times"
    with daemon:
        wait_until(lambda: any(f"listen evil-{attempt}" in item for item in left_out(stack)), pace(30),
                   "the listener HAProxy could not bind left out")  # fmt: skip
        register(consul_agent, backends("web-1"))
        assert wait_until(lambda: ask(stack.url, "web")[1] == "web-1", pace(30), "web-1 served")
        assert f":{port}\n" not in stack.config_path.read_text()


def test_a_tcp_service_moved_to_a_port_taken_before_its_reload_keeps_its_old_port(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """helper-150's F1: after the failed reload the change was compared with the refused file, so
    the service's old port (HAProxy's own) was found "in use" and the refused version stood in for
    it: the next reload failed again, every change after it too (8 failed reloads in 30 s, web-1
    never served, 262 of 589 requests refused). Now one failed reload, and the old port serves on."""
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: ask(stack.url, "web")[0] == 200, pace(30), "web served")
    db, served = backends("db-1"), free_port()
    register(consul_agent, db, name="pg", meta={"haproxy_mode": "tcp", "haproxy_port": str(served)})
    wait_until(lambda: http_get(f"http://127.0.0.1:{served}/")[0] == 200, pace(30), "pg served")
    daemon = None
    for _ in range(5):  # HAProxy may bind the new port before this test does: pg moved, again then
        moved = free_port()
        register(consul_agent, db, name="pg", meta={"haproxy_mode": "tcp", "haproxy_port": str(moved)})
        daemon = bind_once_written(stack.config_path, moved, pace)
        if daemon is not None:
            break
        served, url = moved, f"http://127.0.0.1:{moved}/"
        wait_until(lambda: http_get(url)[0] == 200, pace(30), "pg served")  # noqa: B023 (called at once)
    assert daemon is not None, "HAProxy bound the port first five times"
    with daemon:
        register(consul_agent, backends("web-1"))
        assert wait_until(lambda: ask(stack.url, "web")[1] == "web-1", pace(30), "web-1 served")
        assert http_get(f"http://127.0.0.1:{served}/")[0] == 200  # pg on its old port
        assert f":{moved}\n" not in stack.config_path.read_text()
        assert stack.renderer.log_text(10**8).count("HAProxy could not bind listeners") == 1  # one failed reload


def test_a_port_a_listener_held_until_a_reload_took_it_out_is_learnt_once_another_program_listens(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """helper-148's F3: a port a section held counted as HAProxy's for 10 minutes after it left the
    file, so a program that started on it then was not learnt, and the same registration coming back
    in that program's restart took the port (held for it: it had served there). After the reload
    HAProxy confirmed without it: once a scan finds it free (one runs a second after the reload)."""
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: ask(stack.url, "web")[0] == 200, pace(30), "web served")
    port = free_port()
    evil = register(consul_agent, backends("evil-1"), name="evil-1",
                    meta={"haproxy_mode": "tcp", "haproxy_port": str(port)})  # fmt: skip
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200, pace(30), "evil-1 served on its port")
    consul_client(consul_agent).agent.service.deregister(evil)
    wait_until(lambda: f":{port}\n" not in stack.config_path.read_text(), pace(30), "evil-1 gone from the file")
    time.sleep(pace(SCAN_AFTER_LOAD_S + 2))  # the scan after the reload: HAProxy no longer listens there
    with socket.socket() as daemon:  # a program starts on the port
        daemon.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daemons do: TIME_WAIT after HAProxy
        daemon.bind(("127.0.0.1", port))
        daemon.listen()
        other = free_port()  # any check of new bind lines reads the host's listening sockets
        tcp = {"haproxy_mode": "tcp", "haproxy_port": str(other)}
        register(consul_agent, backends("tcp-x"), name="tcp-x", meta=tcp)
        wait_until(lambda: f":{other}\n" in stack.config_path.read_text(), pace(30), "tcp-x in the file")
    # the program restarts; evil-1 comes back then (the port is held for it: it served there)
    register(consul_agent, backends("evil-1"), name="evil-1", meta={"haproxy_mode": "tcp", "haproxy_port": str(port)})
    wait_until(lambda: any("listen evil-1" in item and "another program on this host listened on" in item
                           for item in left_out(stack)), pace(30), "evil-1 left out")  # fmt: skip
    with socket.socket() as daemon:  # and the program starts again
        daemon.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        daemon.bind(("127.0.0.1", port))


def test_a_tcp_service_asking_for_one_of_the_local_agents_ports_is_never_published(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """helper-144 (/tmp/rev90, test_rev90_serf_port.py): an agent on ports other than Consul's
    defaults (the lab's, here) kept its Serf, DNS and server ports open to a registration asking for
    them; one bound during a restart kept the agent from starting. The renderer reads the agent's
    ports at start (/v1/agent/self) and never publishes them: the service is an HTTP backend."""
    ports = consul_agent.extra["ports"]
    for name, port in (("evil-lan", ports.serf_lan), ("evil-server", ports.server)):
        register(consul_agent, backends(name), name=name, meta={"haproxy_mode": "tcp", "haproxy_port": str(port)})
    register(consul_agent, backends("web-0"))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    wait_until(lambda: len({i for i in left_out(stack) if "is Consul's or this renderer's port" in i}) == 2, pace(30),
               "both services reported as asking for the agent's ports")  # fmt: skip
    text = stack.config_path.read_text()
    assert "listen evil" not in text and "\nbackend evil-lan\n" in text and "\nbackend evil-server\n" in text
    assert f":{ports.serf_lan}\n" not in text and f":{ports.server}\n" not in text


def test_settings_from_meta_take_effect(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-0"))
    sticky = {"haproxy_sticky": "true"}
    for name in ("s1", "s2", "s3"):
        register(consul_agent, backends(name), name="sticky", meta=sticky)
    for name in ("f1", "f2"):
        register(consul_agent, backends(name), name="first", meta={"haproxy_balance": "first"})
    register(consul_agent, backends("x1"), name="picky", meta={"haproxy_check_status": "204"})
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    config: dict[str, Any] = {}

    def ready() -> bool:
        config["text"] = stack.config_path.read_text() if stack.config_path.exists() else ""
        return "backend picky" in config["text"] and ask(stack.url, "sticky")[0] == 200

    wait_until(ready, 30, "the three services served")
    # Stickiness: the cookie HAProxy sets keeps a client on its server.
    status, first_body, cookie = ask(stack.url, "sticky")
    assert status == 200 and cookie.startswith("SERVERID="), cookie
    pinned = cookie.split(";", 1)[0]
    assert {ask(stack.url, "sticky", pinned)[1] for _ in range(12)} == {first_body}
    assert len({ask(stack.url, "sticky")[1] for _ in range(12)}) > 1  # without it: round robin
    # balance first: every request to the first server while it has room. Which server is first
    # depends on whether f1 and f2 were both passing at the first render or one came in later
    # through the Runtime API (higher id), so wait until both are up, then ask: one server answers
    # all (round robin would alternate).
    wait_until(lambda: servers_up(stack.master_socket, "first") == {"dev_f1", "dev_f2"}, 30, "f1 and f2 up")
    first = min(servers_in(stack.master_socket, "first"), key=lambda row: int(row["sid"]))["svname"]
    assert {ask(stack.url, "first")[1] for _ in range(12)} == {first.removeprefix("dev_")}
    # check_status 204: the app answers its check with 200, so HAProxy takes it out.
    assert "http-check expect status 204" in config["text"]
    wait_until(lambda: ask(stack.url, "picky")[0] == 503, 20, "the picky backend's server down")


def test_timeouts_maxconn_check_path_and_slowstart_take_effect(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-0"))
    register(consul_agent, backends("t1"), name="hasty", meta={"haproxy_timeout_server": "300ms"})
    register(consul_agent, backends("q1"), name="narrow", meta={"haproxy_maxconn": "1"})
    sick = backends("c1")
    sick.state.health_status = 503  # its /health fails; /alive (any other path) answers 200
    register(consul_agent, sick, name="checked", meta={"haproxy_check_path": "/alive"}, check=False)
    gentle = {"haproxy_slowstart": "60s", "weight": "100"}
    register(consul_agent, backends("s1"), name="gentle", meta=gentle)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    for host, instance in (("hasty", "t1"), ("narrow", "q1"), ("checked", "c1")):
        wait_until(lambda h=host, i=instance: ask(stack.url, h)[1] == i, 30, f"{host} served by {instance}")
    # timeout_server 300ms: a 1 s answer is cut (504); a quick one is not.
    assert ask(stack.url + "slow/1000", "hasty")[0] == 504
    assert ask(stack.url + "slow/50", "hasty")[0] == 200
    # maxconn 1: two slow requests at once are served one after the other (queued, none failed).
    results: list[tuple[int, float]] = []

    def slow() -> None:
        began = time.monotonic()
        results.append((ask(stack.url + "slow/600", "narrow")[0], time.monotonic() - began))

    threads = [threading.Thread(target=slow) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(code for code, _ in results) == [200, 200]
    assert max(seconds for _, seconds in results) >= 1.1, results  # the second waited for the first
    # check_path /alive: the server is up although its /health fails (with /health it would be down).
    time.sleep(5)  # more than fall 2 × inter 2s: a failing check would have taken it out by now
    assert ask(stack.url, "checked")[1] == "c1"
    # slowstart: a server added to a running backend takes its full weight only gradually (HAProxy
    # never applies it to the servers it starts with).
    register(consul_agent, backends("s2"), name="gentle", meta=gentle)
    wait_until(lambda: ask(stack.url, "gentle")[1] == "s2", 30, "gentle served by s2 as well")
    weight = effective_weight(stack.master_socket, "gentle", "dev_s2")
    assert 0 < weight < 100, weight


def stat_rows(master_socket: Path) -> list[dict[str, str]]:
    """HAProxy's `show stat` now, one dict per proxy or server row."""
    from renderer.haproxy.control import MasterCLI

    csv = MasterCLI(str(master_socket)).worker_command("show stat")
    header, *rows = [line for line in csv.splitlines() if line.strip()]
    columns = header.lstrip("# ").split(",")
    return [dict(zip(columns, row.split(","), strict=False)) for row in rows]


def servers_in(master_socket: Path, backend: str) -> list[dict[str, str]]:
    """The `show stat` rows of `backend`'s servers."""
    rows = stat_rows(master_socket)
    return [row for row in rows if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")]


def servers_up(master_socket: Path, backend: str) -> set[str]:
    """The servers of `backend` HAProxy has UP now."""
    return {row["svname"] for row in servers_in(master_socket, backend) if row["status"].startswith("UP")}


def effective_weight(master_socket: Path, backend: str, server: str) -> int:
    """The weight HAProxy applies now to `backend/server` (`show stat`, column weight)."""
    rows = stat_rows(master_socket)
    for values in rows:
        if (values["pxname"], values["svname"]) == (backend, server):
            return int(values["weight"])
    names = sorted({values["pxname"] + "/" + values["svname"] for values in rows})
    raise AssertionError(f"no {backend}/{server} in `show stat`: {names}")


def test_a_storm_of_one_services_reloads_holds_no_other_services_new_instance_back(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """An attacker's review: `evil` changed its own settings every 100 ms, a reload a second, and the
    delivery slept through each gap (`min_reload_interval`), so a new instance of `shop` waited for
    the next reload (0.5-1.5 s). While a reload waits, the servers of the backends it leaves alone
    go through the Runtime API: the new instance comes in by itself (the timeline says `runtime`)."""
    register(consul_agent, backends("web-0"))
    register(consul_agent, backends("shop-0"), name="shop", check=False)
    evil = backends("evil-0")
    register(consul_agent, evil, name="evil", meta={"haproxy_timeout_server": "1000ms"}, check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    url = f"http://127.0.0.1:{stack.http_port}/"
    wait_until(lambda: ask(url, "shop")[1] == "shop-0", 30, "shop served")
    stop = threading.Event()

    def storm() -> None:
        flip = 0
        while not stop.is_set():  # a new value each time: every render holds a structural change
            flip += 1
            register(consul_agent, evil, name="evil", meta={"haproxy_timeout_server": f"{1000 + flip}ms"}, check=False)
            stop.wait(0.1)

    flipping = threading.Thread(target=storm, daemon=True)
    flipping.start()
    try:
        before = reloads(stack)
        wait_until(lambda: reloads(stack) >= before + 2, 30, "the storm's reloads")
        register(consul_agent, backends("shop-1"), name="shop", check=False)
        wait_until(lambda: "shop-1" in {ask(url, "shop")[1] for _ in range(2)}, 30, "shop-1 served")  # round robin

        def recorded() -> list[dict[str, Any]]:  # HAProxy serves it a moment before the timeline has it
            changes = get_json(f"http://127.0.0.1:{stack.status_port}/status")["changes"]
            return [c for c in changes if any("shop-1" in server for server in c["added"]["shown"])]

        added = wait_until(recorded, 10, "shop-1's change in the timeline")
    finally:
        stop.set()
        flipping.join(5)
    assert [c["kind"] for c in added] == ["runtime"], added


def storm_of_one(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends,
    flip: Callable[[int], dict[str, Any]],
) -> tuple[dict[str, Any], int, set[str]]:  # fmt: skip
    """`evil` registered again every 100 ms for 12 s (the first hold, 10 s and to the next turn of
    30 s, may end within it) with `flip(n)`'s registration arguments, then a brand-new service
    registered and waited for: the renderer's /status then, the reloads since the storm began, and
    every note /status showed, read once a second from the storm on (a hold may end before the last
    read, with the service gone: a CI run's flake)."""
    register(consul_agent, backends("web-0"))
    evil = backends("evil-0")
    register(consul_agent, evil, name="evil", check=False, **flip(0))
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    url = f"http://127.0.0.1:{stack.http_port}/"
    wait_until(lambda: ask(url, "evil")[1] == "evil-0", 30, "evil served")
    before = reloads(stack)
    started = time.monotonic()
    n = 0
    seen: set[str] = set()

    def status() -> dict[str, Any]:
        found = get_json(f"http://127.0.0.1:{stack.status_port}/status")
        assert isinstance(found, dict)
        seen.update(note for notes in found["left_out"].values() for note in notes)
        return found

    while time.monotonic() - started < 12:
        n += 1
        register(consul_agent, evil, name="evil", check=False, **flip(n))
        if n % 10 == 0:
            status()
        time.sleep(0.1)
    register(consul_agent, backends("fresh-0"), name="fresh", check=False)
    wait_until(lambda: ask(url, "fresh")[1] == "fresh-0", 30, "the brand-new service served")
    return status(), reloads(stack) - before, seen


def test_one_service_flipping_its_settings_is_held_and_the_reload_gap_stays_at_its_floor(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """The last note's storm price: `evil` flipping its balance every 100 ms made a reload storm,
    HAProxy's reload gap grew for everyone, and a brand-new service (a reload) waited 0.4-6.5 s for
    it. Its settings are held now (renderer/render/flaps.py): a handful of reloads, the gap stays
    at `min_reload_interval`, the check says why, and a brand-new service comes in with its reload."""
    balances = ("roundrobin", "leastconn", "first")
    now, made, seen = storm_of_one(
        tmp_path, consul_agent, haproxy_bin, track, backends,
        lambda n: {"meta": {"haproxy_balance": balances[0 if n == 0 else 1 + n % 2]}},
    )  # fmt: skip
    held = [n for n in seen if n.startswith("service evil: its settings")]
    assert held and "waits" in held[0], seen
    assert now["reload_gap_s"] == 1.0, now["reload_gap_s"]  # never lengthened: 6 reloads a minute are its burst
    assert made <= 5, made  # ~120 flips: the burst, the first hold's end, fresh


def test_one_service_toggling_its_lb_tag_is_kept_listed_and_the_reload_gap_stays_at_its_floor(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """An attacker's review (/tmp/rev38): `evil` toggling its own `lb` tag every 100 ms made its
    backend come and go, a reload each time (the settings hold forgot it whenever it left): 11
    reloads in 20 s, HAProxy's gap at 7.3 s, a brand-new service served 4.8-5.6 s after its
    registration. Past a burst it stays listed now (render/flaps.py, PresenceFlaps)."""
    now, made, seen = storm_of_one(
        tmp_path, consul_agent, haproxy_bin, track, backends, lambda n: {"tags": (("lb",), ())[n % 2]}
    )
    kept = [n for n in seen if n.startswith("service 'evil': left the listing")]
    assert kept, seen
    assert now["reload_gap_s"] == 1.0, now["reload_gap_s"]  # never lengthened: 6 reloads a minute are its burst
    assert made <= 8, made  # ~120 toggles: the burst's 6 or 7, then fresh


def test_fifty_names_toggled_below_their_own_burst_change_the_listing_on_turns(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """One registrant's 50 names, their `lb` tags toggled in turn (one every 0.3 s: each name leaves
    twice at most, below its own hold's burst), made a listing change each, and the reloads grew
    HAProxy's gap for everyone (each name toggled once a minute, end to end: 17 and 9 reloads a
    minute, the gap at 7-12 s, brand-new services 0.8-4.7 s). Past the listing's own burst its
    changes wait for turns of 30 s (render/flaps.py): the gap stays at its floor, the check names
    the waiting services, and a brand-new service comes in at once."""
    register(consul_agent, backends("web-0"))
    evil = backends("evil-0")
    agent = consul_client(consul_agent).agent
    names = [f"ev{n:02}" for n in range(50)]
    for name in names:
        agent.service.register(name, service_id=name, address="127.0.0.1", port=evil.port, tags=["lb"])
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    url = f"http://127.0.0.1:{stack.http_port}/"
    wait_until(lambda: ask(url, names[-1])[1] == "evil-0", 30, "the names served")
    before = reloads(stack)
    notes: list[str] = []
    for n in range(133):  # 40 s: every name leaves, comes back, and a third of them leave again
        name, on = names[n % 50], (n // 50) % 2 == 1
        agent.service.register(name, service_id=name, address="127.0.0.1", port=evil.port, tags=["lb"] if on else [])
        time.sleep(0.3)
        if n % 10 == 9:
            left_out = get_json(f"http://127.0.0.1:{stack.status_port}/status")["left_out"]
            notes += [note for items in left_out.values() for note in items if "more than 6 times" in note]
    register(consul_agent, backends("fresh-0"), name="fresh", check=False)
    wait_until(lambda: ask(url, "fresh")[1] == "fresh-0", 30, "the brand-new service served")
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert status["reload_gap_s"] == 1.0, status["reload_gap_s"]  # never lengthened: 6 reloads a minute are its burst
    assert reloads(stack) - before <= 12, reloads(stack) - before  # 133 listing changes: the burst, turns, fresh
    assert notes and "wait for the next turn of 30 s" in notes[0], notes[:1]
