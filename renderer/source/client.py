"""Consul's HTTP API for the watcher: one GET with blocking-query parameters, returning (index, data).

Built on py-consul's asyncio client (aiohttp), whose session and TLS set-up we reuse. The watcher
calls the transport directly rather than the endpoint helpers because it needs what those helpers
drop: `stale` on health queries (a TODO in py-consul) and the X-Consul-LastContact / KnownLeader
headers that `max_stale` depends on. HTTP status → exception mapping lives here, in one place.
Answers are read here too, on py-consul's session (its pool and TLS), and never beyond
`max_answer_bytes`: an agent (or something posing as one) cannot make the renderer hold an
answer of any size; the key whose answer is too large fails, the others go on.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
from asyncio.trsock import TransportSocket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode

import aiohttp
import consul.aio
import yarl

from renderer.config import ConsulSettings
from renderer.errors import ConsulError
from renderer.source.h2 import Answer, AnswerTooLarge, StreamPool, consul_index, speaks_h2, tls_context

log = logging.getLogger(__name__)

T = TypeVar("T")
READ_CHUNK = 64 * 1024  # the most a refused answer is read beyond the limit


# An answer this long (~45 instances) or longer is decoded (json.loads) by whoever reads it
# (`QueryResult.decoded`), not as it arrives: the watcher does that on its parse thread (watch.py),
# where it also parses it. Decoding 45 MB (200,000 instances, under max_answer_bytes) held the event
# loop ~1 s each time the service changed; shorter answers, the common case (10 instances: 14 kB),
# are decoded at once.
DECODE_LATER_CHARS = 64 * 1024
UNDECODED: Any = type("Undecoded", (), {"__repr__": lambda self: "UNDECODED"})()


@dataclass(frozen=True)
class QueryResult:
    """One answer: the blocking index, the decoded body (None for 404; UNDECODED for a long one:
    read it with `decoded()`), and staleness facts."""

    index: int
    data: Any
    last_contact_ms: int = 0
    known_leader: bool = True
    unchanged: bool = False  # the index (or the body) was the one the caller already had: not decoded
    body: str | None = None  # the body as received, for the caller's next `known_body`
    age_s: int = 0  # a `?cached` answer: seconds since the agent's cache last heard from the servers
    held_from: int = 0  # the index the query that answered was held from (0: a plain read)

    def decoded(self) -> Any:
        """The answer's data, decoded now if it was left for later (ValueError, RecursionError:
        a body that is not JSON Python can read)."""
        return json.loads(self.body or "null") if self.data is UNDECODED else self.data


def cache_age(value: str) -> int:
    """The `Age` header of a `?cached` answer: 0 while the agent's background refresh keeps the
    entry current, more once it lost the servers. Unreadable counts as old (1): never fresh."""
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else int(bool(value))


class ConsulRequestError(ConsulError):
    """A request that Consul answered with an error status (or that never reached Consul)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TooLarge(ConsulRequestError):
    """Consul answered, over max_answer_bytes: the request is fine, its data too large to take in
    (the watcher then serves the key as Watcher.refuse says, never retrying it as a failure).
    `index`: the answer's X-Consul-Index (0: unknown), from which the next query blocks."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


def too_large(path: str, size: str, index: int = 0, status: int = 200) -> ConsulRequestError:
    """A TooLarge for an answer (200, or 404 as Consul says "none"); any other status (an error,
    a proxy's page) stays a failed request of that status, whatever its size: an oversized 403
    or 5xx must not pass for "Consul answered"."""
    message = (
        f"Consul's answer for {path} {size}; it was refused. "
        "Raise max_answer_bytes (--max-answer-bytes, CONSUL_RENDERER_MAX_ANSWER_BYTES) if answers this "
        "large are expected, or find what made it so large (a huge KV value, a service with many instances)"
    )
    if status in (200, 404):
        return TooLarge(message, index)
    return ConsulRequestError(f"{message} (status {status})", status)


async def read_limited(response: aiohttp.ClientResponse, path: str, limit: int) -> bytes:
    """The body, refused (ConsulRequestError) as soon as it is known to pass `limit` bytes: from
    Content-Length before anything is read, else from the count while reading (a chunked or
    unannounced body), so that at most `limit` + READ_CHUNK bytes are ever held. An encoded body
    is refused unread: nothing here asks for one, and aiohttp would unzip it before it is counted."""
    encoding = response.headers.get("Content-Encoding", "").strip()
    if encoding.lower() not in ("", "identity"):
        response.close()
        raise ConsulRequestError(
            f"Consul's answer for {path} came with Content-Encoding {encoding[:40]!r}, which was not asked for "
            "(Accept-Encoding: identity); it was refused unread. Is something between the renderer and the "
            "agent compressing answers?"
        )
    declared, index = response.content_length, consul_index(response.headers)
    if declared is not None and declared > limit:
        response.close()
        announced = f"is {declared} bytes (Content-Length), over max_answer_bytes ({limit} bytes)"
        raise too_large(path, announced, index, response.status)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            response.close()  # the rest is never read; the connection is not reused
            raise too_large(
                path,
                f"passed max_answer_bytes ({limit} bytes) while being read (no Content-Length; "
                f"reading stopped at {size} bytes)",
                index,
                response.status,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_unless_ok(status: int, body: str, path: str) -> None:
    """A followed answer is a 200 or an error: anything else (a 404 included) is refused."""
    raise_for_status(status, body, path)
    if status != 200:
        raise ConsulRequestError(f"Consul answered {status} for {path}: {body.strip()[:300]}")


KEEPALIVE = (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))  # dead after ~60 s unanswered


def keep_alive(sock: socket.socket | TransportSocket | None) -> None:
    """TCP keepalives on a connection that may stay silent for long (a followed log over HTTP/1.1,
    where no PING checks it as over HTTP/2): probes after 30 s idle, every 10 s, 3 unanswered end it."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE:
        if hasattr(socket, name):  # Linux names; elsewhere the system's defaults apply
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def raise_for_status(status: int, body: str, path: str) -> None:
    """The one mapping of an agent's error status to ConsulRequestError, with what to do about it."""
    if status == 403:
        raise ConsulRequestError(
            f"Consul refused {path}: ACL permission denied ({said(body)}); check the token (--token, "
            "CONSUL_HTTP_TOKEN): give the token read on the services, nodes and keys the templates use",
            status,
        )
    if status == 429:
        raise ConsulRequestError(
            f"Consul refused {path} with 429 Too Many Requests: this client holds more connections than the "
            "agent's limits.http_max_conns_per_client allows (default 200); lower max_connections "
            "(--max-connections) or raise that limit in the agent's configuration",
            status,
        )
    if 300 <= status < 400:
        raise ConsulRequestError(
            f"Consul answered {status} (a redirect) for {path}, which is not followed: Consul redirects a path "
            "with '.', '..' or empty segments to its cleaned form, another key than the one asked for. If every "
            "request is redirected, something at --consul-addr (CONSUL_HTTP_ADDR) other than the agent answers "
            "(a proxy asking for https, say): point the renderer at the agent itself",
            status,
        )
    if status == 401:
        raise ConsulRequestError(
            f"Consul refused {path}: {said(body)}; check the token (--token, CONSUL_HTTP_TOKEN)", status
        )
    if status >= 400 and status != 404:
        raise ConsulRequestError(f"Consul answered {status} for {path}: {said(body)}", status)


def said(body: str, limit: int = 300) -> str:
    """An error answer's text for a message: at most `limit` characters, on one line. An attacker's
    review: a 500 answer's newlines forged whole log lines (the registrator logs these messages),
    and a 403's body had no length cap."""
    return "".join(c if c.isprintable() else " " for c in body.strip()[:limit])


class ConsulGetter(Protocol):
    """What the watcher, the sweeper and batch reads ask of a Consul client: `ConsulClient` is the real one."""

    async def get(
        self,
        path: str,
        params: list[tuple[str, str]] | None = None,
        index: int = 0,
        wait_s: float = 60.0,
        stale: bool = False,
        known_index: int = 0,
        known_body: str | None = None,
        held: bool = False,
        compressed: bool = False,
    ) -> QueryResult: ...


class ConsulClient:
    """An asyncio Consul client for blocking queries. Create and close it inside the event loop."""

    def __init__(self, settings: ConsulSettings) -> None:
        host, port, scheme = settings.host_port_scheme
        self.address = f"{scheme}://{host}:{port}"
        self._token = settings.token
        # The pool's limit is the renderer's connection budget: no more connections to the agent, ever.
        self.max_connections = settings.max_connections
        self.max_answer_bytes = settings.max_answer_bytes
        self.requests = 0  # requests sent, for /metrics
        self.answer_bytes = 0  # bytes of the answers' bodies received, for /metrics
        self._consul = consul.aio.Consul(
            host=host,
            port=port,
            scheme=scheme,
            verify=settings.tls_verify,
            cert=settings.client_cert,
            connections_limit=settings.max_connections,
        )
        # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; our config already resolved it.
        self._consul.token = None
        self._settings = settings
        self._streams: StreamPool | None = None  # blocking queries over HTTP/2, once negotiated

    async def open(self, blocking_connections: int) -> None:
        """On an HTTPS agent that speaks HTTP/2 (and with `http2` on), blocking queries go over at
        most `blocking_connections` HTTP/2 connections from now on; otherwise nothing changes."""
        host, port, scheme = self._settings.host_port_scheme
        if scheme != "https" or not self._settings.http2:
            return
        verify, cert = self._settings.tls_verify, self._settings.client_cert
        if await speaks_h2(host, port, verify, cert):
            self._streams = StreamPool(
                host, port, tls_context(verify, cert), self._headers(), max(1, blocking_connections),
                self.max_answer_bytes,
            )  # fmt: skip

    @property
    def streams_per_connection(self) -> int:
        """Blocking queries one connection holds: STREAMS_PER_CONNECTION over HTTP/2, else 1."""
        return self._streams.streams if self._streams is not None else 1

    @property
    def protocol(self) -> str:
        return "HTTP/2" if self._streams is not None else "HTTP/1.1"

    async def close(self) -> None:
        if self._streams is not None:
            await self._streams.close()
        await self._consul.close()

    def auth_headers(self) -> dict[str, str]:
        return {"X-Consul-Token": self._token} if self._token else {}

    def _headers(self) -> dict[str, str]:
        # No compression by default: the agent is local or near, and gzip costs CPU on both ends;
        # a query asks for it where one answer is large and resent often (`get`'s `compressed`).
        return {"Accept-Encoding": "identity", **self.auth_headers()}

    async def get(
        self,
        path: str,
        params: list[tuple[str, str]] | None = None,
        index: int = 0,
        wait_s: float = 60.0,
        stale: bool = False,
        known_index: int = 0,
        known_body: str | None = None,
        held: bool = False,
        compressed: bool = False,
    ) -> QueryResult:
        """GET `path`; with `index` > 0 it blocks until the data changes or `wait_s` passes.

        `held`: a watched key's own query (its first read included): over HTTP/2 when the agent
        speaks it, so that neither the first reads nor the blocking queries take a connection each.
        `compressed`: a held query over HTTP/2 asks for its answer gzipped (see h2.py); over
        HTTP/1.1 answers stay uncompressed (aiohttp would unzip them without a bound).

        `known_index`: the index of data the caller already has; an answer at that same index is
        returned `unchanged`, without decoding its body (a sweep re-reads hundreds of services).
        `known_body`: the body of the caller's last answer; an identical body is returned
        `unchanged` too (the catalog's index moves at every registration, its list of names
        rarely: 1,000 names decoded and compared for nothing cost ~3 ms of the loop each time).
        """
        query = list(params or [])
        if index > 0:
            query += [("index", str(index)), ("wait", f"{round(wait_s * 1000)}ms")]
        if stale:
            query.append(("stale", ""))
        # Consul adds up to wait/16 of jitter to a blocking query: the HTTP timeout must exceed both.
        timeout = wait_s + wait_s / 16 + 5.0 if index > 0 else 10.0

        def on_response(response: Answer) -> QueryResult:
            raise_for_status(response.code, response.body, path)
            headers = response.headers
            at = int(headers.get("X-Consul-Index", "0") or 0)
            unchanged = 0 < known_index == at or (known_body is not None and response.body == known_body)
            if response.code == 404 or unchanged:
                data = None
            elif len(response.body) >= DECODE_LATER_CHARS:
                data = UNDECODED  # see DECODE_LATER_CHARS
            else:
                data = json.loads(response.body or "null")
            return QueryResult(
                index=at,
                data=data,
                last_contact_ms=int(headers.get("X-Consul-LastContact", "0") or 0),
                known_leader=headers.get("X-Consul-KnownLeader", "true") == "true",
                unchanged=unchanged,
                body=response.body if response.code != 404 else None,
                age_s=cache_age(headers.get("Age", "")),
            )

        if held and self._streams is not None:
            request = self._stream(on_response, path, query, timeout, compressed)
        else:
            request = self._request(on_response, "GET", path, query, timeout=timeout)
        result: QueryResult = await self._send(path, request)
        return result

    async def _stream(
        self,
        on_response: Callable[[Answer], T],
        path: str,
        params: list[tuple[str, str]],
        timeout: float,
        compressed: bool,
    ) -> T:
        """A blocking query on the HTTP/2 stream pool."""
        assert self._streams is not None
        try:
            answer = await self._streams.get(path, params, timeout, compressed)
        except AnswerTooLarge as err:
            raise too_large(path, str(err), err.index, err.status) from err
        self.answer_bytes += answer.size
        return on_response(answer)

    @property
    def can_follow(self) -> bool:
        """An endless answer can be followed (`follow`): over HTTP/2 it takes one stream; over
        HTTP/1.1 one of the spare connections the budget keeps beside the held queries."""
        return True

    async def follow(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
        """GET an endless answer (the agent's log), its body to `on_data` as it comes (b"" first,
        once the agent accepted); returns when the agent ends it. ConsulRequestError when it is
        refused (403: the token), comes encoded, or the connection fails."""

        def counted(data: bytes) -> None:
            self.answer_bytes += len(data)
            on_data(data)

        try:
            if self._streams is not None:
                await self._send(path, self._follow_stream(self._streams, path, params, counted))
            else:
                await self._send(path, self._follow_http1(path, params, counted))
        except AnswerTooLarge as err:
            raise too_large(path, str(err), err.index, err.status) from err

    async def _follow_stream(
        self, streams: StreamPool, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]
    ) -> None:
        answer = await streams.follow(path, params, on_data)
        self.answer_bytes += answer.size
        _refuse_unless_ok(answer.code, answer.body, path)

    async def _follow_http1(self, path: str, params: list[tuple[str, str]], on_data: Callable[[bytes], None]) -> None:
        """`follow` on py-consul's session: one connection for as long as the agent streams. No
        read timeout (a quiet agent writes nothing for minutes): TCP keepalives notice a
        connection dropped without a word (a NAT or firewall to a remote agent) within ~1 min;
        the caller reads the members every minute all the same. Cancelling closes the
        connection, which ends the agent's side at once (its monitor watches the request's
        context)."""
        http = self._consul.http
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with http._session.get(
            self._url(path, params), headers=self._headers(), timeout=timeout, auto_decompress=False,
            allow_redirects=False,
        ) as response:  # fmt: skip
            if response.status != 200:
                body = (await read_limited(response, path, self.max_answer_bytes)).decode("utf-8", "replace")
                self.answer_bytes += len(body)
                _refuse_unless_ok(response.status, body, path)
            if response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity"):
                raise ConsulRequestError(f"Consul answered {path} encoded ({response.headers['Content-Encoding']})")
            transport = response.connection.transport if response.connection is not None else None
            if transport is not None:
                keep_alive(transport.get_extra_info("socket"))
            on_data(b"")
            async for piece in response.content.iter_any():
                on_data(piece)

    async def put(self, path: str, body: object | None, timeout_s: float = 10.0) -> None:
        """PUT a JSON body (agent API: registrations, check updates), given up after `timeout_s`;
        errors raise ConsulError."""
        data = json.dumps(body) if body is not None else ""

        def on_response(response: Answer) -> None:
            raise_for_status(response.code, response.body, path)
            if response.code == 404:
                raise ConsulRequestError(f"Consul answered 404 for {path}: {response.body.strip()}", 404)

        await self._send(path, self._request(on_response, "PUT", path, data=data, timeout=timeout_s))

    async def _request(
        self,
        on_response: Callable[[Answer], T],
        method: str,
        path: str,
        params: list[tuple[str, str]] | None = None,
        data: str | None = None,
        timeout: float = 10.0,
    ) -> T:
        """One request on py-consul's session (its pool, TLS and URL quoting), its answer read
        within max_answer_bytes (py-consul's own transport reads answers whole, of any size)."""
        http = self._consul.http
        async with http._session.request(
            method,
            self._url(path, params),
            headers=self._headers(),
            data=data,
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,  # a redirect names another key (see raise_for_status): refused, never followed
        ) as response:
            body = await read_limited(response, path, self.max_answer_bytes)
            answer = Answer(response.status, response.headers, body.decode("utf-8"), len(body))
        self.answer_bytes += answer.size
        return on_response(answer)

    def _url(self, path: str, params: list[tuple[str, str]] | None) -> yarl.URL:
        """The URL of a request on py-consul's session, as the stream pool (h2.py) builds its target:
        `path` as given, byte for byte, since its callers quote what they put in it once (a service
        name, a KV key). py-consul's `uri()` quotes the path again (`sp%20ace` went out as
        `sp%2520ace`, and Consul answered 200 with no instance for a service that does not exist);
        a URL given to aiohttp as text is normalised, so the key `t/../secret` was read as `secret`.
        Encoded, nothing is changed: Consul redirects such a path, and that is refused."""
        url = self._consul.http.base_uri + path
        return yarl.URL(f"{url}?{urlencode(params)}" if params else url, encoded=True)

    async def _send(self, path: str, request: Awaitable[Any]) -> Any:
        """Await a request; transport failures become ConsulRequestError (status errors already are)."""
        self.requests += 1
        try:
            return await request
        except ConsulError:
            raise
        except (aiohttp.ClientError, ssl.SSLError, TimeoutError, OSError, ValueError, RecursionError) as err:
            # RecursionError: JSON nested deeper than Python parses (`[` × 100,000); an answer we cannot read
            raise ConsulRequestError(self.describe_failure(path, err)) from err

    def describe_failure(self, path: str, err: BaseException) -> str:
        """A transport failure as a sentence a person can act on: what happened, where, what to check."""
        where, address = f"Consul at {self.address}", "check --consul-addr (CONSUL_HTTP_ADDR)"
        tls = "check --consul-ssl, --ca-file, --cert-file and --key-file (CONSUL_CACERT, CONSUL_CLIENT_CERT, …)"
        if isinstance(err, aiohttp.ClientConnectorCertificateError):
            return f"TLS with {where} failed: its certificate was not accepted ({err.certificate_error}); {tls}"
        if isinstance(err, aiohttp.ClientSSLError):
            return f"TLS with {where} failed ({err}); {tls}"
        if isinstance(err, aiohttp.ServerDisconnectedError):
            return (
                f"{where} closed the connection for {path} before answering: the agent restarted, or it refuses "
                "this client's connections beyond limits.http_max_conns_per_client (default 200); lower "
                "max_connections (--max-connections) or raise that limit in the agent's configuration"
            )
        if isinstance(err, aiohttp.ClientConnectorError):
            cause = err.os_error
            if isinstance(cause, ConnectionRefusedError):
                return f"{where} refused the connection: nothing listens there; {address}"
            if isinstance(cause, socket.gaierror):
                return f"{where}: the host name does not resolve ({cause.strerror}); {address}"
            return f"cannot connect to {where}: {cause.strerror or cause}; {address}"
        if isinstance(err, ssl.SSLError):
            return f"TLS with {where} failed ({err}); {tls}"
        if isinstance(err, TimeoutError | aiohttp.ServerTimeoutError):
            return f"{where} did not answer {path} in time; {address}, and the network to it"
        if isinstance(err, ValueError):
            return f"{where} sent an answer for {path} that is not JSON ({err}); is that address a Consul agent?"
        if isinstance(err, RecursionError):
            return f"{where} sent an answer for {path} nested too deep to read; is that address a Consul agent?"
        return f"request to {where} for {path} failed: {type(err).__name__}: {err}; {address}"
