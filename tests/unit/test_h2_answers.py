"""An HTTP/2 answer's body as the agent (or something posing as one) sends it: gzipped where asked,
unzipped within max_answer_bytes, and any bad answer failing its own stream, never the connection's
reader (which would fail every other query held on that connection)."""

from __future__ import annotations

import asyncio
import gzip
import ssl

import h2.events
import pytest

from renderer.source.h2 import AnswerTooLarge, H2Connection, Headers, StreamFailed, _Stream, decoded

LIST = b'{"web": ["v1"], "api": []}'


def test_a_plain_body_is_read_as_sent() -> None:
    assert decoded(LIST, "", 1000) == LIST.decode()
    assert decoded(LIST, "identity", 1000) == LIST.decode()


def test_a_gzipped_body_is_unzipped() -> None:
    assert decoded(gzip.compress(LIST), "gzip", 1000) == LIST.decode()
    assert decoded(gzip.compress(LIST), " GZIP ", 1000) == LIST.decode()


def test_a_zip_bomb_stops_at_the_limit_without_unzipping_the_rest() -> None:
    bomb = gzip.compress(b" " * 50_000_000)  # ~50 KB zipped
    assert len(bomb) < 100_000
    with pytest.raises(AnswerTooLarge, match=r"max_answer_bytes \(1000000 bytes\) when unzipped"):
        decoded(bomb, "gzip", 1_000_000)


def test_an_answer_exactly_at_the_limit_is_read() -> None:
    assert decoded(gzip.compress(b"x" * 1000), "gzip", 1000) == "x" * 1000
    with pytest.raises(AnswerTooLarge):
        decoded(gzip.compress(b"x" * 1001), "gzip", 1000)


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
        decoded(raw, encoding, 1000)


def test_a_bad_answer_fails_its_own_stream_and_leaves_the_others_held() -> None:
    async def scenario() -> None:
        connection = H2Connection("127.0.0.1", 1, ssl.create_default_context())
        loop = asyncio.get_running_loop()
        bad, held = _Stream(1000, loop.create_future()), _Stream(1000, loop.create_future())
        bad.headers = Headers([(":status", "200"), ("content-encoding", "gzip")])
        bad.chunks.append(b"not gzip")
        connection._streams.update({1: bad, 3: held})
        connection._on_event(h2.events.StreamEnded(stream_id=1))  # raises nothing: the reader task would go on reading
        with pytest.raises(StreamFailed, match="corrupt"):
            bad.done.result()
        assert not held.done.done() and connection.closed is None

    asyncio.run(scenario())
