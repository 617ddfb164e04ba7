"""A HAProxy file's membership change goes ahead of the files listed before it; anything HAProxy
would read those files for (a reload, a server naming a file) still comes after them.

Real templates, files and Store; the HAProxy side is our fake seam, which notes what the file
before it (the routing map) held at each Runtime API call and each reload."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import ApplyOutcome
from renderer.deliver.delivery import Delivery
from renderer.deliver.runtime import ServerChange
from renderer.errors import ApplyKind
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVKey
from renderer.source.store import Store
from renderer.status import Status
from tests.unit.fakes import FakeApplier

A = "server a 10.0.0.1:80"
B = "server b 10.0.0.2:80"
LINES = ("line1", "line2")  # KV keys, one line of the backend each (a value holds no newline)


class MapWatcher(FakeApplier):
    """Notes, at each runtime apply and each reload, what the map file held."""

    def __init__(self, map_file: Path, runtime_fails: bool = False) -> None:
        super().__init__(runtime_fails)
        self.map_file = map_file
        self.seen: list[tuple[str, str]] = []

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        self.seen.append(("runtime", self.map_file.read_text()))
        return super().apply_runtime(plan)

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        if not spec.haproxy:  # as the real one: a plain file has nothing to apply
            return ApplyOutcome(ApplyKind.NONE, 0.0)
        self.seen.append(("reload", self.map_file.read_text()))
        return super().apply(spec)


class Loop:
    """A routing map listed before haproxy.cfg, both from KV, rendered by the real cycle."""

    def __init__(self, tmp_path: Path, runtime_fails: bool = False) -> None:
        (tmp_path / "routes.map.j2").write_text('{{ key("map") }}\n')
        (tmp_path / "haproxy.cfg.j2").write_text(
            "backend web\n{% for k in " + repr(list(LINES)) + " %}{% set v = key_or_default(k) %}"
            "{% if v %}    {{ v }}\n{% endif %}{% endfor %}"
        )
        self.map_file, self.cfg_file = tmp_path / "routes.map", tmp_path / "haproxy.cfg"
        specs = (
            TemplateSpec(tmp_path / "routes.map.j2", self.map_file),
            TemplateSpec(tmp_path / "haproxy.cfg.j2", self.cfg_file, haproxy=True, check_command="true"),
        )
        config = Config(templates=specs)
        self.haproxy = MapWatcher(self.map_file, runtime_fails)
        self.store, self.status = Store(), Status(templates=2)
        self.delivery = Delivery(config, self.status, None, lambda: 0.0, haproxy=self.haproxy)
        templates = [TemplateState(TemplateRenderer(spec, {}, environ={})) for spec in specs]
        self.cycle = RenderCycle(config, templates, self.store, self.status, self.delivery, io.StringIO())
        self.index = 0

    def change(self, map_line: str, *lines: str) -> list[tuple[str, str]]:
        """Put the map's line and the backend's lines, run one pass of the loop (and the file
        written behind), return what the HAProxy side saw."""
        self.index += 1
        self.store.put(KVKey("map").key, map_line, self.index)
        for key, line in zip(LINES, (*lines, None, None), strict=False):
            self.store.put(KVKey(key).key, line, self.index)
        self.haproxy.seen.clear()

        async def run() -> bool:
            done, _ = await self.cycle.run()
            await self.delivery.flush()
            return done

        assert asyncio.run(run())
        return list(self.haproxy.seen)


def test_a_membership_change_goes_out_before_the_files_listed_before_it(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    assert loop.change("web web", A) == [("reload", "web web\n")]  # the first file: in order
    assert loop.change("web web2", A, B) == [("runtime", "web web\n")]  # ahead of the map
    assert loop.map_file.read_text() == "web web2\n", "the map is still delivered, after"
    assert loop.cfg_file.read_text() == f"backend web\n    {A}\n    {B}\n"


def test_a_change_that_needs_a_reload_comes_after_the_files_before_it(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    loop.change("web web", A)
    renders = loop.status.renders
    assert loop.change("web web2", "balance first", A) == [("reload", "web web2\n")]
    assert loop.status.renders == renders + 2, "rendered ahead, delivered in its turn: one render each"


def test_a_server_naming_a_file_is_added_after_the_files_before_it(tmp_path: Path) -> None:
    """A CA another template may be writing: HAProxy reads it when it adds the server."""
    loop = Loop(tmp_path)
    loop.change("web web", A)
    added = f"server c 10.0.0.3:443 ssl verify required ca-file {tmp_path}/ca.pem"
    assert loop.change("web web2", A, added) == [("runtime", "web web2\n")]


def test_a_refused_runtime_step_ahead_is_reloaded_in_its_turn_after_the_files_before_it(tmp_path: Path) -> None:
    loop = Loop(tmp_path, runtime_fails=True)
    loop.change("web web", A)
    assert loop.change("web web2", A, B) == [("runtime", "web web\n"), ("reload", "web web2\n")]
    assert loop.cfg_file.read_text() == f"backend web\n    {A}\n    {B}\n"


def test_an_unchanged_haproxy_file_ahead_leaves_the_other_files_to_their_turn(tmp_path: Path) -> None:
    loop = Loop(tmp_path)
    loop.change("web web", A)
    assert loop.change("web web2", A) == []
    assert loop.map_file.read_text() == "web web2\n"
