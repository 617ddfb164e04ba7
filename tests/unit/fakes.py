"""Fakes of our own seams for unit tests (integration tests start the real Consul and HAProxy).

`FakeApplier`: the HAProxy side of delivery (`HAProxySide`), recording what it is asked.
`FakeAgent`: a fake Consul agent for the watcher's unit tests (our seam, `ConsulGetter`).
Subclasses write `answer` for the keys' queries; `get` takes the whole signature once, and
answers the recovery probe (`/v1/status/leader`: `leader`, counted in `probes`) and the stall
watch's reading (`/v1/agent/members`: `members()`, counted in `member_reads`) itself, unless
`intercept_probes` is False."""

from __future__ import annotations

from typing import Any

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import ApplyOutcome
from renderer.deliver.runtime import RuntimeApplyError, ServerChange
from renderer.errors import ApplyKind
from renderer.source.client import QueryResult
from renderer.source.dependency import Dependency


class FakeApplier:
    """The HAProxy side (`HAProxySide`), recording what it is asked; every change may go hitless."""

    runtime = None
    has_cleanup = False

    def __init__(self, runtime_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.runtime_fails = runtime_fails
        self.wait = 0.0  # what reload_wait says: seconds before a reload may go

    def hitless(self, spec: TemplateSpec) -> bool:
        return True

    def apply_reloads(self, spec: TemplateSpec) -> bool:
        return spec.haproxy and not spec.command

    def reload_wait(self) -> float:
        return self.wait

    def reload_gap(self) -> float:
        return 0.0

    def reload_running(self) -> ApplyOutcome | None:
        return None

    def cleanup(self) -> None:
        self.calls.append("cleanup")

    def reconfigured(self, config: Config) -> FakeApplier:
        return self

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        self.calls.append("runtime")
        if self.runtime_fails:
            raise RuntimeApplyError("refused")
        return ApplyOutcome(ApplyKind.RUNTIME, 0.0)

    def revert_runtime(self, applied: str, running: str) -> None:
        self.calls.append("revert")

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        self.calls.append("reload")
        return ApplyOutcome(ApplyKind.RELOAD, 0.0)


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
        compressed: bool = False,
    ) -> QueryResult:  # stale, known_index, known_body, held and compressed are not used by these fakes
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
