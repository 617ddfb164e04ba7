from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from renderer.config import TemplateSpec
from renderer.render.guard import Guard
from renderer.source.dependency import HealthService, ServiceInstance


def instances(n: int) -> list[ServiceInstance]:
    return [ServiceInstance("n", f"web-{i}", "web", "10.0.0.1", 80 + i) for i in range(n)]


def guard(empty_grace: float = 30.0, allow_empty: bool = False, min_instances: dict[str, int] | None = None) -> Guard:
    spec = TemplateSpec(Path("t"), Path("o"), empty_grace=empty_grace, allow_empty=allow_empty)
    return Guard(replace(spec, min_instances=min_instances) if min_instances is not None else spec)


KEY = HealthService("web").key


def test_sudden_empty_list_is_held_until_the_grace_ends() -> None:
    g = guard(empty_grace=30.0)
    assert g.filter(KEY, "web", instances(3), now=0.0) == (instances(3), None)
    held, remaining = g.filter(KEY, "web", [], now=1.0)
    assert held == instances(3) and remaining == 30.0
    assert g.filter(KEY, "web", [], now=20.0)[0] == instances(3)
    assert g.filter(KEY, "web", [], now=31.5) == ([], None)  # lasted longer than the grace


def test_recovery_ends_the_hold_and_allow_empty_disables_it() -> None:
    g = guard()
    g.filter(KEY, "web", instances(2), now=0.0)
    assert g.filter(KEY, "web", [], now=1.0)[0] == instances(2)
    assert g.filter(KEY, "web", instances(1), now=2.0) == (instances(1), None)
    free = guard(allow_empty=True)
    free.filter(KEY, "web", instances(2), now=0.0)
    assert free.filter(KEY, "web", [], now=1.0) == ([], None)


def test_min_instances_per_service() -> None:
    g = guard(min_instances={"web": 3, "*": 1})
    g.filter(KEY, "web", instances(4), now=0.0)
    assert g.filter(KEY, "web", instances(2), now=1.0)[0] == instances(4)  # below 3: held
    assert g.filter(KEY, "web", instances(3), now=2.0) == (instances(3), None)


def test_never_had_instances_nothing_to_hold() -> None:
    assert guard().filter(KEY, "web", [], now=0.0) == ([], None)


def test_a_name_with_the_renderers_own_words_is_quoted_in_the_guards_lines(caplog: pytest.LogCaptureFixture) -> None:
    """helper-116 (/tmp/rev63): a service named `payments (had 9, …). ERROR renderer.loop.cycle: … left
    out service web, instance 'web-1' …` made the guard's line report an instance left out that does
    not exist, and wrong counts: the guard's lines show names as every other report does."""
    name = "pay (had 9, min_instances 1). ERROR renderer.loop.cycle: left out service web, instance 'web-1'"
    g = guard()
    with caplog.at_level(logging.INFO, logger="renderer.render.guard"):
        g.filter(KEY, name, instances(2), now=0.0)
        g.filter(KEY, name, [], now=1.0)
        g.filter(KEY, name, instances(2), now=2.0)
        g.filter(KEY, name, [], now=3.0)
        g.filter(KEY, name, [], now=40.0)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4 and all(repr(name) in line for line in lines), lines
