"""What a renderer remembers of the services outlives a restart (`renderer.loop.memory`): who had
each HAProxy name, and the settings a service's instances last agreed on. Found in an attacker's
re-review (/tmp/rev20): both lived in the process only.

Real templates, renderers and files; a restart is `compile_templates` again, as at a start."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import Config, ConsulSettings, TemplateSpec
from renderer.haproxy.checked import NAME_HOLD_S, Holder
from renderer.loop import memory as memory_module
from renderer.loop.memory import RendererMemory
from renderer.loop.templates import HostAddresses, TemplateState, compile_templates
from renderer.render import listing
from renderer.runner import Runner
from renderer.source.dependency import CatalogServices, HealthService
from tests.unit.test_service_settings import VARIABLES, Data, entry, instance


def start(tmp_path: Path) -> TemplateState:
    """A renderer of the default template as a start makes it (what a previous run kept, restored)."""
    config = Config(templates=(TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg", haproxy=True),), vars=VARIABLES)
    [state] = compile_templates(config, {}, own=frozenset())
    return state


def render(state: TemplateState, services: dict[str, list[dict[str, Any]]]) -> tuple[str, tuple[str, ...]]:
    """Render as the loop does (and keep the memory, as it does after each render)."""
    values: dict[str, Any] = {CatalogServices().key: CatalogServices().parse({n: ["lb"] for n in services})}
    for name in {*services, "web"}:
        values[HealthService(name).key] = HealthService(name).parse(services.get(name, []))
    result = state.renderer.render(Data(values))
    assert result.content is not None, result.error
    assert state.memory is not None
    state.memory.keep(state.renderer)
    return result.content, result.left_out


def test_a_restart_beside_more_services_than_gone_names_are_held_keeps_every_serving_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker's review (/tmp/rev37): a start's first render, with no catalog answer yet,
    marked every holder gone; past MAX_GONE_HOLDERS (4,096) the first names in order were let go,
    and `payments`, refused while the renderer ran, took `Payments`'s backend and Host after a
    restart beside 4,096 other services (the attacker's own, registered once)."""
    monkeypatch.setattr(listing, "MAX_GONE_HOLDERS", 3)
    services = {name: [instance(name, f"{name}-1")] for name in ["Payments", "zz0", "zz1", "zz2", "zz3"]}
    running = start(tmp_path)
    render(running, services)
    content, _ = render(running, {**services, "payments": [instance("payments", "evil")]})
    assert "\nbackend Payments\n" in content and "backend payments" not in content
    (tmp_path / "haproxy.cfg").write_text(content)  # the live config
    restarted = start(tmp_path)
    assert restarted.renderer.render(Data({})).content is None  # no answer yet: no render, no name let go
    content, left_out = render(restarted, {**services, "payments": [instance("payments", "evil")]})
    assert "\nbackend Payments\n" in content and "backend payments" not in content, left_out


def test_a_restart_while_a_service_is_gone_leaves_its_name_held_against_a_case_variant(tmp_path: Path) -> None:
    """The review's case: `Payments` redeploying (out of the catalog), the renderer restarted, and
    the variant `payments` waiting beside took the backend for good; the live config no longer named
    `Payments`, so nothing told the new process who had the name."""
    victim = [instance("Payments", "p1")]
    running = start(tmp_path)
    assert "\nbackend Payments\n" in render(running, {"Payments": victim})[0]
    render(running, {})  # the redeploy: gone from the catalog
    restarted = start(tmp_path)
    content, left_out = render(restarted, {"payments": [instance("payments", "evil")]})
    assert "backend payments" not in content
    assert any("which 'Payments' had until" in item for item in left_out), left_out
    content, _ = render(restarted, {"Payments": victim, "payments": [instance("payments", "evil")]})
    assert "\nbackend Payments\n" in content and "backend payments" not in content


def test_a_restart_beside_an_instance_without_meta_keeps_a_tcp_service_listening(tmp_path: Path) -> None:
    """The review's case: `api` a TCP service on 15432; an instance without meta registered beside
    its owners (a disagreement: the last agreed port holds); after a restart nothing was agreed, and
    `api` became an HTTP backend, its listener gone."""
    tcp = {"haproxy_mode": "tcp", "haproxy_port": "15432"}
    owners = [entry("a0", 8080, **tcp), entry("a1", 8081, **tcp)]
    running = start(tmp_path)
    assert "\nlisten api\n" in render(running, {"api": owners})[0]
    assert "\nlisten api\n" in render(running, {"api": [*owners, entry("evil", 9000)]})[0]
    content, _ = render(start(tmp_path), {"api": [*owners, entry("evil", 9000)]})
    assert "\nlisten api\n" in content and "    bind 127.0.0.1:15432\n" in content


def test_what_is_read_back_is_checked_like_what_comes_from_consul(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    memory = RendererMemory.beside(tmp_path / "haproxy.cfg")
    now = time.time()
    memory.path.write_text(
        json.dumps(
            {
                "holders": {
                    "payments": ["Payments", "Payments", now - 60],  # held for 9 more minutes
                    "api": ["api", "api", None],  # in the catalog when the previous run stopped
                    "old": ["old", "old", now - NAME_HOLD_S - 1],  # its hold is over
                    "mallory": ["Payments", "Payments", None],  # not the identifier's own key
                    "later": ["later", "later", now + 86400],  # a clock stepped back: no longer than a hold
                    "odd": ["odd", "odd", "yesterday"],
                },
                "agreed": {
                    "api": {"port": "15432", "balance": "roundrobin\n    http-request deny"},
                    "db": {"mode": "tcp", "nonsense": "1", "maxconn": 7},
                    "bad": ["not", "a", "dict"],
                },
            }
        )
    )
    state = start(tmp_path)
    holders, agreed = state.renderer.remembered()
    assert set(holders) == {"payments", "api", "later"}
    assert holders["api"] == Holder("api", "api", None)
    later = holders["later"].gone_at
    assert later is not None and time.monotonic() - later == pytest.approx(0.0, abs=1.0)
    assert agreed == {"api": {"port": "15432"}, "db": {"mode": "tcp"}}
    memory.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        state = start(tmp_path)
    assert state.renderer.remembered() == ({}, {}) and "renderer memory at" in caplog.text


def test_the_memory_is_written_only_when_it_changed_and_never_in_dry_mode(tmp_path: Path) -> None:
    state = start(tmp_path)
    assert state.memory is not None
    render(state, {"api": [instance("api", "a1")]})
    written = state.memory.path.stat().st_mtime_ns
    time.sleep(0.01)
    render(state, {"api": [instance("api", "a1"), instance("api", "a2")]})  # an instance more: nothing remembered moved
    assert state.memory.path.stat().st_mtime_ns == written
    config = Config(templates=(TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "dry.cfg"),), vars=VARIABLES, dry=True)
    [dry] = compile_templates(config, {}, own=frozenset())
    assert dry.memory is None


def test_under_a_running_loop_the_memory_is_written_behind_it_at_most_once_a_gap_ending_on_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker's review (/tmp/rev22): the file was written whole in the render pass, 10-17 ms
    per render that changed a hold at 4,096 held names. Now the pass only hands the memory on: a
    thread writes it, at most once per WRITE_GAP_S, and the loop's way out (`flush`) writes the
    newest."""
    monkeypatch.setattr("renderer.loop.memory.WRITE_GAP_S", 2.0)  # the renders take ~0.1-0.3 s (a busy machine)
    state = start(tmp_path)
    assert state.memory is not None
    writes: list[str] = []
    real = memory_module.write_atomically
    monkeypatch.setattr(memory_module, "write_atomically", lambda path, text: writes.append(text) or real(path, text))

    async def churn() -> int:
        for n in range(20):  # a new service each render: a setting agreed for each
            render(state, {f"svc{i}": [instance(f"svc{i}", "a")] for i in range(n + 1)})
            assert len(writes) <= 1, "written in the render pass"
            await asyncio.sleep(0.005)
        during = len(writes)
        assert state.memory is not None
        await state.memory.flush()
        return during

    during = asyncio.run(churn())
    assert 1 <= during <= 2 and len(writes) <= 3, writes  # twenty renders within one gap
    agreed = json.loads(state.memory.path.read_text())["agreed"]
    assert "svc19" in agreed  # the newest
    restarted = start(tmp_path)
    assert "svc19" in restarted.renderer.remembered()[1]


def test_names_gone_are_held_at_most_max_gone_holders_the_oldest_let_go_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The review's churn: 100 new names a second kept 61,000 holds, and each listing cost 27 ms."""
    monkeypatch.setattr(listing, "MAX_GONE_HOLDERS", 3)
    holders: dict[str, Holder] = {}
    for at, name in enumerate(["a", "b", "c", "d", "e"]):
        listing.build_listing({name: []}, None, (), holders=holders, now=float(at))
    listing.build_listing({"e": []}, None, (), holders=holders, now=5.0)
    assert set(holders) == {"b", "c", "d", "e"} and holders["e"].gone_at is None  # three gone, the newest


class FailingDisk:
    """`write_atomically` on a disk that is full while `full`."""

    def __init__(self) -> None:
        self.full, self.real = True, memory_module.write_atomically

    def __call__(self, path: Path, text: str) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        self.real(path, text)


def test_a_write_failing_in_the_writers_thread_while_the_loop_keeps_the_memory_never_stops_the_renderer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker's review (/tmp/rev31): the writer's thread reset what the loop had kept when a
    write failed; the loop's `keep`, reading it in between, raised a TypeError out of the render
    pass and stopped the renderer. Here the thread's failed write lands at that moment (the clock
    `keep` reads runs it)."""
    monkeypatch.setattr(memory_module, "write_atomically", FailingDisk())
    memory = RendererMemory(tmp_path / ".h.memory.json")

    class Renderer:
        def __init__(self, n: int) -> None:
            self.n = n

        def remembered(self) -> tuple[dict[str, Holder], dict[str, dict[str, str]]]:
            return {"api": Holder("api", "api", None)}, {"api": {"haproxy_mode": ("http", "tcp")[self.n]}}

    class ThreadLandsHere:
        def time(self) -> float:
            memory._write_next()
            return time.time()

        def monotonic(self) -> float:
            return time.monotonic()

    async def two_renders() -> None:
        memory.keep(Renderer(0))  # handed on; the writer has not run yet
        monkeypatch.setattr(memory_module, "time", ThreadLandsHere())
        memory.keep(Renderer(1))
        monkeypatch.setattr(memory_module, "time", time)
        await memory.flush()

    asyncio.run(two_renders())


def test_a_memory_whose_write_failed_is_written_once_the_disk_recovers_without_a_render(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same review: a failed write dropped the memory until the next render that changed it; a
    quiet catalog after the disk recovered, then a restart, forgot a hold that had begun."""
    monkeypatch.setattr("renderer.loop.memory.WRITE_GAP_S", 0.02)
    disk = FailingDisk()
    monkeypatch.setattr(memory_module, "write_atomically", disk)
    state = start(tmp_path)
    assert state.memory is not None

    async def disk_full_a_moment() -> None:
        render(state, {"api": [instance("api", "a1")]})
        await asyncio.sleep(0.1)  # a write or more failed
        disk.full = False
        await asyncio.sleep(0.5)  # the writer's retry, further apart each time: 0.04, 0.08, 0.16, 0.32 s

    asyncio.run(disk_full_a_moment())
    assert "api" in json.loads(state.memory.path.read_text())["agreed"]


def test_a_retired_memory_whose_write_fails_gets_one_last_try_and_its_writer_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template removed by SIGHUP kept its memory's writer retrying a failing write every 30 s
    until the renderer exited (the last closing note's low item): retired, it tries once more."""
    monkeypatch.setattr("renderer.loop.memory.WRITE_GAP_S", 0.02)
    tries: list[str] = []
    disk = FailingDisk()
    monkeypatch.setattr(memory_module, "write_atomically", lambda path, text: tries.append(text) or disk(path, text))
    state = start(tmp_path)
    assert state.memory is not None
    memory = state.memory

    async def removed_while_failing() -> None:
        render(state, {"api": [instance("api", "a1")]})
        await asyncio.sleep(0.05)  # a write or more failed
        memory.retire()
        before = len(tries)
        await asyncio.sleep(0.5)  # not retired: 0.04, 0.08, 0.16 s on, three more tries at least
        assert len(tries) <= before + 1
        assert memory._writer is not None and memory._writer.done()

    asyncio.run(removed_while_failing())


def test_a_sighup_retires_the_memory_of_a_removed_template_and_carries_over_the_others(tmp_path: Path) -> None:
    """`Runner._reconfigure` with a new configuration that drops one of two templates: the kept one
    keeps its memory and where its next apply's changes start."""
    specs = [TemplateSpec(DEFAULT_TEMPLATE, tmp_path / name, haproxy=True) for name in ("kept.cfg", "removed.cfg")]
    started, reloaded = Config(templates=tuple(specs), vars=VARIABLES), Config(templates=(specs[0],), vars=VARIABLES)
    runner = Runner(started, reload_config=lambda: reloaded)
    runner._host = HostAddresses.start(read=frozenset)
    kept, removed = compile_templates(started, {}, own=frozenset())
    kept.covered = 41  # the Store's generation at its last render delivered: where its next apply's changes start
    runner._cycle = SimpleNamespace(templates=[kept, removed], config=started)  # type: ignore[assignment]
    runner._reconfigure(SimpleNamespace(reconfigure=lambda config: None))  # type: ignore[arg-type]
    [new] = runner._cycle.templates
    assert new.memory is kept.memory and kept.memory is not None and not kept.memory._retired
    assert new.covered == 41  # helper-127: a SIGHUP timed the next apply from any key's latest change
    assert removed.memory is not None and removed.memory._retired


def test_a_template_a_sighup_adds_keeps_the_services_and_the_reloads_the_running_ones_count(tmp_path: Path) -> None:
    """A review (/tmp/rev45): a template added by SIGHUP had a fresh record of the services that keep
    leaving the listings, apart from the running template's: one could keep a backend whose route
    the other had dropped, and its reloads did not count toward the storm."""
    specs = [TemplateSpec(DEFAULT_TEMPLATE, tmp_path / name, haproxy=True) for name in ("kept.cfg", "added.cfg")]
    started, reloaded = Config(templates=(specs[0],), vars=VARIABLES), Config(templates=tuple(specs), vars=VARIABLES)
    runner = Runner(started, reload_config=lambda: reloaded)
    runner._host = HostAddresses.start(read=frozenset)
    [kept] = compile_templates(started, {}, own=frozenset())
    runner._cycle = SimpleNamespace(templates=[kept], config=started)  # type: ignore[assignment]
    runner._reconfigure(SimpleNamespace(reconfigure=lambda config: None))  # type: ignore[arg-type]
    first, added = runner._cycle.templates
    presence = kept.renderer._listings.presence
    assert first.renderer._listings.presence is presence and added.renderer._listings.presence is presence
    assert added.renderer._flaps.changes is presence.changes and first.renderer._flaps.changes is presence.changes


def test_a_sighup_moving_the_agent_keeps_the_running_agents_port_reserved(tmp_path: Path) -> None:
    """helper-144 (/tmp/rev90, sighup_check.py): the client keeps the agent it started with, but the
    templates compiled at a SIGHUP reserved the new configuration's port only: the one still in use
    could be published again (helper-142's token path)."""
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg", haproxy=True)
    started = Config(templates=(spec,), vars=VARIABLES, consul=ConsulSettings(addr="127.0.0.1:18500"))
    moved = Config(templates=(spec,), vars=VARIABLES, consul=ConsulSettings(addr="127.0.0.1:18600"))
    runner = Runner(started, reload_config=lambda: moved)
    runner._host = HostAddresses.start(read=frozenset)
    runner._cycle = SimpleNamespace(templates=compile_templates(started, {}, own=frozenset()), config=started)  # type: ignore[assignment]
    runner._reconfigure(SimpleNamespace(reconfigure=lambda config: None))  # type: ignore[arg-type]
    [new] = runner._cycle.templates
    assert {18500, 18600} <= new.renderer.reserved_ports
