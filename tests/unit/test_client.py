"""The Consul client's one status → error mapping, against a local HTTP server that answers as a
refusing agent would (the watcher's and the register path's errors all come from here), and the
limit on the size of an answer, enforced while it is read."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace

import pytest
from aiohttp import web

from renderer.config import ConsulSettings
from renderer.source import client as client_module
from renderer.source.client import ConsulClient, ConsulRequestError, QueryResult, cache_age, keep_alive


async def refused_with(status: int, body: str, limit: int | None = None) -> ConsulRequestError:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/v1/kv/x", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = ConsulSettings(addr=f"127.0.0.1:{port}")
    client = ConsulClient(settings if limit is None else replace(settings, max_answer_bytes=limit))
    try:
        with pytest.raises(ConsulRequestError) as caught:
            await client.get("/v1/kv/x", [], 0, 1.0)
        return caught.value
    finally:
        await client.close()
        await runner.cleanup()


def test_too_many_connections_names_the_agent_limit_and_what_to_do() -> None:
    err = asyncio.run(refused_with(429, "Your IP is issuing too many concurrent connections"))
    assert err.status == 429
    assert "limits.http_max_conns_per_client" in str(err) and "--max-connections" in str(err)


def test_an_acl_refusal_says_which_token_setting_to_fix() -> None:
    err = asyncio.run(refused_with(403, "Permission denied"))
    assert err.status == 403 and "CONSUL_HTTP_TOKEN" in str(err)


def test_a_server_error_carries_consuls_own_words() -> None:
    err = asyncio.run(refused_with(500, "No cluster leader"))
    assert err.status == 500 and "No cluster leader" in str(err)


def test_an_error_answer_is_one_short_line_in_a_message() -> None:
    """An attacker's review: a 500 answer's newlines forged whole log lines (the registrator logs
    these messages as they are), and a 403's body had no length cap."""
    forged = "rpc error\n2026-12-04 17:00:00 INFO renderer.registration.registrator: registered web-x"
    err = asyncio.run(refused_with(500, forged))
    assert "\n" not in str(err) and "rpc error 2026-12-04" in str(err)
    err = asyncio.run(refused_with(403, "Permission denied\r\n" + "x" * 100_000))
    assert len(str(err)) < 600 and "\r" not in str(err)
    assert client_module.said("a\u2028b\x1bc") == "a b c"


def test_an_answer_nested_too_deep_to_parse_is_a_failed_request_not_a_crash() -> None:
    """`[` × 100,000 made json raise RecursionError out of the client: the key's watch ended
    without a word. Now it is a failed request, retried like any other."""
    err = asyncio.run(refused_with(200, "[" * 60_000))
    assert err.status is None and "nested too deep to read" in str(err)


def test_a_long_answer_is_decoded_by_its_reader_not_as_it_arrives() -> None:
    """An attacker's review: json.loads of a 45 MB answer held the event loop ~1 s; an answer of
    DECODE_LATER_CHARS or more is left for `decoded()` (the watcher calls it on its parse thread),
    and one that does not decode fails there, in the reader's hands."""
    from renderer.source.client import DECODE_LATER_CHARS, UNDECODED

    long_value = "x" * DECODE_LATER_CHARS
    answers, _ = asyncio.run(ask_for_sizes([f"/v1/kv/{DECODE_LATER_CHARS + 2}", "/v1/kv/100"], limit=1 << 20))
    assert answers == [UNDECODED, "x" * 98]
    result = QueryResult(1, UNDECODED, body=f'"{long_value}"')
    assert result.decoded() == long_value
    with pytest.raises(RecursionError):
        QueryResult(1, UNDECODED, body="[" * 100_000).decoded()


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def ask_for_sizes(paths: list[str], limit: int) -> tuple[list[object], int]:
    """GET each path from a server whose /v1/kv/<n> answers n bytes announced (Content-Length),
    /v1/kv/endless an endless chunked body; the answers (or errors) and what the server sent."""
    sent = 0

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b'"' + b"x" * (int(request.match_info["n"]) - 2) + b'"')

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()  # no Content-Length: chunked
        await response.prepare(request)
        while sent < 256 * 1024 * 1024:  # a bound, should the client ever read on
            try:
                await response.write(b"x" * 65536)
            except ConnectionError:
                break
            sent += 65536
        return response

    app = web.Application()
    app.router.add_get("/v1/kv/endless", endless)
    app.router.add_get("/v1/kv/{n:[0-9]+}", sized)
    runner, port = await serve(app)
    client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}", max_answer_bytes=limit))
    answers: list[object] = []
    try:
        for path in paths:
            try:
                answers.append((await client.get(path, [], 0, 5.0)).data)
            except ConsulRequestError as err:
                answers.append(err)
    finally:
        await client.close()
        await runner.cleanup()
    return answers, sent


def test_an_announced_answer_over_the_limit_fails_that_key_only() -> None:
    answers, _ = asyncio.run(ask_for_sizes(["/v1/kv/5000", "/v1/kv/4096", "/v1/kv/5000"], limit=4096))
    too_large, fits, again = answers
    assert isinstance(too_large, ConsulRequestError) and isinstance(again, ConsulRequestError)
    assert str(too_large).startswith(
        "Consul's answer for /v1/kv/5000 is 5000 bytes (Content-Length), over max_answer_bytes (4096 bytes)"
    )
    assert "--max-answer-bytes" in str(too_large) and "CONSUL_RENDERER_MAX_ANSWER_BYTES" in str(too_large)
    assert fits == "x" * 4094  # the limit itself is allowed, and the client still works after a refusal


def test_an_endless_answer_is_refused_while_it_is_read() -> None:
    answers, sent = asyncio.run(ask_for_sizes(["/v1/kv/endless", "/v1/kv/100"], limit=1024 * 1024))
    endless, after = answers
    assert isinstance(endless, ConsulRequestError)
    assert str(endless).startswith(
        "Consul's answer for /v1/kv/endless passed max_answer_bytes (1048576 bytes) while being read"
    )
    assert "--max-answer-bytes" in str(endless)
    assert after == "x" * 98
    assert sent < 64 * 1024 * 1024  # the client hung up: the answer was never read whole


def test_an_answer_zipped_unasked_is_refused_unread() -> None:
    """Over HTTP/1.1 nothing is asked for gzipped: an answer that comes zipped anyway (a 64 KB
    bomb that unzips to 64 MB) is refused before aiohttp unzips any of it."""
    import gzip

    bomb = gzip.compress(b" " * 64 * 1024 * 1024)

    async def zipped(_request: web.Request) -> web.Response:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    async def scenario() -> ConsulRequestError:
        app = web.Application()
        app.router.add_get("/v1/kv/zipped", zipped)
        runner, port = await serve(app)
        client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}"))
        try:
            with pytest.raises(ConsulRequestError) as caught:
                await client.get("/v1/kv/zipped", [], 0, 5.0)
            assert client.answer_bytes == 0
            return caught.value
        finally:
            await client.close()
            await runner.cleanup()

    err = asyncio.run(scenario())
    assert str(err).startswith("Consul's answer for /v1/kv/zipped came with Content-Encoding 'gzip', which was not")


@pytest.mark.parametrize(
    ("header", "age"), [("", 0), ("0", 0), (" 12 ", 12), ("-1", 1), ("1e9", 1), ("soon", 1), ("٣", 1)]
)
def test_a_cached_answers_age_is_read_and_an_unreadable_one_counts_as_old(header: str, age: int) -> None:
    """`Age` > 0 on a `?cached` answer: the agent's cache lost the servers; the sweep then asks
    them. A header we cannot read must never pass for fresh (0)."""
    assert cache_age(header) == age


def test_a_blocking_query_sends_its_wait_to_the_millisecond() -> None:
    """`block_wait` reaches the wire as Consul reads it: 24 h as 86400000ms, 1.0015 s rounded (not
    cut) to 1002ms, with the index."""

    async def scenario() -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []

        async def handler(request: web.Request) -> web.Response:
            seen.append(dict(request.query))
            return web.Response(text="[]", headers={"X-Consul-Index": "8"})

        app = web.Application()
        app.router.add_get("/v1/kv/x", handler)
        runner, port = await serve(app)
        client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}"))
        try:
            for wait_s in (86400.0, 1.0015):
                await client.get("/v1/kv/x", [], 7, wait_s)
        finally:
            await client.close()
            await runner.cleanup()
        return seen

    seen = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert [(q["index"], q["wait"]) for q in seen] == [("7", "86400000ms"), ("7", "1002ms")]


async def follow_log(handler: web.RouteDef | None = None, lines: int = 3) -> tuple[list[bytes], BaseException | None]:
    """Follow `/v1/agent/monitor` over HTTP/1.1 from a local server that streams `lines` lines
    slowly and ends (or answers as `handler` says): the pieces handed on, and the error if any."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for n in range(lines):
            await response.write(b'{"@message": "line %d"}\n' % n)
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_routes([handler or web.get("/v1/agent/monitor", stream)])
    runner, port = await serve(app)
    client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}"))
    pieces: list[bytes] = []
    error: BaseException | None = None
    try:
        assert client.can_follow  # over HTTP/1.1 too: one spare connection of the budget
        await asyncio.wait_for(client.follow("/v1/agent/monitor", [("logjson", "")], pieces.append), 5)
    except ConsulRequestError as err:
        error = err
    finally:
        await client.close()
        await runner.cleanup()
    return pieces, error


def test_the_agents_log_is_followed_over_http1_piece_by_piece_as_it_comes() -> None:
    pieces, error = asyncio.run(follow_log())
    assert error is None
    assert pieces[0] == b""  # accepted, before any line
    assert b"".join(pieces).splitlines() == [b'{"@message": "line %d"}' % n for n in range(3)]
    assert len(pieces) >= 3  # handed on as they came, not at the end


def test_following_over_http1_refused_says_which_token_setting_to_fix() -> None:
    async def refuse(_request: web.Request) -> web.Response:
        return web.Response(status=403, text="Permission denied")

    pieces, error = asyncio.run(follow_log(web.get("/v1/agent/monitor", refuse)))
    assert isinstance(error, ConsulRequestError) and error.status == 403 and "CONSUL_HTTP_TOKEN" in str(error)
    assert pieces == []


def test_a_followed_log_that_comes_zipped_over_http1_is_refused_unread() -> None:
    async def zipped(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
        await response.prepare(request)
        await response.write(b"\x1f\x8b not a line")
        return response

    pieces, error = asyncio.run(follow_log(web.get("/v1/agent/monitor", zipped)))
    assert isinstance(error, ConsulRequestError) and "encoded" in str(error)
    assert pieces == []


def test_a_followed_connection_gets_tcp_keepalives_so_a_silent_drop_is_noticed() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        keep_alive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    keep_alive(None)  # a transport without a socket: nothing to do


def test_following_over_http1_sets_keepalives_on_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    monkeypatch.setattr(client_module, "keep_alive", seen.append)
    pieces, error = asyncio.run(follow_log())
    assert error is None and pieces
    assert len(seen) == 1 and type(seen[0]).__name__ == "TransportSocket"  # the connection's own socket


async def ask_raw(path: str) -> tuple[list[str], QueryResult | ConsulRequestError]:
    """GET `path` from a bare HTTP server that records each request line as received and answers
    as Consul's router does: a path with dot or empty segments is redirected (301) to its cleaned
    form; /v1/kv/secret holds a secret."""
    lines: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := (await reader.readline()).decode():
            lines.append(line.strip())
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            target = line.split()[1]
            if "/." in target or "//" in target:
                head, body = "301 Moved Permanently\r\nLocation: /v1/kv/secret", b""
            else:
                head, body = "200 OK\r\nX-Consul-Index: 7\r\nContent-Type: application/json", b'"s3cret"'
            writer.write(f"HTTP/1.1 {head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ConsulClient(ConsulSettings(addr=f"127.0.0.1:{port}"))
    try:
        try:
            result: QueryResult | ConsulRequestError = await client.get(path, [], 0, 1.0)
        except ConsulRequestError as err:
            result = err
        return lines, result
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("path", ["/v1/kv/t/../secret", "/v1/kv/t/./secret", "/v1/kv/t//secret"])
def test_a_path_goes_out_as_given_and_a_redirect_to_another_key_is_not_followed(path: str) -> None:
    """Given as text, aiohttp normalised `/v1/kv/t/../secret` to `/v1/kv/secret` and read the
    secret; and a redirect was followed. Now the path goes out byte for byte, Consul's 301 is an
    error with its status (the key is refused for its form), and nothing else is asked."""
    lines, result = asyncio.run(ask_raw(path))
    assert lines == [f"GET {path} HTTP/1.1"]
    assert isinstance(result, ConsulRequestError) and result.status == 301
    assert "not followed" in str(result) and "--consul-addr" in str(result)


def test_a_quoted_name_is_not_quoted_again_nor_unquoted() -> None:
    lines, result = asyncio.run(ask_raw("/v1/kv/a%2Fb%20c"))
    assert lines == ["GET /v1/kv/a%2Fb%20c HTTP/1.1"]
    assert isinstance(result, QueryResult) and result.data == "s3cret"


def test_an_oversized_error_stays_a_failed_request_of_its_status() -> None:
    """A review: too large was decided before the status, so an oversized 403 or 5xx (a proxy's
    page) passed for "Consul answered": served empty, never retried, an ACL error not fatal."""
    from renderer.source.client import TooLarge

    err = asyncio.run(refused_with(503, "x" * 5000, limit=4096))
    assert not isinstance(err, TooLarge) and err.status == 503 and "max_answer_bytes" in str(err)
    fine = asyncio.run(refused_with(200, '"' + "x" * 5000 + '"', limit=4096))
    assert isinstance(fine, TooLarge)
