"""An HTTP/2 answer's body as the agent (or something posing as one) sends it: gzipped where asked,
unzipped within max_answer_bytes, and any bad answer failing its own stream, never the connection's
reader (which would fail every other query held on that connection)."""

from __future__ import annotations

import asyncio
import gzip
import ssl

import h2.events
import h2.exceptions
import pytest

from renderer.source.h2 import Answer, AnswerTooLarge, H2Connection, Headers, StreamFailed, _Stream, decoded

LIST = b'{"web": ["v1"], "api": []}'


def test_a_plain_body_is_read_as_sent() -> None:
    assert decoded(LIST, "", 1000, False) == LIST.decode()
    assert decoded(LIST, "identity", 1000, False) == LIST.decode()


def test_a_gzipped_body_is_unzipped() -> None:
    assert decoded(gzip.compress(LIST), "gzip", 1000, True) == LIST.decode()
    assert decoded(gzip.compress(LIST), " GZIP ", 1000, True) == LIST.decode()


def test_a_zip_bomb_stops_at_the_limit_without_unzipping_the_rest() -> None:
    bomb = gzip.compress(b" " * 50_000_000)  # ~50 KB zipped
    assert len(bomb) < 100_000
    with pytest.raises(AnswerTooLarge, match=r"max_answer_bytes \(1000000 bytes\) when unzipped"):
        decoded(bomb, "gzip", 1_000_000, True)


def test_an_answer_exactly_at_the_limit_is_read() -> None:
    assert decoded(gzip.compress(b"x" * 1000), "gzip", 1000, True) == "x" * 1000
    with pytest.raises(AnswerTooLarge):
        decoded(gzip.compress(b"x" * 1001), "gzip", 1000, True)


@pytest.mark.parametrize(
    ("raw", "encoding", "why"),
    [
        (b"not gzip at all", "gzip", "corrupt"),
        (gzip.compress(LIST)[:-9], "gzip", "cut short"),
        (gzip.compress(LIST) + b"trailing", "gzip", "followed by other data"),
        (LIST, "br", "Content-Encoding 'br': only gzip"),
        (LIST, "x" * 1000, "only gzip"),
        (b"\xff\xfe{}", "", "not UTF-8"),
        (gzip.compress(b"\xff\xfe{}"), "gzip", "not UTF-8"),
    ],
)
def test_a_bad_answer_says_what_is_wrong(raw: bytes, encoding: str, why: str) -> None:
    with pytest.raises(StreamFailed, match=why):
        decoded(raw, encoding, 1000, True)


def test_gzip_is_refused_where_it_was_not_asked_for() -> None:
    """Only the catalog's list asks for gzip: an agent that zips the answers of the ~1,000 other
    queries (each a 64 KB bomb unzipping to max_answer_bytes) is refused, not unzipped."""
    with pytest.raises(StreamFailed, match="not asked for gzipped"):
        decoded(gzip.compress(LIST), "gzip", 1000, False)


def test_a_bad_answer_fails_its_own_stream_and_leaves_the_others_held() -> None:
    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        loop = asyncio.get_running_loop()
        bad, held = _Stream(1000, loop.create_future(), gzip_asked=True), _Stream(1000, loop.create_future())
        bad.headers, bad.status = Headers([(":status", "200"), ("content-encoding", "gzip")]), 200
        bad.chunks.append(b"not gzip")
        connection._streams.update({1: bad, 3: held})
        connection._on_event(h2.events.StreamEnded(stream_id=1))  # raises nothing: the reader task would go on reading
        with pytest.raises(StreamFailed, match="corrupt"):
            bad.done.result()
        assert not held.done.done() and connection.closed is None

    asyncio.run(scenario())


class RecordingH2:
    """Stands in for the h2 state machine: records what is sent; a reset of an ended stream fails as h2's does."""

    def __init__(self) -> None:
        self.sent: list[list[tuple[str, str]]] = []
        self.resets: list[int] = []

    def get_next_available_stream_id(self) -> int:
        return 1

    def send_headers(self, _stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        self.sent.append(headers)

    def data_to_send(self) -> bytes:
        return b""

    def acknowledge_received_data(self, _length: int, _stream_id: int) -> None:
        pass

    def reset_stream(self, stream_id: int, _code: int) -> None:
        raise h2.exceptions.StreamClosedError(stream_id)


def test_a_compressed_query_asks_for_gzip_once_and_keeps_the_token() -> None:
    async def scenario() -> list[tuple[str, str]]:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = RecordingH2()  # type: ignore[assignment]
        query = asyncio.create_task(
            connection.get("/v1/catalog/services", {"Accept-Encoding": "identity", "X-Consul-Token": "t"}, 1000, True)
        )
        await asyncio.sleep(0)
        stream = connection._streams[1]
        assert stream.gzip_asked
        stream.done.set_result(Answer(200, Headers([]), "{}", 2))
        await query
        return connection._h2.sent[0]  # type: ignore[attr-defined, no-any-return]

    sent = asyncio.run(scenario())
    asked = [(name, value) for name, value in sent if name.lower() == "accept-encoding"]
    assert asked == [("accept-encoding", "gzip")]
    assert ("x-consul-token", "t") in sent


class ResettingH2(RecordingH2):
    """As RecordingH2, but the stream is open: a reset is recorded; the Nth stream is refused."""

    def __init__(self, refuse_at: int = 0, error: type[h2.exceptions.ProtocolError] | None = None) -> None:
        super().__init__()
        self.refuse_at = refuse_at
        self.error = error or h2.exceptions.TooManyStreamsError

    def send_headers(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        if len(self.sent) + 1 == self.refuse_at:
            raise self.error("Max outbound streams is 250, 250 open")
        super().send_headers(stream_id, headers, end_stream)

    def reset_stream(self, stream_id: int, _code: int) -> None:
        self.resets.append(stream_id)


def test_a_cancelled_query_resets_its_stream() -> None:
    """A held query cancelled (a key dropped, the stall watch asking again, a timeout) tells the
    agent with RST_STREAM: otherwise the stream stays open on both sides for the rest of its wait,
    and enough of them make the agent refuse new streams (Go allows 250 per connection)."""

    async def scenario() -> tuple[list[int], dict[int, object]]:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = recording = ResettingH2()  # type: ignore[assignment]
        query = asyncio.create_task(connection.get("/v1/health/service/web?index=5&wait=600000ms", {}, 1000))
        await asyncio.sleep(0)
        query.cancel()
        with pytest.raises(asyncio.CancelledError):
            await query
        return recording.resets, dict(connection._streams)

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ([1], {})


def test_a_stream_the_connection_refuses_fails_that_query_alone_as_a_retryable_error() -> None:
    async def scenario() -> dict[int, object]:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = ResettingH2(refuse_at=1)  # type: ignore[assignment]
        with pytest.raises(StreamFailed, match="refused a new stream: TooManyStreamsError"):
            await connection.get("/v1/health/service/web", {}, 1000)
        return dict(connection._streams)

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == {}


def test_any_other_refusal_of_the_state_machine_retires_the_connection() -> None:
    """h2 may have advanced its header compression without a frame sent: no new stream there."""

    async def scenario() -> str | None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = ResettingH2(refuse_at=1, error=h2.exceptions.ProtocolError)  # type: ignore[assignment]
        with pytest.raises(StreamFailed, match="state machine refused a request"):
            await connection.get("/v1/health/service/web", {}, 1000)
        return connection.closed

    assert "state machine refused" in (asyncio.run(asyncio.wait_for(scenario(), 5)) or "")


class SpentH2(RecordingH2):
    def get_next_available_stream_id(self) -> int:
        raise h2.exceptions.NoAvailableStreamIDError("Unable to allocate new stream ID")


def test_a_connection_out_of_stream_ids_is_retired_and_its_query_retried() -> None:
    """A review's finding: the error escaped as no ConsulError, so each poll on the connection died
    in turn (the store still said all was well) and the connection was never retired."""

    async def scenario() -> str | None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = SpentH2()  # type: ignore[assignment]
        with pytest.raises(StreamFailed, match="used up its stream ids"):
            await connection.get("/v1/health/service/web", {}, 1000)
        return connection.closed

    assert "stream ids" in (asyncio.run(asyncio.wait_for(scenario(), 5)) or "")


def test_an_answer_over_the_limit_in_its_last_frame_fails_its_stream_alone() -> None:
    """The frame that passes the limit also ends the stream: no reset of a closed stream (h2 would
    raise, and the reader would fail every query held on the connection)."""

    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = RecordingH2()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        big, held = _Stream(10, loop.create_future()), _Stream(10, loop.create_future())
        connection._streams.update({1: big, 3: held})
        data = h2.events.DataReceived(stream_id=1, data=b"x" * 11, flow_controlled_length=11)
        data.stream_ended = h2.events.StreamEnded(stream_id=1)
        connection._on_event(data)
        connection._on_event(data.stream_ended)
        with pytest.raises(AnswerTooLarge):
            big.done.result()
        assert not held.done.done()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ([(b":status", b"2x0")], "no valid :status"),
        ([(b"content-encoding", b"gz\xffip")], "Content-Encoding 'gz\ufffdip'"),
    ],
)
def test_malformed_headers_fail_their_stream_alone(headers: list[tuple[bytes, bytes]], why: str) -> None:
    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        loop = asyncio.get_running_loop()
        bad, held = _Stream(1000, loop.create_future()), _Stream(1000, loop.create_future())
        connection._streams.update({1: bad, 3: held})
        connection._on_event(h2.events.ResponseReceived(stream_id=1, headers=[(b":status", b"200"), *headers]))
        connection._on_event(h2.events.StreamEnded(stream_id=1))
        with pytest.raises(StreamFailed, match=why):
            bad.done.result()
        assert not held.done.done() and connection.closed is None

    asyncio.run(scenario())


def test_a_ping_stuck_in_a_write_still_ends_a_dead_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer no longer reads: the PING's own write blocks (its socket's buffer is full). The
    check's deadline covers the write too, so the connection is given up all the same."""
    import renderer.source.h2 as h2_module

    class StuckWriter:
        def __init__(self) -> None:
            self.aborted = False
            self.transport = self

        def write(self, _data: bytes) -> None:
            pass

        async def drain(self) -> None:
            await asyncio.sleep(3600)

        def abort(self) -> None:
            self.aborted = True

    class PingingH2(RecordingH2):
        def ping(self, _data: bytes) -> None:
            pass

        def data_to_send(self) -> bytes:
            return b"ping"

    monkeypatch.setattr(h2_module, "PING_INTERVAL_S", 0.01)
    monkeypatch.setattr(h2_module, "PING_TIMEOUT_S", 0.05)

    async def scenario() -> tuple[str | None, bool]:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = PingingH2()  # type: ignore[assignment]
        connection._writer = writer = StuckWriter()  # type: ignore[assignment]
        await asyncio.wait_for(connection._ping(), 2)
        return connection.closed, writer.aborted

    closed, aborted = asyncio.run(scenario())
    assert closed is not None and "PING" in closed and aborted


def test_a_followed_stream_gives_its_body_as_it_comes_and_a_failing_sink_ends_that_stream_alone() -> None:
    """The agent's log, followed: b"" when the 200 arrives, then each piece, none kept in memory;
    a sink that raises (a bug of ours) fails its own stream, not the reader serving the others."""

    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = recording = ResettableH2()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        pieces: list[bytes] = []

        def failing(data: bytes) -> None:
            if data:
                raise RuntimeError("a bug in the sink")

        followed = _Stream(10, loop.create_future(), sink=pieces.append)
        broken = _Stream(10, loop.create_future(), sink=failing)
        held = _Stream(1000, loop.create_future())
        connection._streams.update({1: followed, 3: broken, 5: held})
        for stream_id in (1, 3):
            connection._on_event(h2.events.ResponseReceived(stream_id=stream_id, headers=[(b":status", b"200")]))
            for _ in range(3):  # more than the limit of 10 bytes in all: a followed body has none
                connection._on_event(
                    h2.events.DataReceived(stream_id=stream_id, data=b"line\n", flow_controlled_length=5)
                )
        assert pieces == [b"", b"line\n", b"line\n", b"line\n"] and not followed.chunks
        with pytest.raises(StreamFailed, match="a bug in the sink"):
            broken.done.result()
        assert recording.resets == [3]  # the agent is told to stop sending it
        connection._on_event(h2.events.StreamEnded(stream_id=1))
        answer = followed.done.result()
        assert (answer.code, answer.body) == (200, "")
        assert not held.done.done() and connection.closed is None

    asyncio.run(scenario())


class ResettableH2(RecordingH2):
    def reset_stream(self, stream_id: int, _code: int) -> None:
        self.resets.append(stream_id)


def test_a_followed_stream_that_comes_encoded_fails_at_once_instead_of_being_followed_blind() -> None:
    """Lines cannot be found in a gzipped log: the stream fails (the watch polls) and is reset."""

    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        connection._h2 = recording = ResettableH2()  # type: ignore[assignment]
        pieces: list[bytes] = []
        followed = _Stream(10, asyncio.get_running_loop().create_future(), sink=pieces.append)
        connection._streams[1] = followed
        headers = [(b":status", b"200"), (b"content-encoding", b"gzip")]
        connection._on_event(h2.events.ResponseReceived(stream_id=1, headers=headers))
        connection._on_event(h2.events.DataReceived(stream_id=1, data=b"\x1f\x8b...", flow_controlled_length=5))
        with pytest.raises(StreamFailed, match="Content-Encoding 'gzip'"):
            followed.done.result()
        assert pieces == [] and recording.resets == [1] and connection.closed is None

    asyncio.run(scenario())


def test_the_followed_log_may_pass_the_pools_share_of_a_connection_so_it_never_takes_a_keys_place() -> None:
    from renderer.source.h2 import StreamPool

    pool = StreamPool("127.0.0.1", 1, ssl.create_default_context(), {}, 1, 1000, streams=100)

    class Full:
        stream_limit = 250

    assert pool._share(Full(), beyond_share=False) == 100  # type: ignore[arg-type]
    assert pool._share(Full(), beyond_share=True) == 250  # type: ignore[arg-type]


def test_a_connection_that_never_opens_holds_no_other_answer_and_gives_up_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review's finding: a new connection was opened while the pool's lock was held, and every
    answer takes that lock on its way back: an agent that accepted TCP and never finished TLS held
    the answers of the healthy connections for a minute (asyncio's handshake timeout)."""
    import renderer.source.h2 as h2_module

    release = asyncio.Event()

    class Conn:
        opened = 0

        def __init__(self, host: str, port: int, context: object) -> None:
            self.in_flight, self.closed, self.has_room, self.stream_limit = 0, None, True, 250

        async def open(self) -> None:
            Conn.opened += 1
            if Conn.opened > 1:
                await asyncio.sleep(3600)  # TCP accepted, TLS never finished

        async def get(self, target: str, headers: object, limit: int, compressed: bool = False) -> str:
            if target == "/fast":
                await release.wait()
                return "answer"
            await asyncio.sleep(3600)
            return ""

        async def close(self) -> None:
            return None

    monkeypatch.setattr(h2_module, "H2Connection", Conn)
    monkeypatch.setattr(h2_module, "OPEN_TIMEOUT_S", 0.5)

    async def scenario() -> tuple[str, bool, BaseException | None, int]:
        pool = h2_module.StreamPool("127.0.0.1", 1, ssl.create_default_context(), {}, 4, 1000, streams=2)
        fast = asyncio.create_task(pool.get("/fast", [], 60))
        held = asyncio.create_task(pool.get("/held", [], 60))
        await asyncio.sleep(0.05)
        third = asyncio.create_task(pool.get("/third", [], 60))  # opens a second connection: it stalls
        await asyncio.sleep(0.05)
        release.set()
        answer = await asyncio.wait_for(fast, 0.3)  # within the stalled open's timeout
        opening = not third.done()
        await asyncio.wait({third}, timeout=2)
        failed = third.exception() if third.done() else None
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        return answer, opening, failed, pool._opening

    answer, opening, failed, slots = asyncio.run(scenario())
    assert answer == "answer" and opening
    assert isinstance(failed, TimeoutError) and slots == 0  # retried by the caller; its slot is free again


def test_queries_starting_at_once_open_one_connection_at_a_time_and_fill_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench's connection target (16 at 1,000 services) missed at 48 once connections opened
    outside the pool's lock: every query finding no room opened one of its own."""
    import renderer.source.h2 as h2_module

    class Conn:
        def __init__(self, host: str, port: int, context: object) -> None:
            self.in_flight, self.closed, self.has_room, self.stream_limit = 0, None, True, 250

        async def open(self) -> None:
            await asyncio.sleep(0.02)  # TCP and TLS take a while: queries pile up meanwhile

        async def get(self, target: str, headers: object, limit: int, compressed: bool = False) -> str:
            await asyncio.sleep(3600)
            return ""

        async def close(self) -> None:
            return None

    monkeypatch.setattr(h2_module, "H2Connection", Conn)

    async def scenario() -> int:
        pool = h2_module.StreamPool("127.0.0.1", 1, ssl.create_default_context(), {}, 64, 1000, streams=100)
        held = [asyncio.create_task(pool.get(f"/k{n}", [], 60)) for n in range(1000)]
        for _ in range(200):
            if sum(c.in_flight for c in pool._connections) == 1000:
                break
            await asyncio.sleep(0.01)
        opened = pool.connections
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return opened

    assert asyncio.run(scenario()) == 10
