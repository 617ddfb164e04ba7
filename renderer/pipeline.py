"""Many non-blocking GETs to the agent over a few connections, pipelined (HTTP/1.1).

A sweep re-reads every swept service. Through aiohttp each read is a request/response round trip
with the client's per-request overhead: ~0.8 ms each here with 1,000 services, so a sweep took
~0.8 s. Pipelined (all requests of a connection written at once, the answers read back in order;
Consul's Go server answers them one after another) the same sweep costs a fraction of that. Only
for non-blocking reads: a blocking query would hold up every answer behind it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlencode

from renderer.consul_client import ConsulClient, ConsulRequestError, QueryResult, raise_for_status

Request = tuple[str, list[tuple[str, str]], int]  # path, query parameters, index the caller knows
YIELD_EVERY = 8  # answers parsed between two yields to the event loop
MAX_PIPELINES = 4  # pipelined connections at once: more only adds buffers, Consul answers each in turn


class BatchReader(Protocol):
    """Many non-blocking GETs at once: one answer or error per request, in order."""

    async def get_many(self, requests: Sequence[Request]) -> list[QueryResult | ConsulRequestError]: ...


class PipelinedReader:
    """Non-blocking GETs through up to `connections` short-lived pipelined connections."""

    def __init__(self, client: ConsulClient, connections: int, stale: bool = False) -> None:
        self._client = client
        self._connections = max(1, min(MAX_PIPELINES, connections))
        self._stale = stale
        self._open = asyncio.Semaphore(self._connections)  # never more connections than that, all batches together

    async def get_many(self, requests: Sequence[Request]) -> list[QueryResult | ConsulRequestError]:
        """One answer (or error) per request, in order."""
        lanes = [list(range(start, len(requests), self._connections)) for start in range(self._connections)]
        answers: list[QueryResult | ConsulRequestError | None] = [None] * len(requests)
        await asyncio.gather(*(self._lane(requests, lane, answers) for lane in lanes if lane))
        return [a if a is not None else ConsulRequestError("no answer") for a in answers]

    async def _lane(
        self, requests: Sequence[Request], lane: list[int], answers: list[QueryResult | ConsulRequestError | None]
    ) -> None:
        async with self._open:
            await self._pipeline(requests, lane, answers)

    async def _pipeline(
        self, requests: Sequence[Request], lane: list[int], answers: list[QueryResult | ConsulRequestError | None]
    ) -> None:
        host, port, scheme = self._client.host_port_scheme
        context: ssl.SSLContext | None = self._client.ssl_context() if scheme == "https" else None
        self._client.requests += len(lane)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, limit=2**24), timeout=10
            )
        except (OSError, TimeoutError) as err:
            failure = ConsulRequestError(self._client.describe_failure(requests[lane[0]][0], err))
            for i in lane:
                answers[i] = failure
            return
        try:
            writer.write(b"".join(self._request_bytes(host, requests[i]) for i in lane))
            await writer.drain()
            for n, i in enumerate(lane, 1):
                answers[i] = await asyncio.wait_for(self._read_answer(reader, requests[i]), timeout=10)
                if n % YIELD_EVERY == 0:
                    # Buffered answers never make the loop wait: let it run (renders, applies) between batches.
                    await asyncio.sleep(0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as err:
            failure = ConsulRequestError(self._client.describe_failure(requests[lane[0]][0], err))
            for i in lane:
                answers[i] = answers[i] or failure
        finally:
            writer.close()

    def _request_bytes(self, host: str, request: Request) -> bytes:
        path, params, _ = request
        query = list(params) + ([("stale", "")] if self._stale else [])
        target = f"{path}?{urlencode(query)}" if query else path
        headers = [f"GET {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
        headers += [f"{name}: {value}" for name, value in self._client.auth_headers().items()]
        return ("\r\n".join(headers) + "\r\n\r\n").encode()

    @staticmethod
    async def _read_answer(reader: asyncio.StreamReader, request: Request) -> QueryResult | ConsulRequestError:
        path, _, known = request
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        headers = {}
        for line in head[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = await _read_body(reader, headers)
        at = int(headers.get("x-consul-index", "0") or 0)
        unchanged = status == 200 and 0 < known == at
        if not unchanged:
            try:
                raise_for_status(status, body.decode(errors="replace"), path)
            except ConsulRequestError as err:
                return err
        return QueryResult(
            index=at,
            data=None if status == 404 or unchanged else json.loads(body or b"null"),
            last_contact_ms=int(headers.get("x-consul-lastcontact", "0") or 0),
            known_leader=headers.get("x-consul-knownleader", "true") == "true",
            unchanged=unchanged,
        )


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        raise ValueError("an answer with neither Content-Length nor chunked encoding")
    parts: list[bytes] = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class ClientReader:
    """The same interface through a client's own `get`, `connections` at a time (tests' fakes use it)."""

    def __init__(self, client: Any, connections: int, stale: bool = False) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(max(1, connections))
        self._stale = stale

    async def get_many(self, requests: Sequence[Request]) -> list[QueryResult | ConsulRequestError]:
        return list(await asyncio.gather(*(self._one(request) for request in requests)))

    async def _one(self, request: Request) -> QueryResult | ConsulRequestError:
        path, params, known = request
        async with self._slots:
            try:
                result: QueryResult = await self._client.get(
                    path, params, 0, 10.0, stale=self._stale, known_index=known
                )
            except ConsulRequestError as err:
                return err
        return result
