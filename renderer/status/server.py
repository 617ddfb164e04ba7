"""The status server: the operator's page and what machines read.

- `/` the page (renderer/status/page.html: no external asset, works offline; it polls `/status`
  twice a second and draws what the snapshot says, nothing it computes itself);
- `/status` the snapshot as JSON; `/diff?template=DEST` the live file against the previous one;
- `/metrics` (Prometheus), `/health` (the process runs), `/ready` (everything applied).

Read-only: no route changes anything. With a login (`status_auth`, see renderer/config.py), the
page, `/status` and `/diff` ask for it by basic auth; `/metrics`, `/health` and `/ready` never do
(scrapers and health checks). Without a login, the page, `/status` and `/diff` answer only a
request whose Host is an IP address or localhost (`host_allowed`: DNS rebinding). Every answer is
passed through `redact` with the Consul token, and the diff hides the passwords a config file carries.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import generate_latest

from renderer.logs import redact
from renderer.status.diff import file_diff
from renderer.status.model import Status
from renderer.status.served import LeftOut, of_service

log = logging.getLogger(__name__)

PROTECTED = frozenset({"/", "/status", "/diff", "/left-out"})
# Connections the server holds at once; one more is closed as it comes. A client that opened a
# thousand idle ones (no request, so no login asked) took every file descriptor: the next file write
# failed and /health stopped answering.
MAX_CONNECTIONS = 128
MAX_PER_CLIENT = 16  # from one remote address: one client cannot fill the table
MAX_PER_NETWORK = 64  # from one remote IPv6 /64 (one host may hold it whole; a SLAAC LAN shares one)
LOOPBACK_RESERVED = 8  # of MAX_CONNECTIONS, only loopback may take (the health check, the local operator)
KEEPALIVE_TIMEOUT_S = 5.0  # an idle connection, or one whose request has not come whole, is closed after this
SHUTDOWN_TIMEOUT_S = 1.0  # at stop, requests still answered get this long (a slow reader held a stop 122 s)
REALM = "consul-renderer"
MAX_SERVICE_ASKED = 1024  # characters of a service name /left-out is asked for (the items quote ≤ 200)
# aiohttp's own messages (a request it cannot parse, with a traceback): each kind once in this long
# at most (a review: every oversized header block from a client logged a whole traceback)
HTTP_LOG_EVERY_S = 60.0
SNAPSHOT_REUSE_FACTOR, SNAPSHOT_REUSE_MAX_S = 20.0, 1.0  # see StatusServer._snapshot
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_page() -> tuple[bytes, str]:
    """The page and the Content-Security-Policy that lets exactly its own inline script and style run."""
    text = resources.files("renderer.status").joinpath("page.html").read_text(encoding="utf-8")
    sources = []
    for kind, tag in (("script", "script"), ("style", "style")):
        hashes = " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
        )
        sources.append(f"{kind}-src {hashes}")
    policy = "; ".join(
        ["default-src 'none'", *sources, "connect-src 'self'", "img-src 'self' data:", "base-uri 'none'",
         "form-action 'none'", "frame-ancestors 'none'"]
    )  # fmt: skip
    return text.encode(), policy


class _Sparse(logging.Filter):
    """Lets a record through when no record of the same message (its format, not its arguments) went
    through in the last `every_s`."""

    def __init__(self, every_s: float) -> None:
        super().__init__()
        self._every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = str(record.msg)[:200], time.monotonic()
        if now - self._last.get(key, -self._every_s) < self._every_s:
            return False
        if len(self._last) >= 100:
            self._last.clear()
        self._last[key] = now
        return True


def sparse_logger(name: str, every_s: float) -> logging.Logger:
    """A logger of its own (not in logging's registry, so each status server has its own filter)
    under this module's, passing each message once in `every_s` at most."""
    logger = logging.Logger(name)
    logger.parent = log
    logger.addFilter(_Sparse(every_s))
    return logger


def login_matches(header: str | None, login: str) -> bool:
    """Whether an `Authorization: Basic …` header carries `login` (USER:PASSWORD), in constant time."""
    scheme, _, encoded = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(given, login.encode())


class StatusServer:
    """The page, `/status`, `/diff`, `/metrics`, `/health` and `/ready` on one address."""

    def __init__(
        self, status: Status, host: str, port: int, login: str | None = None, secrets: tuple[str | None, ...] = ()
    ) -> None:
        self._status = status
        self._host, self._port = host, port
        self._login = login
        self._secrets = secrets
        self._page, self._policy = load_page()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._table = _Table()
        # /diff: one computed at a time, the last of each template kept while its files are the same
        self._diffing = asyncio.Lock()
        self._diffs: dict[str, tuple[tuple[str, str], str]] = {}
        # /left-out: one at a time, the last answer kept while its items are the same (the template's
        # `left_out_serial`, not the items: those would stay in memory once replaced)
        self._searching = asyncio.Lock()
        self._found: tuple[tuple[str, str, int], bytes] | None = None
        self._built: tuple[bytes, float] | None = None  # /status: the last snapshot, and until when it is served

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._page_handler)
        app.router.add_get("/status", self._snapshot)
        app.router.add_get("/diff", self._diff)
        app.router.add_get("/left-out", self._left_out)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        return app

    async def start(self) -> None:
        # lingering_time=0: no route takes a body, and aiohttp otherwise waited 10 s for one a request
        # announced and never sent, the connection counted busy (a review: /health answered 0 of 10)
        runner = web.AppRunner(
            self.app(), access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            lingering_time=0, logger=sparse_logger(f"{__name__}.http", HTTP_LOG_EVERY_S),
        )  # fmt: skip
        await runner.setup()
        self._runner = runner
        server = runner.server
        assert server is not None
        self._listener = await asyncio.get_running_loop().create_server(
            lambda: _Gate(server, self._table), self._host, self._port, reuse_address=True
        )
        log.info(
            "status server on http://%s:%d/ (the page; /status, /diff, /metrics, /health, /ready)%s",
            self._host, self._port, "; the page, /status and /diff ask for status_auth" if self._login else "",
        )  # fmt: skip

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()  # no new connection; those open are ended by the runner's cleanup
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Basic auth for the page, `/status` and `/diff` when a login is set; safe headers on every answer."""
        login = self._login
        if not login and request.path in PROTECTED and not host_allowed(request.headers.get("Host"), self._host):
            response: web.StreamResponse = web.Response(
                status=421, text="421: without status_auth this page answers only by an IP address or localhost "
                "(another name may be a DNS-rebinding web page reading it from a browser); set status_auth "
                "to open it by a name\n",
            )  # fmt: skip
        elif login and request.path in PROTECTED and not login_matches(request.headers.get("Authorization"), login):
            response = web.Response(
                status=401, text="401: this page asks for status_auth\n",
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )  # fmt: skip
        else:
            response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _text(self, text: str) -> str:
        return redact(text, *self._secrets)

    async def _page_handler(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": self._policy, "X-Frame-Options": "DENY"},
        )

    async def _snapshot(self, _request: web.Request) -> web.Response:
        """The snapshot, built on the renderer's own loop (it reads live state): one built less than
        SNAPSHOT_REUSE_FACTOR times its build time ago (SNAPSHOT_REUSE_MAX_S at most) is served
        again. An attacker's review: 8 clients asking in a loop made a 10 ms tick of the loop take
        415 ms (a hostile state's snapshot took 60-100 ms), delaying every watch and apply; now
        snapshots take at most ~1/20 of the loop, and a small one (a test's) is hardly ever reused."""
        now = time.monotonic()
        if self._built is None or now >= self._built[1]:
            text = self._text(json.dumps(self._status.snapshot(), indent=2) + "\n").encode()
            took = time.monotonic() - now
            self._built = (text, now + took + min(SNAPSHOT_REUSE_MAX_S, SNAPSHOT_REUSE_FACTOR * took))
        return web.Response(body=self._built[0], content_type="application/json", charset="utf-8")

    async def _diff(self, request: web.Request) -> web.Response:
        template = request.query.get("template", "")
        if template not in self._status.served:
            known = ", ".join(sorted(self._status.served)) or "none yet"
            return web.Response(status=404, text=self._text(f"no template {template!r}; known: {known}\n"))
        pair = self._status.diff(template)
        if pair is None:
            return web.Response(text="no earlier file to compare with since the renderer started\n")
        async with self._diffing:
            kept = self._diffs.get(template)
            if kept is not None and kept[0][0] is pair[0] and kept[0][1] is pair[1]:
                text = kept[1]
            else:
                text = await asyncio.to_thread(file_diff, *pair, Path(template).name)
                self._diffs[template] = (pair, text)
        return web.Response(text=self._text(text or "no difference\n"))

    async def _left_out(self, request: web.Request) -> web.Response:
        """What is left out of one template for one service (`served.of_service`): the page's search
        when the listed items are cut. Looked through off the loop, one search at a time (100,000
        items: tens of ms each)."""
        template, service = request.query.get("template", ""), request.query.get("service", "")
        items = self._status.left_out.get(template, () if template in self._status.served else None)
        if items is None:
            known = ", ".join(sorted({*self._status.served, *self._status.left_out})) or "none yet"
            return web.Response(status=404, text=self._text(f"no template {template!r}; known: {known}\n"))
        if not service or len(service) > MAX_SERVICE_ASKED:
            return web.Response(status=400, text=f"ask for a service name of 1 to {MAX_SERVICE_ASKED} characters\n")
        asked = (template, service, self._status.left_out_serial.get(template, 0))
        async with self._searching:
            kept = self._found
            if kept is None or kept[0] != asked:
                kept = self._found = (asked, await asyncio.to_thread(self._left_out_body, items, template, service))
        return web.Response(body=kept[1], content_type="application/json", charset="utf-8")

    def _left_out_body(self, items: tuple[str, ...], template: str, service: str) -> bytes:
        """/left-out's answer, made whole in a thread: 1,000 long items took ~60 ms to parse and
        encode, and 8 clients asking in a loop slowed the loop's 10 ms tick to 35 ms (helper-139)."""
        found, total = of_service(items, service)
        answer = {"template": template, "service": service, "total": total,
                  "left_out": [LeftOut.parse(item).as_dict() for item in found]}  # fmt: skip
        return self._text(json.dumps(answer, indent=2) + "\n").encode()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._status.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready(self, _request: web.Request) -> web.Response:
        ready = self._status.ready
        return web.Response(status=200 if ready else 503, text="ready\n" if ready else "not ready\n")


def host_allowed(header: str | None, bound: str) -> bool:
    """Whether a request's Host may read the page, `/status` or `/diff` without a login: an IP
    address, `localhost` (or a name under it) or the address the server is bound to; no Host at all
    (no browser sends none). An attacker's review: any Host was answered, so a web page the operator
    opened could rebind its own name to 127.0.0.1 and read the catalog and the config diffs. Browsers
    resolve `localhost` and `*.localhost` to loopback themselves; other loopback names of /etc/hosts
    (`localhost4`, `ip6-localhost`, ...) go to the browser machine's resolver, search domains or
    LLMNR, which whoever is on its network may answer (a later review): refused."""
    if header is None:
        return True
    name = header.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost") or (name and name == bound.lower()):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class _Gate(asyncio.Protocol):
    """Lets a connection in (handing its transport to the server's own protocol) or closes it as it
    comes, by the table's `room_for`."""

    def __init__(self, server: web.Server, table: _Table) -> None:
        self._server, self._table = server, table

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            transport.close()
            return
        peer = peer_of(transport)
        if not self._table.make_room(peer):
            transport.abort()
            return
        _bound_kernel_buffers(transport)
        handler = self._server()
        transport.set_protocol(handler)
        try:
            handler.connection_made(transport)
        except Exception:  # aiohttp's own set-up (a socket option on a socket already reset): not held
            log.debug("status server: a connection failed as it came", exc_info=True)
            transport.abort()
            return
        self._table.hold(transport, handler, peer, time.monotonic())


@dataclass(frozen=True)
class Peer:
    """Whom a connection counts against: its address, and its network (for IPv6 not loopback, the
    /64; otherwise the address again). Worked out once, as the connection comes (a review: once per
    candidate and per newcomer took 236 ms, then 1.7 ms, of the loop at 128 IPv6 connections)."""

    address: str
    network: str
    loopback: bool


def peer_of(where: asyncio.BaseTransport | str) -> Peer:
    """The `Peer` of a transport, or of an address as text."""
    if isinstance(where, str):
        host = where
    else:
        name = where.get_extra_info("peername")
        host = str(name[0]) if isinstance(name, tuple) and name else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return Peer(host, host, False)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    text, loopback = str(address), address.is_loopback
    if isinstance(address, ipaddress.IPv6Address) and not loopback:
        network = f"{ipaddress.IPv6Address(address.packed[:8] + bytes(8))}/64"  # not ip_network: 10x the cost
        return Peer(text, network, False)
    return Peer(text, text, loopback)


@dataclass
class _Held:
    """A connection the gate let in: its socket is counted until it is closed."""

    transport: asyncio.Transport
    handler: web.RequestHandler
    peer: Peer
    socket: Any  # asyncio's TransportSocket: fileno() is -1 once the socket is closed
    since: float  # when it came
    window: tuple[float, int] | None = None  # (when, its write buffer) at the start of the send window
    slow: bool = False  # its peer read less than MIN_SEND_RATE over the last send window


class _Table:
    """The connections the server holds, oldest first, each counted until its socket is closed, not
    until it is told to close. An attacker's review: a connection closed gracefully keeps its socket
    until the peer reads what is left to send, so 150 clients that never read a 2.2 MB page held 150
    sockets with the cap at 20. A connection closed for a newcomer is reset (`_reset`: what it had
    left to send is dropped), so its place is free at once."""

    def __init__(self) -> None:
        self._held: list[_Held] = []

    def make_room(self, peer: Peer) -> bool:
        """Whether a connection from `peer` may come in; where the table is full, the connection
        that gives way is aborted (`room_for`)."""
        now = time.monotonic()
        self._held = [held for held in self._held if _open(held)]
        victim = room_for(peer, [(held.peer, _state(held, now)) for held in self._held])
        if victim is None:
            return False
        if victim >= 0:
            _reset(self._held.pop(victim))
        return True

    def hold(self, transport: asyncio.Transport, handler: web.RequestHandler, peer: Peer, now: float) -> None:
        self._held.append(_Held(transport, handler, peer, transport.get_extra_info("socket"), now))


def _open(held: _Held) -> bool:
    """Whether a held connection still counts: its socket open, and not closing with all it had to
    send handed to the kernel (it closes at the next turn of the loop, gracefully: a reset now would
    destroy an answer its peer has not read yet; a review's probes lost 3-10 in 100 that way)."""
    transport = held.transport
    if transport.is_closing() and transport.get_write_buffer_size() == 0:
        return False
    return held.socket is None or bool(held.socket.fileno() != -1)


def _reset(held: _Held) -> None:
    """Close a connection for a newcomer at once, what it had left to send dropped by the kernel
    too (SO_LINGER 0: a reset). A review: a plain abort left each socket's unsent data in the kernel
    as an orphan, probing a zero window: 316 of them held ~1.1 GB of TCP memory, squeezing every
    connection of the host."""
    if held.socket is not None:
        with contextlib.suppress(OSError):
            held.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    held.transport.abort()


def _bound_kernel_buffers(transport: asyncio.Transport) -> None:
    """What the kernel keeps for a connection whose peer stops reading: at most KERNEL_SEND_BUFFER
    of unsent data, and given up after KERNEL_SEND_TIMEOUT_S without an acknowledgement (also once
    aiohttp closed it gracefully, as an orphan)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, KERNEL_SEND_BUFFER)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(KERNEL_SEND_TIMEOUT_S * 1000))


KERNEL_SEND_BUFFER = 256 * 1024  # bytes: a page of /status over a 100 ms path at 2.5 MB/s
KERNEL_SEND_TIMEOUT_S = 30.0

# What a held connection is doing, in the order one is closed for a newcomer; LAST_RESORT: only for
# a loopback newcomer, and only when none of GIVES_WAY is there.
CLOSING, IDLE, QUEUED, STALLED = "closing", "idle", "queued", "stalled"
SENDING, FRESH, BUSY = "sending", "fresh", "busy"
GIVES_WAY = (CLOSING, IDLE, QUEUED, STALLED)
LAST_RESORT = (SENDING, FRESH, BUSY)  # the health check always comes in; a request already read goes last
SEND_WINDOW_S = 3.0  # the window over which a peer's reading of an answer is judged
MIN_SEND_RATE = 16 * 1024  # bytes a second: a peer reading less of a pending answer is stalled
FRESH_S = 1.0  # a connection younger than this with no request yet is fresh (its request may be on the way)


def _state(held: _Held, now: float) -> str:
    """CLOSING: told to close, its socket kept until the peer reads what is left to send (`_open`).
    IDLE: no request to answer (`_idle`), and not fresh (a review: a health check's connection, its
    request not yet read, was cut for an attacker's reconnect 2-3 times in 100).
    QUEUED: requests waiting behind the one answered (pipelined: no browser does it; a review: a
    client keeping 40 queued held its place for ever, and /health was refused 20 times in 20).
    STALLED: an answer is being sent to a peer that reads it slower than MIN_SEND_RATE
    (`_judge_reading`; a review: "any unsent data" cut a slow reader's download).
    SENDING: an answer is being sent, its peer not (yet) judged slow.
    FRESH: no request yet, younger than FRESH_S.
    BUSY: any other state (a request being answered, nothing waiting to be sent), or one we do not
    know."""
    transport, handler = held.transport, held.handler
    buffered = transport.get_write_buffer_size()
    _judge_reading(held, buffered, now)
    if transport.is_closing():
        return CLOSING
    if _idle(handler):
        fresh = getattr(handler, "_request_count", None) == 0 and now - held.since < FRESH_S
        return FRESH if fresh else IDLE
    queued = len(getattr(handler, "_messages", ()))
    if queued >= 2 or (queued and getattr(handler, "_request_in_progress", None) is True):
        return QUEUED
    if buffered:
        return STALLED if held.slow else SENDING
    return BUSY


def _judge_reading(held: _Held, buffered: int, now: float) -> None:
    """Whether the peer reads a pending answer at MIN_SEND_RATE at least, judged over each
    SEND_WINDOW_S (a review: "its unsent answer shrank at all within 3 s" let 120 clients reading
    4 kB every 2.5 s hold a 10 MB answer each for hours)."""
    if buffered == 0:
        held.window, held.slow = None, False
    elif held.window is None:
        held.window = (now, buffered)
    elif now - held.window[0] >= SEND_WINDOW_S:
        began, was = held.window
        held.slow = was - buffered < MIN_SEND_RATE * (now - began)
        held.window = (now, buffered)


def admitted(host: str, open_from: list[str]) -> bool:
    """Whether a connection from `host` may come in beside those open (`open_from`, their hosts,
    all busy): see `room_for`."""
    return room_for(peer_of(host), [(peer_of(other), BUSY) for other in open_from]) == -1


def _fits(loopback: bool, total: int, by_address: int, by_network: int) -> bool:
    """Whether a newcomer fits beside `total` connections, `by_address` of them from its address and
    `by_network` from its IPv6 /64."""
    if total >= MAX_CONNECTIONS:
        return False
    return loopback or (
        total < MAX_CONNECTIONS - LOOPBACK_RESERVED and by_address < MAX_PER_CLIENT and by_network < MAX_PER_NETWORK
    )


def room_for(newcomer: Peer, connections: list[tuple[Peer, str]]) -> int | None:
    """Whether a connection from `newcomer` comes in beside `connections` (oldest first: (peer,
    state)): -1 as it is, the index of the connection to close for it, or None (refused).

    The caps: MAX_CONNECTIONS in all, the last LOOPBACK_RESERVED for loopback, MAX_PER_CLIENT from
    one remote address and MAX_PER_NETWORK from one IPv6 /64 (which one host may hold whole). A
    client reopening a hundred connections as the idle ones close kept /health from answering 16
    times in 20 when one cap held for all; eight addresses of one /64 took every remote place when
    the cap was by address alone.

    Past them, a newcomer takes the place of a connection that gives way (GIVES_WAY, in that order,
    the oldest first) that it may: any, from loopback; a remote one, from a remote client within the
    newcomer's own caps. A loopback newcomer for which none gives way takes the place of the oldest
    sending connection, else fresh, else busy (LAST_RESORT): the health check always comes in (a
    review: a local process pipelining requests, or reconnecting faster than answers were sent, kept
    it out), and a request already read, its answer not yet begun, is cut last. A client that sends
    its request at once is answered before an attacker's reconnect comes round to it (the newest)."""
    total = len(connections)
    by_address = sum(peer.address == newcomer.address for peer, _ in connections)
    by_network = sum(peer.network == newcomer.network for peer, _ in connections)
    if _fits(newcomer.loopback, total, by_address, by_network):
        return -1
    for state in (*GIVES_WAY, *LAST_RESORT) if newcomer.loopback else GIVES_WAY:
        for index, (peer, its_state) in enumerate(connections):
            if its_state != state or (peer.loopback and not newcomer.loopback):
                continue
            same_address, same_network = peer.address == newcomer.address, peer.network == newcomer.network
            if _fits(newcomer.loopback, total - 1, by_address - same_address, by_network - same_network):
                return index
    return None


def _idle(handler: web.RequestHandler) -> bool:
    """No request come whole and none being answered: a connection waiting for a request or for the
    rest of one, or not started yet (aiohttp's own state; one we do not know counts as busy). A
    review: with "waiting for a request" alone, connections accepted together counted busy until
    their task first ran; with "none queued, none in progress" alone, one whose request was taken
    off the queue counted idle until its handler's task first ran (Python 3.11)."""
    messages = getattr(handler, "_messages", None)
    if messages is None or len(messages) or getattr(handler, "_request_in_progress", None) is not False:
        return False
    waiter = getattr(handler, "_waiter", None)
    if isinstance(waiter, asyncio.Future) and not waiter.done():
        return True
    return getattr(handler, "_request_count", None) == 0
