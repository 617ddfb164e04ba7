"""A fake Consul agent for the watcher's unit tests (our seam, `ConsulGetter`; integration tests
start the real Consul). Subclasses write `answer` for the keys' queries; `get` takes the whole
signature once, and answers the recovery probe (`/v1/status/leader`: `leader`, counted in
`probes`) and the stall watch's reading (`/v1/agent/members`: `members()`, counted in
`member_reads`) itself, unless `intercept_probes` is False."""

from __future__ import annotations

from typing import Any

from renderer.source.client import QueryResult
from renderer.source.dependency import Dependency


def keyed(*dependencies: Dependency) -> dict[str, Dependency]:
    """Dependencies as `Watcher.watch` takes them: key → dependency."""
    return {dep.key: dep for dep in dependencies}


class FakeAgent:
    intercept_probes = True
    leader = "10.0.0.1:8300"  # a leader all along, unless a test says otherwise

    def __init__(self) -> None:
        self.probes = 0
        self.member_reads = 0

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
    ) -> QueryResult:  # stale, known_index, known_body and held are not used by these fakes
        if self.intercept_probes and path == "/v1/status/leader":
            self.probes += 1
            return QueryResult(0, self.leader)
        if self.intercept_probes and path == "/v1/agent/members":
            self.member_reads += 1
            return QueryResult(0, self.members())
        return await self.answer(path, index)

    def members(self) -> list[dict[str, Any]]:
        return []  # no server ever fails here

    async def answer(self, path: str, index: int) -> QueryResult:
        raise NotImplementedError
