"""Blocking queries over HTTP/2: many long-polls on a few connections to an HTTPS agent.

Consul's HTTPS port speaks HTTP/2 (ALPN `h2`, 250 streams per connection), and its
`limits.http_max_conns_per_client` counts TCP connections, not streams. So on a TLS agent every
watched key can hold its own blocking query, and a change wakes only its own watchers, with a
thousand keys on about a dozen connections.

The protocol is the `h2` library's (python-hyper: frames, HPACK, flow control, settings); the
connection's I/O is ours, because the loop around it decides whether a change waits. Tried first,
httpx (over httpcore) lets whichever waiting stream takes its read lock block on the socket for
everyone: measured here with 50 blocking queries on one connection, the answer to a change sat
in its stream's queue for 19 s (until another query's wait ran out), where HTTP/1.1 took 7 ms.
Here one reader task per connection reads every frame and hands each stream its answer at once.

`StreamPool` gives a new query to the least loaded connection below `STREAMS_PER_CONNECTION` and
opens another (within its budget) when all are full. Only watched keys' queries come here:
registrations, check updates and sweeps keep py-consul's pool, so they never wait for a stream.

A query may ask for its answer gzipped (`compressed`): the catalog's list of names, resent whole
on every registration or removal anywhere. Unzipping is bounded by max_answer_bytes like reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from renderer.errors import ConsulError

log = logging.getLogger(__name__)

STREAMS_PER_CONNECTION = 100  # well below Go's 250 per connection (Consul's HTTPS server)
# A held stream costs neither a connection nor a slot of the agent's limit, but each expiry is a
# request and an RPC: one per watched key per wait (measured: 980 a minute at 1,000 keys with 60 s).
# Consul's servers allow up to their `max_query_time` (10 minutes unless raised), and 10 it is by
# default: ~100 a minute at 1,000 keys idle (5 minutes: ~200); `block_wait` asks for longer where
# the servers allow it. A dead connection is noticed by PING within ~25 s and a query held on a
# server cut off by the server watch (stall.py) within ~10 s, so a longer wait delays no failure's
# discovery.
CONSUL_DEFAULT_MAX_QUERY_S = 600.0
BLOCK_WAIT_S = CONSUL_DEFAULT_MAX_QUERY_S
RECEIVE_WINDOW = 16 * 1024 * 1024  # per stream and per connection: a large answer never waits for a window update
ALPN_PROBE_TIMEOUT_S = 5.0
OPEN_TIMEOUT_S = 10.0  # TCP and TLS of a new connection (asyncio's own TLS handshake timeout is 60 s)
PING_INTERVAL_S = 15.0  # a PING on every connection this often: a silently dead network is noticed
PING_TIMEOUT_S = 10.0  # … when no PING ACK comes back within this (not at the end of a 10-minute wait)
READ_SIZE = 256 * 1024


def tls_context(verify: bool | str, cert: tuple[str, str] | None) -> ssl.SSLContext:
    """The TLS context for the agent: its CA (or the system's), our client certificate if any."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if cert is not None:
        context.load_cert_chain(*cert)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


async def speaks_h2(host: str, port: int, verify: bool | str, cert: tuple[str, str] | None) -> bool:
    """Whether the agent's HTTPS port accepts HTTP/2 (ALPN). False on any failure: the caller
    then stays on HTTP/1.1, where a failure will be reported with the first request."""
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=tls_context(verify, cert), server_hostname=host),
            ALPN_PROBE_TIMEOUT_S,
        )
    except (OSError, TimeoutError, ssl.SSLError) as err:
        log.debug("HTTP/2 probe of %s:%d failed: %s", host, port, err)
        return False
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


def text(raw: str | bytes) -> str:
    """A header's name or value as text: bytes that are not UTF-8 are replaced, never raised on
    (the agent's headers are read by the one task that reads every stream of the connection)."""
    return raw if isinstance(raw, str) else raw.decode("utf-8", "replace")


class Headers(Mapping[str, str]):
    """Response headers, looked up without regard to case (HTTP/2 sends names in lower case)."""

    def __init__(self, pairs: list[tuple[str, str]] | list[tuple[bytes, bytes]]) -> None:
        self._items = {text(name).lower(): text(value) for name, value in pairs}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as read, over HTTP/2 here or HTTP/1.1 (client.py): status, headers, body (UTF-8)."""

    code: int
    headers: Mapping[str, str]
    body: str
    size: int = 0  # the body's bytes as received


def consul_index(headers: Mapping[str, str]) -> int:
    """An answer's X-Consul-Index (headers looked up without regard to case), 0 when it has none
    that reads as one."""
    value = (headers.get("X-Consul-Index") or "").strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) < 20 else 0


class AnswerTooLarge(ConsulError):
    """The answer passed max_answer_bytes (announced or while read); `index`: its X-Consul-Index,
    `status` its HTTP status."""

    def __init__(self, message: str, index: int = 0, status: int = 200) -> None:
        super().__init__(message)
        self.index, self.status = index, status


class StreamFailed(ConsulError):
    """The stream or its connection ended without an answer (reset, GOAWAY, closed, TLS)."""


def decoded(raw: bytes, encoding: str, limit: int, gzip_asked: bool) -> str:
    """The body of an answer sent with Content-Encoding `encoding` (none, or gzip where the query
    asked for it), as text; never more than `limit` bytes unzipped (a small gzip can unzip to
    gigabytes). AnswerTooLarge or StreamFailed (gzip not asked for, another encoding, a corrupt or
    cut gzip, a body that is not UTF-8) otherwise."""
    body = raw
    if encoding.strip().lower() == "gzip":
        if not gzip_asked:
            raise StreamFailed("the agent gzipped an answer that was not asked for gzipped")
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            body = inflater.decompress(raw, limit + 1)
        except zlib.error as err:
            raise StreamFailed(f"the agent's gzip answer is corrupt: {err}") from err
        if len(body) > limit or inflater.unconsumed_tail:
            raise AnswerTooLarge(f"passed max_answer_bytes ({limit} bytes) when unzipped ({len(raw)} bytes zipped)")
        if not inflater.eof or inflater.unused_data:
            raise StreamFailed("the agent's gzip answer is cut short or followed by other data")
    elif encoding.strip().lower() not in ("", "identity"):
        raise StreamFailed(f"the agent's answer has Content-Encoding {encoding[:40]!r}: only gzip is understood")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StreamFailed(f"the agent's answer is not UTF-8 ({err.reason} at byte {err.start})") from err


@dataclass
class _Stream:
    limit: int
    done: asyncio.Future[Answer]
    gzip_asked: bool = False
    status: int = 0
    headers: Headers = field(default_factory=lambda: Headers([]))
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    sink: Callable[[bytes], None] | None = None  # a followed stream: a 200 answer's body goes here, piece by piece


class H2Connection:
    """One HTTP/2 connection: requests as streams, one reader task dispatching every frame."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self._context = host, port, context
        # Headers as bytes, made text by `Headers` (a value that is not UTF-8 must not stop the reader).
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        self._h2 = h2.connection.H2Connection(config=config)
        self._streams: dict[int, _Stream] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._pong = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self.in_flight = 0
        self.closed: str | None = None  # why, once the connection can take no more streams

    @property
    def has_room(self) -> bool:
        """The state machine's own count of open streams is below the agent's limit (ours, `in_flight`,
        can be lower while reset streams are still counted there)."""
        return int(self._h2.open_outbound_streams) < self.stream_limit

    @property
    def stream_limit(self) -> int:
        """The most streams the agent lets this connection hold at once (its SETTINGS)."""
        return int(self._h2.remote_settings.max_concurrent_streams)

    async def open(self) -> None:
        reader, self._writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._context, server_hostname=self.host
        )
        self._h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW}
        )
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(RECEIVE_WINDOW)
        await self._flush()
        self._reader_task = asyncio.create_task(self._read(reader), name=f"h2 {self.host}:{self.port}")
        self._pinger = asyncio.create_task(self._ping(), name=f"h2 ping {self.host}:{self.port}")

    async def _ping(self) -> None:
        """PING every PING_INTERVAL_S; no ACK within PING_TIMEOUT_S ends the connection (its streams
        fail and are retried on a new one)."""
        while self.closed is None:
            await asyncio.sleep(PING_INTERVAL_S)
            self._pong.clear()
            try:
                # One deadline for sending the PING and its ACK: a write stuck on a socket the peer
                # no longer reads must not hold the check off.
                async with asyncio.timeout(PING_TIMEOUT_S):
                    with contextlib.suppress(Exception):
                        self._h2.ping(b"renderer")
                        await self._flush()
                    await self._pong.wait()
            except TimeoutError:
                self.closed = f"no answer to an HTTP/2 PING within {PING_TIMEOUT_S:.0f}s: the connection is dead"
                log.warning("%s:%d: %s; its queries are retried on a new one", self.host, self.port, self.closed)
                if self._writer is not None:
                    self._writer.transport.abort()  # the reader sees the end at once and fails every stream
                return

    async def get(
        self,
        path: str,
        headers: Mapping[str, str],
        limit: int,
        compressed: bool = False,
        sink: Callable[[bytes], None] | None = None,
    ) -> Answer:
        """GET `path` (with its query) on a new stream; StreamFailed, AnswerTooLarge or the answer.
        `compressed`: asks for the answer gzipped (only such an answer may come gzipped).
        `sink`: follows an endless answer (the agent's log): called with b"" when a 200 answer's
        headers arrive, then with each piece of its body as it comes; the Answer returned at its end
        has an empty body (an answer other than 200 is read whole, within `limit`, as usual)."""
        if self.closed is not None:
            raise StreamFailed(self.closed)
        if compressed:
            kept = {name: value for name, value in headers.items() if name.lower() != "accept-encoding"}
            headers = {**kept, "accept-encoding": "gzip"}
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except h2.exceptions.NoAvailableStreamIDError as err:  # 2**30 requests on it: retired, retried on a new one
            self.closed = "the HTTP/2 connection has used up its stream ids"
            raise StreamFailed(self.closed) from err
        stream = _Stream(limit, asyncio.get_running_loop().create_future(), compressed, sink=sink)
        self._streams[stream_id] = stream
        request = [
            (":method", "GET"),
            (":scheme", "https"),
            (":authority", f"{self.host}:{self.port}"),
            (":path", path),
        ]
        try:
            self._h2.send_headers(stream_id, request + [(k.lower(), v) for k, v in headers.items()], end_stream=True)
        except h2.exceptions.TooManyStreamsError as err:  # more open than the agent allows: retried
            self._streams.pop(stream_id, None)
            raise StreamFailed(f"the HTTP/2 connection refused a new stream: {err!r}") from err
        except h2.exceptions.ProtocolError as err:  # the state machine may be off: no new stream here
            self._streams.pop(stream_id, None)
            self.closed = f"the HTTP/2 state machine refused a request: {err!r}"
            raise StreamFailed(self.closed) from err
        try:
            await self._flush()
            return await stream.done
        finally:
            # Cancelled (the wait for `stream.done` cancels that future too) or timed out: tell the
            # agent to stop, or the stream stays open on both sides until its wait runs out.
            if self._streams.pop(stream_id, None) is not None and (stream.done.cancelled() or not stream.done.done()):
                await self._reset(stream_id)

    async def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(Exception):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            await self._flush()

    async def _flush(self) -> None:
        """Send what the state machine has queued. Taken from it only under the lock: frames taken
        by a flush cancelled while it waited would be lost (a lost HEADERS frame breaks the header
        compression of the whole connection); left in place, the next flush sends them."""
        if self._writer is None:
            return
        async with self._write_lock:
            data = self._h2.data_to_send()
            if data:
                self._writer.write(data)
                await self._writer.drain()

    def _cancel(self, stream_id: int) -> None:
        """Reset a stream whose answer is not wanted, unless it is closed already: the events of one
        read come after the state machine took all of its frames, so a stream found too large at
        one DATA frame may have ended at a later one of the same read. Reset then, it failed the
        whole connection (StreamClosedError), and every stream on it."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):  # ended meanwhile: nothing to cancel
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "the agent closed the HTTP/2 connection"
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for event in self._h2.receive_data(data):
                    self._on_event(event)
                await self._flush()
                if self.closed is not None:
                    why = self.closed
                    break
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as err:
            why = f"the HTTP/2 connection failed: {type(err).__name__}: {err}"
        except Exception as err:  # a bug of ours, or an answer we failed to foresee: its streams are retried
            log.exception("%s:%d: reading the HTTP/2 connection failed unexpectedly", self.host, self.port)
            why = f"reading the HTTP/2 connection failed: {type(err).__name__}: {err}"
        finally:
            self._fail_all(why)

    def _on_event(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and stream is not None:
            stream.headers = Headers(list(event.headers))
            code = stream.headers.get(":status", "")
            stream.status = int(code) if len(code) == 3 and code.isascii() and code.isdigit() else 0
            if stream.sink is not None and stream.status == 200:
                encoding = stream.headers.get("content-encoding", "").strip().lower()
                if encoding in ("", "identity"):
                    self._to_sink(event.stream_id, stream, b"")
                else:  # lines would never be found in it: said, not followed blind
                    self._end_followed(event.stream_id, stream, f"it came with Content-Encoding {encoding[:40]!r}")
        elif isinstance(event, h2.events.DataReceived):
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is not None and stream.sink is not None and stream.status == 200:
                stream.size += len(event.data)
                self._to_sink(event.stream_id, stream, event.data)
            elif stream is not None and not stream.done.done():
                stream.size += len(event.data)
                if stream.size > stream.limit:
                    stream.done.set_exception(
                        AnswerTooLarge(
                            f"passed max_answer_bytes ({stream.limit} bytes) "
                            f"while being read (reading stopped at {stream.size} bytes)",
                            consul_index(stream.headers),
                            stream.status,
                        )
                    )
                    if not event.stream_ended:  # a stream that ended with this frame takes no reset
                        self._cancel(event.stream_id)
                else:
                    stream.chunks.append(event.data)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None and not stream.done.done():
            raw = b"".join(stream.chunks)
            try:
                if stream.status == 0:
                    raise StreamFailed("the agent's answer has no valid :status")
                body = decoded(raw, stream.headers.get("content-encoding", ""), stream.limit, stream.gzip_asked)
            except AnswerTooLarge as err:
                stream.done.set_exception(AnswerTooLarge(str(err), consul_index(stream.headers), stream.status))
            except ConsulError as err:  # this stream's answer only: the connection's other streams go on
                stream.done.set_exception(err)
            else:
                stream.done.set_result(Answer(stream.status, stream.headers, body, len(raw)))
        elif isinstance(event, h2.events.StreamReset) and stream is not None and not stream.done.done():
            stream.done.set_exception(StreamFailed(f"the agent reset the stream (error {event.error_code})"))
        elif isinstance(event, h2.events.PingAckReceived):
            self._pong.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed = f"the agent ended the HTTP/2 connection (GOAWAY, error {event.error_code})"

    def _to_sink(self, stream_id: int, stream: _Stream, data: bytes) -> None:
        """A followed stream's piece to its sink; a sink that fails ends its own stream, never the
        reader (which serves every other stream of the connection)."""
        if stream.sink is None or stream.done.done():
            return
        try:
            stream.sink(data)
        except Exception as err:
            self._end_followed(stream_id, stream, f"{type(err).__name__}: {err}")

    def _end_followed(self, stream_id: int, stream: _Stream, why: str) -> None:
        stream.done.set_exception(StreamFailed(f"following the stream failed: {why}"))
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def _fail_all(self, why: str) -> None:
        self.closed = self.closed or why
        for stream in self._streams.values():
            if not stream.done.done():
                stream.done.set_exception(StreamFailed(self.closed))

    async def close(self) -> None:
        self.closed = self.closed or "closed"
        tasks = [t for t in (self._reader_task, self._pinger) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._h2.close_connection()
                await self._flush()
            self._writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await self._writer.wait_closed()


@dataclass
class StreamPool:
    """Blocking queries over at most `max_connections` HTTP/2 connections, `streams` on each."""

    host: str
    port: int
    context: ssl.SSLContext
    headers: dict[str, str]
    max_connections: int
    max_answer_bytes: int
    streams: int = STREAMS_PER_CONNECTION
    _connections: list[H2Connection] = field(default_factory=list)
    _room: asyncio.Condition = field(default_factory=asyncio.Condition)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)
    _opening: int = 0  # 1 while a connection is being opened (a slot of max_connections)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def get(self, path: str, params: list[tuple[str, str]], timeout: float, compressed: bool = False) -> Answer:
        """GET on the least loaded connection; `compressed`: ask for the answer gzipped."""
        target = f"{path}?{urlencode(params)}" if params else path
        async with asyncio.timeout(timeout):
            connection = await self._acquire()
            try:
                return await connection.get(target, self.headers, self.max_answer_bytes, compressed)
            finally:
                connection.in_flight -= 1  # at once: a second cancel while waiting for the lock must not skip it
                async with self._room:
                    self._room.notify()

    async def follow(self, path: str, params: list[tuple[str, str]], sink: Callable[[bytes], None]) -> Answer:
        """GET an endless answer on the least loaded connection, its body to `sink` as it comes
        (see `H2Connection.get`); held until the agent ends it, the connection dies or the caller
        cancels (which resets the stream)."""
        target = f"{path}?{urlencode(params)}" if params else path
        connection = await self._acquire(beyond_share=True)
        try:
            return await connection.get(target, self.headers, self.max_answer_bytes, sink=sink)
        finally:
            connection.in_flight -= 1
            async with self._room:
                self._room.notify()

    async def _acquire(self, beyond_share: bool = False) -> H2Connection:
        """The least loaded connection with room (a new one within the budget, else wait for a
        stream to end). `beyond_share`: a stream that is no watched key's (the followed log) may
        pass `streams`, up to the agent's own limit, so that it never takes a key's place. A new
        connection is opened outside the lock, within OPEN_TIMEOUT_S: every answer on the others
        takes the lock on its way back, and an agent that accepted TCP and never finished TLS held
        them all for a minute."""
        async with self._room:
            while True:
                for gone in [c for c in self._connections if c.closed is not None]:
                    self._connections.remove(gone)
                    self._closing.add(task := asyncio.create_task(gone.close()))
                    task.add_done_callback(self._closing.discard)
                room = [c for c in self._connections if c.in_flight < self._share(c, beyond_share) and c.has_room]
                if room:
                    chosen = min(room, key=lambda c: c.in_flight)
                    chosen.in_flight += 1
                    return chosen
                # One connection opens at a time, and those waiting take its room once it is open: a
                # thousand queries starting at once opened 48 connections where 10 carry them.
                if not self._opening and len(self._connections) < self.max_connections:
                    self._opening = 1  # a slot of the budget, kept while it opens
                    break
                await self._room.wait()  # a stream's return, or the connection being opened, frees room
        return await self._open()

    async def _open(self) -> H2Connection:
        """A new connection in the slot `_acquire` kept, holding one stream for its caller; OSError
        (TimeoutError too) and TLS errors reach the caller, who retries with backoff."""
        chosen = H2Connection(self.host, self.port, self.context)
        try:
            async with asyncio.timeout(OPEN_TIMEOUT_S):
                await chosen.open()
        except BaseException:
            self._closing.add(task := asyncio.create_task(chosen.close()))
            task.add_done_callback(self._closing.discard)
            async with self._room:
                self._opening = 0
                self._room.notify_all()  # the next waiter may open one
            raise
        async with self._room:
            self._opening = 0
            self._connections.append(chosen)
            chosen.in_flight += 1
            self._room.notify_all()  # room on it for others waiting
        log.debug("HTTP/2: connection %d to %s:%d opened", len(self._connections), self.host, self.port)
        return chosen

    def _share(self, connection: H2Connection, beyond_share: bool) -> int:
        return connection.stream_limit if beyond_share else min(self.streams, connection.stream_limit)

    async def close(self) -> None:
        connections, self._connections = self._connections, []
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
