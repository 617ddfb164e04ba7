"""The local agent's ports, read from /v1/agent/self and kept from catalog listeners (helper-144)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import TemplateSpec
from renderer.errors import ConsulError
from renderer.loop import agent_ports
from renderer.loop.agent_ports import ports_of, read_agent_ports
from renderer.render.template import TemplateRenderer
from renderer.source.client import ConsulRequestError, QueryResult
from renderer.source.dependency import CatalogServices, HealthService
from tests.unit.test_service_settings import VARIABLES, Data, instance

# What Consul 1.8.7 says of an agent started with -dns-port -1 -grpc-port -1 (measured), trimmed.
SELF_187 = {
    "Config": {"Version": "1.8.7"},
    "DebugConfig": {
        "ConnectSidecarMinPort": 21000, "DNSPort": -1, "GRPCPort": -1, "HTTPPort": 18611, "HTTPSPort": -1,
        "SerfPortLAN": 18612, "SerfPortWAN": 18613, "ServerPort": 18614,
    },
}  # fmt: skip


def test_the_listening_ports_are_read_and_the_others_ignored() -> None:
    assert ports_of(SELF_187) == {18611, 18612, 18613, 18614}
    assert ports_of({"DebugConfig": {"HTTPPort": True, "DNSPort": "8600", "ServerPort": 70000}}) == frozenset()
    assert ports_of(["not", "an", "object"]) == ports_of({"DebugConfig": None}) == frozenset()


class Agent:
    """Answers /v1/agent/self with `answers` in turn (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers, self.asked = list(answers), 0

    async def get(self, path: str) -> QueryResult:
        assert path == "/v1/agent/self"
        self.asked += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return QueryResult(index=0, data=answer)


def test_an_agent_down_at_start_is_asked_again_until_it_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_ports, "RETRY_S", 0.01)
    found: list[frozenset[int]] = []
    agent = Agent(ConsulError("connection refused"), {"DebugConfig": {}}, SELF_187)
    asyncio.run(asyncio.wait_for(read_agent_ports(agent, found.append), 5))
    assert found == [frozenset({18611, 18612, 18613, 18614})] and agent.asked == 3


def test_a_token_without_agent_read_is_said_once_and_not_asked_again(caplog: pytest.LogCaptureFixture) -> None:
    found: list[frozenset[int]] = []
    agent = Agent(ConsulRequestError("Consul refused /v1/agent/self: ACL permission denied", 403))
    with caplog.at_level(logging.INFO, logger="renderer.loop.agent_ports"):
        asyncio.run(asyncio.wait_for(read_agent_ports(agent, found.append), 5))
    assert found == [] and agent.asked == 1 and "give the token agent:read" in caplog.text


def test_a_listener_rendered_before_the_agents_ports_were_known_is_rendered_again_without_it() -> None:
    """A kept block published the listener; learning the ports must not reuse it."""
    services = {"evil": [instance("evil", "e1", haproxy_mode="tcp", haproxy_port="18612")]}
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({"evil": ["lb"]})}
    for name in ("evil", "web"):
        values[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
    renderer = TemplateRenderer(TemplateSpec(DEFAULT_TEMPLATE, Path("/tmp/unused")), VARIABLES)
    before = renderer.render(Data(values)).content
    assert before is not None and "listen evil" in before
    renderer.set_reserved_ports(renderer.reserved_ports | {18612})
    after = renderer.render(Data(values))
    assert after.content is not None and "listen evil" not in after.content and "\nbackend evil\n" in after.content
    assert any("meta haproxy_port 18612 is Consul's or this renderer's port" in n for n in after.left_out)
