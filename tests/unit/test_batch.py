"""Reading many services at once: never more than `connections` in flight, errors returned in place."""

from __future__ import annotations

import asyncio
from typing import Any

from renderer.source.batch import ClientReader
from renderer.source.client import ConsulRequestError, QueryResult


class CountingClient:
    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0

    async def get(
        self, path: str, params: Any, index: int, wait_s: float, stale: bool = False, known_index: int = 0
    ) -> QueryResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if path.endswith("bad"):
                raise ConsulRequestError("refused", status=500)
            return QueryResult(7, path, unchanged=known_index == 7)
        finally:
            self.in_flight -= 1


def test_at_most_n_at_once_and_each_answer_in_its_place() -> None:
    client = CountingClient()
    requests = [(f"/v1/health/service/s{i}", [], 0) for i in range(50)] + [("/v1/health/service/bad", [], 0)]
    requests.append(("/v1/health/service/same", [], 7))
    answers = asyncio.run(ClientReader(client, connections=4).get_many(requests))
    assert client.peak == 4
    assert [a.data for a in answers[:3] if isinstance(a, QueryResult)] == [f"/v1/health/service/s{i}" for i in range(3)]
    assert isinstance(answers[50], ConsulRequestError)
    assert isinstance(answers[51], QueryResult) and answers[51].unchanged
