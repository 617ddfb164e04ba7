"""The status server: the page with nothing external, read-only answers, basic auth, no token shown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from renderer.config import Config, load
from renderer.errors import ApplyKind, ConfigError, FailureReason
from renderer.status import Status, StatusServer
from renderer.status.served import MAX_LEFT_OUT_LISTED, of_service
from renderer.status.server import load_page

DEST = "/etc/haproxy/haproxy.cfg"
TOKEN = "6a1c7d2e-secret-token"
CONFIG = "backend web\n    server a 10.0.0.1:80 check\n"


def status() -> Status:
    status = Status(templates=1)
    status.now_serving(DEST, CONFIG, ApplyKind.RELOAD, 0.1)
    status.now_serving(DEST, CONFIG + "    server b 10.0.0.2:80 check\n", ApplyKind.RUNTIME, 0.01)
    status.destination_ok(DEST)
    return status


def serve(server: StatusServer, scenario: Callable[[TestClient], Awaitable[None]]) -> None:
    async def run() -> None:
        async with TestClient(TestServer(server.app())) as client:
            await scenario(client)

    asyncio.run(run())


def basic(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def test_the_page_has_no_external_asset_and_its_policy_allows_only_its_own_script_and_style() -> None:
    page, policy = load_page()
    text = page.decode()
    assert not re.findall(r"""(?:src|href)=["'](?!data:)""", text), "an external asset"
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text
    script = re.search(r"<script>(.*?)</script>", text, re.DOTALL)
    assert script is not None
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy
    assert "innerHTML" not in text, "catalog text reaches the page as text, never as markup"
    assert text.count('<th scope="col">') >= 6


def test_without_a_login_everything_is_open_and_read_only() -> None:
    async def scenario(client: TestClient) -> None:
        page = await client.get("/")
        assert page.status == 200 and "Content-Security-Policy" in page.headers
        snapshot = await (await client.get("/status")).json()
        assert snapshot["served"][DEST]["servers"] == 2 and snapshot["changes"][0]["kind"] == "runtime"
        diff = await client.get("/diff", params={"template": DEST})
        assert "+    server b 10.0.0.2:80 check" in await diff.text()
        assert (await client.get("/diff", params={"template": "/etc/passwd"})).status == 404
        assert (await client.post("/status")).status == 405

    serve(StatusServer(status(), "127.0.0.1", 0), scenario)


def test_with_a_login_the_page_status_and_diff_ask_for_it_and_metrics_health_ready_do_not() -> None:
    async def scenario(client: TestClient) -> None:
        for path in ("/", "/status", f"/diff?template={DEST}", f"/left-out?template={DEST}&service=web"):
            refused = await client.get(path)
            assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith(
                'Basic realm="consul-renderer"'
            )
            assert (await client.get(path, headers=basic("ops:wrong"))).status == 401
            assert (await client.get(path, headers=basic("ops:s3cret-pass"))).status == 200
        for path in ("/metrics", "/health", "/ready"):
            assert (await client.get(path)).status == 200

    serve(StatusServer(status(), "127.0.0.1", 0, login="ops:s3cret-pass"), scenario)


def test_the_consul_token_is_never_shown() -> None:
    leaky = status()
    leaky.fail(DEST, FailureReason.CONSUL, f"refused with token {TOKEN}")

    async def scenario(client: TestClient) -> None:
        body = await (await client.get("/status")).text()
        assert TOKEN not in body and "[redacted]" in body

    serve(StatusServer(leaky, "127.0.0.1", 0, secrets=(TOKEN,)), scenario)


def config(**flags: str) -> Config:
    return load(None, {"template": (), "vars": {}, **flags}, environ={})


def test_a_status_port_of_0_is_refused_with_what_to_write_instead() -> None:
    """helper-145: the status server took the kernel's choice of port, while its registration, its
    check and the ports kept from catalog listeners all said 0."""
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:0: port 0 is not taken.*127\.0\.0\.1:9464, or off"):
        config(status_addr="127.0.0.1:0")
    assert 9464 in config(status_addr="127.0.0.1:9464").reserved_ports


def test_the_status_server_stays_on_loopback_unless_it_asks_for_a_login() -> None:
    assert config().status_login is None
    assert config(status_addr="127.0.0.1:9464", status_auth="ops:pw").status_login == "ops:pw"
    with pytest.raises(ConfigError, match=r"status_addr 0\.0\.0\.0:9464 is not a loopback address: set status_auth"):
        config(status_addr="0.0.0.0:9464")
    assert config(status_addr="0.0.0.0:9464", status_auth="ops:pw").status_login == "ops:pw"
    with_stats = load(None, {"template": (), "vars": {"stats_auth": "admin:x"}, "status_addr": "10.0.0.5:9464"}, {})
    assert with_stats.status_login == "admin:x"  # the stats page's own credentials
    for bad in ("nopassword", ":pw", "ops:", "ops: pw"):
        with pytest.raises(ConfigError, match="status_auth: expected USER:PASSWORD"):
            config(status_auth=bad)
    assert config(max_data_age="90s").max_data_age == 90.0
    assert load(None, {"template": (), "vars": {}}, {"CONSUL_RENDERER_MAX_DATA_AGE": "2m"}).max_data_age == 120.0


async def ends(reader: asyncio.StreamReader) -> bytes:
    """What a connection gets until the server ends it: closed, or reset (one closed for a newcomer)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def test_idle_connections_are_capped_and_closed_so_the_renderer_keeps_its_file_descriptors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review's finding: 1,100 connections sending half a request (no request whole, so no login
    asked) took every file descriptor: the next file write failed and /health stopped answering.
    Past MAX_CONNECTIONS a connection is closed as it comes, and one idle or unfinished for
    KEEPALIVE_TIMEOUT_S is closed too."""
    import renderer.status.server as server_module
    from lab.processes import free_port

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 20)
    monkeypatch.setattr(server_module, "KEEPALIVE_TIMEOUT_S", 0.5)

    async def run() -> tuple[int, int, int, bytes]:
        port = free_port()
        server = StatusServer(status(), "127.0.0.1", port)
        await server.start()
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        for _, writer in streams:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        await asyncio.sleep(0.2)
        assert server._runner is not None and server._runner.server is not None
        held = len(server._runner.server.connections)
        ended = [await asyncio.wait_for(ends(reader), 3) for reader, _ in streams]  # all end: capped or timed out
        left = len(server._runner.server.connections)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 3)
        for _, stream in [*streams, (reader, writer)]:
            stream.close()
        await server.stop()
        return held, len(ended), left, answer

    held, ended, left, answer = asyncio.run(asyncio.wait_for(run(), 20))
    assert held <= 20 and ended == 40 and left == 0
    assert answer.startswith(b"HTTP/1.1 200")


def test_one_remote_client_cannot_take_every_connection_and_loopback_keeps_a_few() -> None:
    """A review's finding: with one cap for all, a client reopening 140 connections as the idle ones
    closed kept /health (the Docker health check, the Consul check) from answering 16 times in 20."""
    from renderer.status.server import LOOPBACK_RESERVED, MAX_CONNECTIONS, MAX_PER_CLIENT, admitted

    one = ["203.0.113.9"] * MAX_PER_CLIENT
    assert not admitted("203.0.113.9", one) and admitted("198.51.100.7", one)
    many = [f"203.0.113.{n}" for n in range(MAX_CONNECTIONS - LOOPBACK_RESERVED)]
    assert not admitted("198.51.100.7", many) and admitted("127.0.0.1", many) and admitted("::1", many)
    assert not admitted("127.0.0.1", many + ["127.0.0.1"] * LOOPBACK_RESERVED)  # the cap holds for all


def at(*held: tuple[str, str]) -> list[tuple[Any, str]]:
    """`room_for`'s table from (address, state) pairs."""
    from renderer.status.server import peer_of

    return [(peer_of(host), state) for host, state in held]


def test_a_newcomer_takes_the_place_of_the_oldest_connection_that_gives_way_it_may() -> None:
    from renderer.status.server import (
        BUSY,
        CLOSING,
        FRESH,
        IDLE,
        LOOPBACK_RESERVED,
        MAX_CONNECTIONS,
        MAX_PER_CLIENT,
        QUEUED,
        SENDING,
        STALLED,
        peer_of,
        room_for,
    )

    local, remote_one, remote_two = peer_of("127.0.0.1"), peer_of("198.51.100.7"), peer_of("203.0.113.9")
    full = at(*[("127.0.0.1", IDLE)] * MAX_CONNECTIONS)
    assert room_for(local, full) == 0  # the oldest idle one goes
    assert room_for(local, at(("127.0.0.1", BUSY), *[("127.0.0.1", IDLE)] * (MAX_CONNECTIONS - 1))) == 1
    assert room_for(remote_two, full) is None  # a remote client never closes a loopback one
    remote = at(*[(f"203.0.113.{n}", IDLE) for n in range(MAX_CONNECTIONS - LOOPBACK_RESERVED)])
    assert room_for(remote_one, remote) == 0 and room_for(local, remote) == -1
    own = at(("198.51.100.7", BUSY), ("203.0.113.1", IDLE), *[("198.51.100.7", IDLE)] * (MAX_PER_CLIENT - 1))
    assert room_for(remote_one, own) == 2  # at its own cap: one of its own, not another's
    # closing first, then idle, then queued (pipelined), then stalled
    rest = [("127.0.0.1", BUSY)] * (MAX_CONNECTIONS - 4)
    assert room_for(local, at(("::1", STALLED), ("::1", QUEUED), ("::1", IDLE), ("::1", CLOSING), *rest)) == 3
    assert room_for(local, at(("::1", STALLED), ("::1", QUEUED), ("::1", BUSY), ("::1", BUSY), *rest)) == 1
    assert room_for(local, at(("::1", BUSY), ("::1", STALLED), ("::1", BUSY), ("::1", BUSY), *rest)) == 1
    # busy ones: never for a remote newcomer; for a loopback one (the health check), the oldest, last
    busy_remote = at(*[(f"203.0.113.{n}", BUSY) for n in range(MAX_CONNECTIONS)])
    assert room_for(remote_one, busy_remote) is None and room_for(local, busy_remote) == 0
    # for a loopback one: one sending an answer first, then a fresh one (no request yet), then busy
    last = [("203.0.113.1", BUSY), ("203.0.113.2", FRESH), ("203.0.113.3", SENDING), ("203.0.113.4", FRESH)]
    last_table = at(*last, *[(f"203.0.114.{n}", BUSY) for n in range(MAX_CONNECTIONS - 4)])
    assert room_for(local, last_table) == 2 and room_for(remote_one, last_table) is None
    assert room_for(local, at(*last[:2], *[(f"203.0.114.{n}", BUSY) for n in range(MAX_CONNECTIONS - 2)])) == 1


def test_one_ipv6_64_counts_as_one_network_and_each_address_as_one_client() -> None:
    """An attacker's review: the cap was by address, so eight addresses of one /64 (one host holds
    it whole) took every remote place, and a scraper elsewhere was refused. A later review: one cap
    per /64 made a SLAAC LAN's operators share 16 connections. Now 16 per address, 64 per /64."""
    from renderer.status.server import MAX_PER_CLIENT, MAX_PER_NETWORK, Peer, admitted, peer_of

    one = [f"2001:db8:1:2::{n:x}" for n in range(MAX_PER_CLIENT)]
    assert admitted("2001:db8:1:2::ffff", one) and admitted("2001:db8:1:3::1", one)
    assert not admitted("2001:db8:1:2::5", ["2001:db8:1:2::5"] * MAX_PER_CLIENT)  # 16 from that address already
    network = [f"2001:db8:1:2::{n:x}" for n in range(MAX_PER_NETWORK)]
    assert not admitted("2001:db8:1:2::ffff", network) and admitted("2001:db8:1:3::1", network)
    assert peer_of("::ffff:203.0.113.9") == Peer("203.0.113.9", "203.0.113.9", False)
    assert peer_of("::ffff:127.0.0.1") == Peer("127.0.0.1", "127.0.0.1", True) and peer_of("::1").loopback
    assert peer_of("2001:db8:1:2::5") == Peer("2001:db8:1:2::5", "2001:db8:1:2::/64", False)


def health_under_attack(attacker: Callable[[int], Awaitable[None]], clients: int, probes: int) -> list[bytes]:
    """/health's answers to `probes` loopback probes while `clients` copies of `attacker(port)` run
    against a status server of 20 places."""
    from lab.processes import free_port

    async def run() -> list[bytes]:
        port = free_port()
        server = StatusServer(status(), "127.0.0.1", port)
        await server.start()
        attack = [asyncio.create_task(attacker(port)) for _ in range(clients)]
        answers = []
        try:
            await asyncio.sleep(0.5)
            for _ in range(probes):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    answers.append(await asyncio.wait_for(reader.read(), 3))
                    writer.close()
                except (OSError, TimeoutError):
                    answers.append(b"")
                await asyncio.sleep(0.05)
        finally:
            for task in attack:
                task.cancel()
            await asyncio.gather(*attack, return_exceptions=True)
            await server.stop()
        return answers

    return asyncio.run(asyncio.wait_for(run(), 30))


def test_a_loopback_client_reopening_half_sent_requests_cannot_keep_health_from_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker's review: one loopback process reopening more half-sent requests than the table
    holds, each as soon as it was closed, kept /health (the Docker health check, the Consul check)
    from answering: 0 probes in 15."""
    import renderer.status.server as server_module

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 20)

    async def half_sent(port: int) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /health HTTP/1.1\r\n")  # never finished
                await reader.read()  # until the server closes it
                writer.close()
            except OSError:
                await asyncio.sleep(0.01)

    answers = health_under_attack(half_sent, clients=28, probes=5)
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers


def _sockets_open() -> int:
    """Sockets this process holds (client and server side alike)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_clients_that_never_read_a_large_answer_hold_no_more_sockets_than_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker's review: a connection closed for a newcomer was closed gracefully, so its socket
    stayed open until the peer read the rest of a 2.2 MB page: 150 such clients held 150 sockets
    with the cap at 20. Now the connection that gives way is aborted, and one closing is counted
    until its socket is closed."""
    import renderer.status.server as server_module
    from lab.processes import free_port

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 20)
    clients = 60

    async def run() -> tuple[int, bytes]:
        port = free_port()
        server = StatusServer(status(), "127.0.0.1", port)
        await server.start()
        server._page = b"x" * 2_200_000  # what a large catalog's page-sized answer would be
        before = _sockets_open()
        loop = asyncio.get_running_loop()
        held = []
        try:
            for _ in range(clients):
                client = socket.socket()
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
                client.setblocking(False)
                held.append(client)
                await loop.sock_connect(client, ("127.0.0.1", port))
                await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")  # never read
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            server_side = _sockets_open() - before - clients
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 3)
            writer.close()
        finally:
            for client in held:
                client.close()
            await server.stop()
        return server_side, answer

    server_side, answer = asyncio.run(asyncio.wait_for(run(), 30))
    assert server_side <= 20, f"{server_side} server-side sockets held for {clients} clients with the cap at 20"
    assert answer.startswith(b"HTTP/1.1 200")


def test_clients_pipelining_requests_cannot_keep_health_from_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a client sending 40 requests at once and topping the queue up as answers came had
    requests to answer at every moment, so it counted busy and never gave way: 20 such clients kept
    /health from answering 20 probes in 20. Requests queued behind the one answered (no browser
    pipelines) now give way."""
    import renderer.status.server as server_module

    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 20)
    one = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"

    async def pipelining(port: int) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(one * 40)
                answered = 0
                while data := await reader.read(65536):
                    answered += data.count(b"HTTP/1.1 200")
                    if answered >= 20:  # topped up before the queue drains
                        writer.write(one * 20)
                        answered -= 20
            except OSError:
                pass
            await asyncio.sleep(0.01)

    answers = health_under_attack(pipelining, clients=20, probes=10)
    assert all(answer.startswith(b"HTTP/1.1 200") for answer in answers), answers


def test_a_connection_is_stalled_only_while_its_peer_reads_slower_than_the_least_rate() -> None:
    """A review: any connection with unsent data counted as stalled and gave way, so a client reading
    a large answer slowly, but reading, had it cut by newcomers that never read; the next review:
    "shrank at all within 3 s" let clients reading 4 kB every 2.5 s hold 10 MB answers for hours.
    Now a peer reading less than MIN_SEND_RATE over a SEND_WINDOW_S is stalled. And aiohttp's states
    are read as they are: a request taken off the queue, its handler not yet run, is not idle
    (Python 3.11 runs it later); a connection with no request yet is fresh, not idle, for FRESH_S
    (a review: a health check's connection was cut before its request was read)."""
    from renderer.status.server import (
        BUSY,
        FRESH,
        FRESH_S,
        IDLE,
        MIN_SEND_RATE,
        QUEUED,
        SEND_WINDOW_S,
        SENDING,
        STALLED,
        Peer,
        _Held,
        _state,
    )

    class Transport:
        def __init__(self) -> None:
            self.buffered = 0

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def is_closing(self) -> bool:
            return False

    def handler(messages: int, in_progress: bool, waiting: bool, count: int) -> Any:
        waiter = loop.create_future() if waiting else None
        return SimpleNamespace(
            _messages=[object()] * messages, _request_in_progress=in_progress, _waiter=waiter, _request_count=count
        )

    loop = asyncio.new_event_loop()
    transport = Transport()
    peer = Peer("::1", "::1", True)
    held = _Held(transport, handler(0, True, False, 1), peer, None, 0.0)  # type: ignore[arg-type]
    transport.buffered, now = 4_000_000, 100.0
    assert _state(held, now) == SENDING
    for _ in range(3):  # the peer reads at twice the least rate: never stalled
        now += SEND_WINDOW_S
        transport.buffered -= int(2 * MIN_SEND_RATE * SEND_WINDOW_S)
        assert _state(held, now) == SENDING
    now += SEND_WINDOW_S
    transport.buffered -= 4096  # a trickle, as the review's attacker read
    assert _state(held, now) == STALLED
    assert _state(held, now + 1) == STALLED  # judged again at the window's end
    transport.buffered = 0
    assert _state(held, now + 2) == BUSY  # all sent
    states = {
        "waiting for a request": handler(0, False, True, 1),
        "not started, fresh": handler(0, False, False, 0),
        "taken off the queue, not run yet": handler(0, False, False, 1),
        "whole, not taken yet": handler(1, False, False, 1),
        "answering": handler(0, True, False, 1),
        "answering, one queued": handler(1, True, False, 2),
        "two queued": handler(2, False, False, 2),
    }
    got = {name: _state(_Held(transport, h, peer, None, 0.0), 0.5) for name, h in states.items()}  # type: ignore[arg-type]
    assert got == {
        "waiting for a request": IDLE, "not started, fresh": FRESH, "taken off the queue, not run yet": BUSY,
        "whole, not taken yet": BUSY, "answering": BUSY, "answering, one queued": QUEUED, "two queued": QUEUED,
    }  # fmt: skip
    not_started = _Held(transport, handler(0, False, False, 0), peer, None, 0.0)  # type: ignore[arg-type]
    assert _state(not_started, FRESH_S + 0.1) == IDLE  # no request after FRESH_S: it gives way
    loop.close()


def test_a_request_announcing_a_body_it_never_sends_is_answered_and_closed_at_once() -> None:
    """An attacker's review: aiohttp waited up to 10 s (its lingering time) for a body a request
    announced and never sent, the connection counting busy all that while, so a loopback process
    repeating such requests kept /health from answering 10 probes in 10. No route takes a body: the
    answer is sent and the connection closed at once."""
    from lab.processes import free_port

    async def run() -> tuple[bytes, float]:
        port = free_port()
        server = StatusServer(status(), "127.0.0.1", port)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            began = time.monotonic()
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 8)  # until the server closes it
            took = time.monotonic() - began
            writer.close()
        finally:
            await server.stop()
        return answer, took

    answer, took = asyncio.run(asyncio.wait_for(run(), 20))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok\n")
    assert took < 5, f"the connection was held {took:.1f} s after its answer"


def test_without_a_login_the_page_answers_only_an_ip_or_localhost_host() -> None:
    """An attacker's review: any Host was answered, so a web page the operator opened could rebind
    its own name to 127.0.0.1 and read /status (the catalog) and /diff (the config) from the browser."""
    from renderer.status.server import host_allowed

    async def scenario(client: TestClient) -> None:
        for path in ("/", "/status", f"/diff?template={DEST}", f"/left-out?template={DEST}&service=web"):
            refused = await client.get(path, headers={"Host": "attacker.example:9464"})
            assert refused.status == 421 and "status_auth" in await refused.text()
            assert (await client.get(path, headers={"Host": "localhost:9464"})).status == 200
        for path in ("/metrics", "/health"):  # scrapers by a service name (compose) still read these
            assert (await client.get(path, headers={"Host": "haproxy:9464"})).status == 200

    serve(StatusServer(status(), "127.0.0.1", 0), scenario)
    assert host_allowed("127.0.0.1:9464", "") and host_allowed("[::1]:9464", "") and host_allowed("[fe80::1]", "")
    assert host_allowed("app.localhost", "") and host_allowed(None, "") and host_allowed("LB1:9464", "lb1")
    assert not host_allowed("127.0.0.1.nip.io", "") and not host_allowed("", "") and not host_allowed("[::1", "")
    # other loopback names of /etc/hosts go to the browser machine's resolver (search domains, LLMNR),
    # which whoever is on its network may answer: a rebinding name like any other (a review)
    for name in ("localhost.localdomain:9464", "localhost4", "ip6-localhost", "ip6-loopback", "localhost6"):
        assert not host_allowed(name, ""), name

    async def with_login(client: TestClient) -> None:  # a login guards it: any name may ask
        answer = await client.get("/status", headers={"Host": "ops.example", **basic("ops:pw")})
        assert answer.status == 200

    serve(StatusServer(status(), "127.0.0.1", 0, login="ops:pw"), with_login)


def test_status_asked_in_a_loop_builds_a_costly_snapshot_a_few_times_not_each_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attacker's review: /status is built on the renderer's own loop, and 8 clients asking in a
    loop made a 10 ms tick of it take 415 ms (a hostile state's snapshot: 60-100 ms each)."""
    import time

    state = status()
    real, builds = state.snapshot, 0

    def costly() -> Any:
        nonlocal builds
        builds += 1
        time.sleep(0.02)  # a big state's build, on the loop
        return real()

    monkeypatch.setattr(state, "snapshot", costly)

    async def scenario(client: TestClient) -> None:
        started = time.monotonic()
        answers = 0
        while time.monotonic() - started < 0.5:
            answer = await client.get("/status")
            assert answer.status == 200 and (await answer.json())["ready"] is True
            answers += 1
        assert answers >= 10 and builds <= 2 + (time.monotonic() - started) / 0.4, (answers, builds)

    serve(StatusServer(state, "127.0.0.1", 0), scenario)


def test_consul_renderer_status_says_what_to_do_when_the_host_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A review: `consul-renderer status` against a name the status server refuses (421) printed the
    code alone."""
    import threading

    import renderer.status.server as server_module
    from lab.processes import free_port
    from renderer import cli

    monkeypatch.setattr(server_module, "host_allowed", lambda _header, _bound: False)
    port = free_port()
    loop = asyncio.new_event_loop()
    server = StatusServer(status(), "127.0.0.1", port)
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        assert cli.main(["status", "--status-addr", f"127.0.0.1:{port}"]) == 3
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(server.stop())
        loop.close()
    err = capsys.readouterr().err
    assert "answered 421" in err and "--status-addr as IP:PORT" in err and "status_auth" in err


def test_requests_aiohttp_cannot_parse_log_one_traceback_a_minute_not_one_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A review: every request with too many headers logged aiohttp's whole "Error handling
    request" traceback, so any client could flood the renderer's log. Each such message is now said
    once in HTTP_LOG_EVERY_S at most."""
    from lab.processes import free_port

    headers = b"".join(b"X-%d: y\r\n" % n for n in range(200))

    async def run() -> list[bytes]:
        port = free_port()
        server = StatusServer(status(), "127.0.0.1", port)
        await server.start()
        answers = []
        try:
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
                answers.append(await asyncio.wait_for(ends(reader), 3))
                writer.close()
        finally:
            await server.stop()
        return answers

    with caplog.at_level("DEBUG"):
        answers = asyncio.run(asyncio.wait_for(run(), 20))
    assert all(answer.split(b" ")[1] == b"400" for answer in answers), answers
    said = [record for record in caplog.records if record.name.startswith("renderer.status.server.http")]
    assert len(said) == 1, [record.getMessage() for record in said]


def test_what_is_left_out_of_one_service_is_found_among_more_than_are_listed() -> None:
    """helper-133 (/tmp/rev79): 1,000 services with one bad instance each, named to sort first, fill
    the 1,000 items listed and a real service's problem is on neither /status nor the page. The
    page asks /left-out for one service's items."""
    state = status()
    flood = tuple(f"service a{n:04}, instance 'x' on node 'n', field Address: bad" for n in range(1000))
    victim = "service web, instance 'w1' on node 'n', field Weight: 'heavy' is not a weight"
    odd = "service 'we, b', instance 'o1' on node 'n', field Address: bad"  # a name quoted, a comma in it
    state.set_left_out(DEST, (*flood, victim, "service web-2, instance 'x' on node 'n', field Port: bad", odd))

    async def scenario(client: TestClient) -> None:
        snapshot = await (await client.get("/status")).json()
        assert victim not in snapshot["left_out"][DEST] and snapshot["left_out_total"][DEST] == 1003
        found = await (await client.get("/left-out", params={"template": DEST, "service": "web"})).json()
        assert found["total"] == 1 and found["left_out"] == [
            {"what": "service web, instance 'w1' on node 'n', field Weight", "why": "'heavy' is not a weight"}
        ]
        quoted = await (await client.get("/left-out", params={"template": DEST, "service": "we, b"})).json()
        assert quoted["total"] == 1 and quoted["left_out"][0]["what"].startswith("service 'we, b', instance 'o1'")
        none = await (await client.get("/left-out", params={"template": DEST, "service": "api"})).json()
        assert none == {"template": DEST, "service": "api", "total": 0, "left_out": []}
        unknown = await client.get("/left-out", params={"template": "/etc/passwd", "service": "web"})
        assert unknown.status == 404 and DEST in await unknown.text()
        for service in ("", "x" * 1025):
            assert (await client.get("/left-out", params={"template": DEST, "service": service})).status == 400

    serve(StatusServer(state, "127.0.0.1", 0), scenario)


def test_a_search_kept_for_the_same_items_does_not_hold_items_since_replaced() -> None:
    """The last /left-out answer is kept while the template's items are the same; it held those
    items (100,000 at times) in memory after they were replaced, until the next search (helper-140)."""
    state, gone = status(), tuple(f"service web, instance 'w{n}' on node 'n', field Address: bad" for n in range(3))
    held = sys.getrefcount(gone)
    state.set_left_out(DEST, gone)
    replaced = ("service web, instance 'w9' on node 'n', field Address: bad",)

    async def scenario(client: TestClient) -> None:
        assert (await (await client.get("/left-out", params={"template": DEST, "service": "web"})).json())["total"] == 3
        state.set_left_out(DEST, replaced)
        assert sys.getrefcount(gone) == held  # nothing but this test holds the replaced items
        again = await (await client.get("/left-out", params={"template": DEST, "service": "web"})).json()
        assert again["total"] == 1 and again["left_out"][0]["what"].startswith("service web, instance 'w9'")

    serve(StatusServer(state, "127.0.0.1", 0), scenario)


def test_one_services_items_are_bounded_and_counted() -> None:
    items = tuple(f"service web, instance 'w{n:04}' on node 'n', field Address: bad" for n in range(1500))
    found, total = of_service((*items, "service web: instances disagree on meta"), "web")
    assert total == 1501 and len(found) == MAX_LEFT_OUT_LISTED and found[0] == items[0]
    assert of_service(items, "we") == ([], 0)  # a prefix of the name is another service


def test_a_long_service_name_is_found_as_the_reports_cut_it() -> None:
    """helper-139 (/tmp/rev85): the listing's notes cut a name at 100 characters and an instance's
    items at QUOTED_LIMIT; a name longer was not found at all."""
    from renderer.logs import shown
    from renderer.source.dependency import QUOTED_LIMIT, shown_name
    from renderer.status.served import NAME_CUTS

    assert NAME_CUTS == (100, QUOTED_LIMIT)
    for name in ("s" * 150, "t" * 300):
        items = (f"service {shown(name, 100)}: left the listing 5 times lately",
                 f"service {shown_name(name)}, instance 'x' on node 'n', field Address: bad")  # fmt: skip
        assert of_service(items, name) == (list(items), 2)
