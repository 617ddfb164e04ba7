"""A HAProxy file's membership change goes ahead of the plain files listed before it; anything
HAProxy would read those files for (a reload, a server naming a file) still comes after them, and
a template before it that is applied itself (a command, another HAProxy file) keeps the order.

Real templates, files and Store; the HAProxy side is our fake seam, which notes what the watched
files held at each Runtime API call and each reload."""

from __future__ import annotations

import asyncio
import io
import time
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
LINES = ("line1", "line2")  # KV keys, one line of a backend each (a value holds no newline)
Seen = list[tuple[str, tuple[str, ...]]]
SLOW_S = 0.6


class Recorder(FakeApplier):
    """Notes, at each runtime apply and each reload, what the watched files held."""

    def __init__(self, watched: list[Path], runtime_fails: bool = False) -> None:
        super().__init__(runtime_fails)
        self.watched = watched
        self.seen: Seen = []

    def _note(self, kind: str) -> None:
        self.seen.append((kind, tuple(p.read_text() if p.exists() else "" for p in self.watched)))

    def apply_runtime(self, plan: list[ServerChange]) -> ApplyOutcome:
        self._note("runtime")
        return super().apply_runtime(plan)

    def apply(self, spec: TemplateSpec) -> ApplyOutcome:
        if not spec.haproxy:  # as the real one: a plain file has nothing to apply
            return ApplyOutcome(ApplyKind.NONE, 0.0)
        self._note("reload")
        return super().apply(spec)


def backend(prefix: str, default_server: str = "") -> str:
    """A backend of the lines under KV keys `{prefix}line1`, `{prefix}line2`."""
    keys = repr([prefix + key for key in LINES])
    fixed = f"    default-server {default_server}\n" if default_server else ""
    return (
        f"backend {prefix or 'web'}\n{fixed}{{% for k in {keys} %}}{{% set v = key_or_default(k) %}}"
        "{% if v %}    {{ v }}\n{% endif %}{% endfor %}"
    )


class Loop:
    """Templates in order, from KV: `map` (a plain file, `{{ key("map") }}`) and HAProxy files named
    by their KV prefix; the real cycle renders and delivers them."""

    def __init__(
        self,
        tmp_path: Path,
        order: tuple[str, ...] = ("map", ""),
        runtime_fails: bool = False,
        map_command: str | None = None,
        map_check: str | None = None,
        default_server: str = "",
        slow_check: str | None = None,
    ) -> None:
        """`slow_check`: the HAProxy file (by prefix) whose check takes SLOW_S; the others' pass at once."""
        specs = []
        for name in order:
            source = tmp_path / f"{name or 'main'}.j2"
            if name == "map":
                source.write_text('{{ key("map") }}\n')
                map_file = tmp_path / "routes.map"
                specs.append(TemplateSpec(source, map_file, command=map_command, check_command=map_check))
            else:
                source.write_text(backend(name, default_server))
                dest = tmp_path / f"haproxy{name}.cfg"
                check = f"sh -c 'sleep {SLOW_S}' {{path}}" if name == slow_check else "true"
                specs.append(TemplateSpec(source, dest, haproxy=True, check_command=check))
        self.files = [spec.destination for spec in specs]
        config = Config(templates=tuple(specs))
        self.haproxy = Recorder(self.files, runtime_fails)
        self.store, self.status = Store(), Status(templates=len(specs))
        self.delivery = Delivery(config, self.status, None, lambda _: 0.0, haproxy=self.haproxy)
        templates = [TemplateState(TemplateRenderer(spec, {}, environ={})) for spec in specs]
        self.cycle = RenderCycle(config, templates, self.store, self.status, self.delivery, io.StringIO())
        self.index = 0
        for name in order:  # every key answered, absent until a change puts it
            for key in ("map",) if name == "map" else LINES:
                self.put(key if name == "map" else name + key, None)

    def put(self, key: str, value: str | None) -> None:
        self.index += 1
        self.store.put(KVKey(key).key, value, self.index)

    async def change(self, map_line: str | None, *lines: str, prefix: str = "", flush: bool = True) -> Seen:
        """Put the map's line (unless None) and a backend's lines, run one pass of the loop (and,
        with `flush`, wait for the file written behind); what the HAProxy side saw."""
        if map_line is not None:
            self.put("map", map_line)
        for key, line in zip(LINES, (*lines, None, None), strict=False):
            self.put(prefix + key, line)
        self.haproxy.seen.clear()
        done, _ = await self.cycle.run()
        assert done
        if flush:
            await self.delivery.flush()
        return list(self.haproxy.seen)


def test_a_membership_change_goes_out_before_the_files_listed_before_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path)
        assert await loop.change("web web", A) == [("reload", ("web web\n", f"backend web\n    {A}\n"))]
        renders, applies = loop.status.renders, dict(loop.status.applies)
        seen = await loop.change("web web2", A, B)
        assert seen == [("runtime", ("web web\n", f"backend web\n    {A}\n"))]  # ahead of the map
        assert loop.files[0].read_text() == "web web2\n", "the map is still delivered, after"
        assert loop.files[1].read_text() == f"backend web\n    {A}\n    {B}\n"
        assert loop.status.renders == renders + 2, "each template's render counted once"
        assert loop.status.applies[ApplyKind.RUNTIME] == applies.get(ApplyKind.RUNTIME, 0) + 1

    asyncio.run(scenario())


def test_a_change_that_needs_a_reload_comes_after_the_files_before_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path)
        await loop.change("web web", A)
        renders = loop.status.renders
        seen = await loop.change("web web2", "balance first", A)
        assert [(kind, files[0]) for kind, files in seen] == [("reload", "web web2\n")]
        assert loop.status.renders == renders + 2, "rendered ahead, delivered in its turn: one render each"

    asyncio.run(scenario())


def test_a_server_naming_a_file_is_added_after_the_files_before_it(tmp_path: Path) -> None:
    """A CA another template may be writing: HAProxy reads it when it adds the server."""

    async def scenario() -> None:
        loop = Loop(tmp_path)
        await loop.change("web web", A)
        added = f"server c 10.0.0.3:443 ssl verify required ca-file {tmp_path}/ca.pem"
        seen = await loop.change("web web2", A, added)
        assert [(kind, files[0]) for kind, files in seen] == [("runtime", "web web2\n")]

    asyncio.run(scenario())


def test_a_server_given_a_file_by_default_server_is_added_after_the_files_before_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path, default_server=f"ssl verify required ca-file {tmp_path}/ca.pem")
        await loop.change("web web", A)
        seen = await loop.change("web web2", A, B)
        assert [(kind, files[0]) for kind, files in seen] == [("runtime", "web web2\n")]

    asyncio.run(scenario())


def test_a_refused_runtime_step_ahead_is_reloaded_in_its_turn_after_the_files_before_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path, runtime_fails=True)
        await loop.change("web web", A)
        seen = await loop.change("web web2", A, B)
        assert [(kind, files[0]) for kind, files in seen] == [("runtime", "web web\n"), ("reload", "web web2\n")]
        assert loop.files[1].read_text() == f"backend web\n    {A}\n    {B}\n"

    asyncio.run(scenario())


def test_after_a_template_with_a_command_the_declared_order_holds(tmp_path: Path) -> None:
    """Its command may reload HAProxy, which would read the file being written behind."""

    async def scenario() -> None:
        loop = Loop(tmp_path, map_command="true")
        await loop.change("web web", A)
        seen = await loop.change("web web2", A, B)
        assert [(kind, files[0]) for kind, files in seen] == [("runtime", "web web2\n")]

    asyncio.run(scenario())


def test_after_another_haproxy_file_the_declared_order_holds(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path, order=("map", "one", "two"))
        await loop.change("web web", A, prefix="one")
        await loop.change(None, A, prefix="two")
        seen = await loop.change("web web2", A, B, prefix="two")
        assert [(kind, files[0]) for kind, files in seen] == [("runtime", "web web2\n")]

    asyncio.run(scenario())


def test_a_reload_waits_for_another_file_still_written_behind(tmp_path: Path) -> None:
    """Else HAProxy would reload that file's old version and drop the servers sent at runtime."""

    async def scenario() -> None:
        loop = Loop(tmp_path, order=("one", "two"), slow_check="two")
        await loop.change(None, A, prefix="one")
        await loop.change(None, A, prefix="two")
        assert await loop.change(None, A, B, prefix="two", flush=False) == [("runtime", loop.haproxy.seen[0][1])]
        seen = await loop.change(None, "balance first", A, prefix="one")  # structural: a reload
        assert seen == [("reload", (f"backend one\n    balance first\n    {A}\n", f"backend two\n    {A}\n    {B}\n"))]

    asyncio.run(scenario())


def test_an_unchanged_haproxy_file_applies_nothing_and_the_map_is_still_written(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = Loop(tmp_path)
        await loop.change("web web", A)
        assert await loop.change("web web2", A) == []
        assert loop.files[0].read_text() == "web web2\n"

    asyncio.run(scenario())


def test_a_render_declined_ahead_is_rendered_again_in_its_turn_when_data_came_meanwhile(tmp_path: Path) -> None:
    """The map's delivery takes a while (a slow check); data that arrives meanwhile is in the
    reload, as when the HAProxy file was rendered only in its turn."""

    async def scenario() -> None:
        loop = Loop(tmp_path, map_check="sh -c 'sleep 0.3' {path}")
        await loop.change("web web", A)

        async def later() -> None:
            await asyncio.sleep(0.1)
            loop.put("line2", B)

        arrives = asyncio.create_task(later())
        seen = await loop.change("web web2", "balance first", A)  # structural: declined ahead
        await arrives
        assert seen == [("reload", ("web web2\n", f"backend web\n    balance first\n    {B}\n"))]

    asyncio.run(scenario())


def test_a_plain_file_is_written_without_waiting_for_a_file_written_behind(tmp_path: Path) -> None:
    """Only what may reload HAProxy waits for it; the routing map has nothing to apply."""

    async def scenario() -> None:
        loop = Loop(tmp_path, slow_check="")
        await loop.change("web web", A)
        await loop.change("web web", A, B, flush=False)  # its file is checked behind it for SLOW_S
        started = time.monotonic()
        await loop.change("web web2", A, B, flush=False)
        assert time.monotonic() - started < SLOW_S / 2, "the map's delivery waited for the check"
        assert loop.files[0].read_text() == "web web2\n"
        await loop.delivery.flush()

    asyncio.run(scenario())


def test_a_key_consul_refuses_is_reported_with_the_template_and_cleared_by_an_answer(tmp_path: Path) -> None:
    """A key served empty because Consul refuses it (a redirect, a 400 for its name) was said in one
    log line at the watcher, and nowhere the operator looks: now the templates that read it list it
    as left out, with why, until Consul answers it."""

    async def scenario() -> None:
        loop = Loop(tmp_path, order=("",))
        loop.put("line1", A)
        loop.store.refuse(KVKey("line2").key, None, "Consul redirects its path (301)")
        assert (await loop.cycle.run())[0]
        assert loop.files[0].read_text() == f"backend web\n    {A}\n", "the rest is served"
        (left,) = loop.status.left_out[str(loop.files[0])]
        assert left.startswith(f"Consul key {KVKey('line2').key!r}: ") and "redirects its path (301)" in left
        assert "left out" in loop.status.check()[1]
        loop.put("line2", B)
        await loop.change(None, A, B)
        assert loop.status.left_out[str(loop.files[0])] == ()

    asyncio.run(scenario())
