"""What a pass of the loop asks the watcher to follow: a render that fails midway read less, and
nothing it did not reach is dropped for it (an attacker's re-review, /tmp/rev20: each key dropped
and wanted again costs Consul a fresh read, and over HTTP/1.1 it held its template for a wait).

Real template, Store and delivery; the HAProxy side is our fake seam."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVKey
from renderer.source.store import Store
from renderer.status import Status
from tests.unit.fakes import FakeApplier


def one_template(tmp_path: Path, text: str) -> tuple[Store, RenderCycle]:
    """A Store and a loop's pass over one template (`text`, rendered to `out.cfg`)."""
    source = tmp_path / "main.j2"
    source.write_text(text)
    spec = TemplateSpec(source, tmp_path / "out.cfg", check_command="true")
    config = Config(templates=(spec,))
    store, status = Store(), Status(templates=1)
    delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
    cycle = RenderCycle(
        config, [TemplateState(TemplateRenderer(spec, {}, environ={}))], store, status, delivery, io.StringIO()
    )
    return store, cycle


def test_a_render_that_fails_midway_drops_none_of_the_keys_the_last_render_read(tmp_path: Path) -> None:
    dest = tmp_path / "out.cfg"
    store, cycle = one_template(tmp_path, '{{ key("a") }}\n{{ 1 // (key("b") | int) }}\n{{ key("c") }}\n')
    keys = {name: KVKey(name).key for name in "abc"}

    async def scenario() -> tuple[set[str], set[str], set[str]]:
        for name, value in (("a", "x"), ("b", "1"), ("c", "y")):
            store.put(keys[name], value, 1)
        done, whole = await cycle.run()
        assert done and dest.read_text() == "x\n1\ny\n"
        store.put(keys["b"], "0", 2)  # the render fails at b: c is not reached
        done, failed = await cycle.run()
        assert not done and dest.read_text() == "x\n1\ny\n"
        store.put(keys["b"], "1", 3)
        done, again = await cycle.run()
        assert done
        return set(whole), set(failed), set(again)

    whole, failed, again = asyncio.run(scenario())
    assert whole == failed == again == set(keys.values())


def test_renders_failing_one_after_another_follow_the_last_whole_renders_keys_and_their_own_only(
    tmp_path: Path,
) -> None:
    """Each failed render's keys were added to the last ones: renders failing at another key each
    time (a name from the catalog, say) made the watched set grow without end (the last note's item)."""
    store, cycle = one_template(tmp_path, '{{ key("a") }}\n{{ 1 // (key(key("a")) | int) }}\n')

    async def scenario() -> list[set[str]]:
        store.put(KVKey("a").key, "k0", 1)
        store.put(KVKey("k0").key, "1", 1)
        watched = [set((await cycle.run())[1])]
        for n in range(1, 5):  # each render fails at another key
            store.put(KVKey("a").key, f"k{n}", n + 1)
            store.put(KVKey(f"k{n}").key, "0", n + 1)
            done, failed = await cycle.run()
            assert not done
            watched.append(set(failed))
        return watched

    watched = asyncio.run(scenario())
    whole = {KVKey("a").key, KVKey("k0").key}
    assert watched[0] == whole
    assert watched[-1] == whole | {KVKey("k4").key}, watched[-1]


def test_a_render_waiting_for_a_key_drops_none_of_the_keys_the_last_whole_render_read(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev31): a render waiting for a key the catalog names (not fetched
    yet), which trips on its placeholder midway, was taken for a whole render: it watched only the
    keys before the trip, and every failing render after it did too, the rest dropped (read again
    from Consul when wanted)."""
    store, cycle = one_template(tmp_path, '{{ key("a") }}\n{{ 1 // (key(key("a")) | int) }}\n{{ key("c") }}\n')
    a, c = KVKey("a").key, KVKey("c").key

    async def scenario() -> list[set[str]]:
        store.put(a, "k0", 1)
        store.put(KVKey("k0").key, "1", 1)
        store.put(c, "x", 1)
        watched = [set((await cycle.run())[1])]
        store.put(a, "k1", 2)  # names a key not fetched yet: the render waits, tripping on its placeholder
        watched.append(set((await cycle.run())[1]))
        store.put(KVKey("k1").key, "0", 3)  # its data: the render fails midway
        watched.append(set((await cycle.run())[1]))
        return watched

    whole, waiting, failed = asyncio.run(scenario())
    assert whole == {a, KVKey("k0").key, c}
    assert waiting == failed == whole | {KVKey("k1").key}, (waiting, failed)


def test_the_templates_of_one_pass_render_at_one_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A change served by two templates is one reload; each rendering at its own time counted it
    twice toward a storm (an attacker's review, /tmp/rev46). A pass renders every template at its
    own clock's time, a later pass at a later one."""
    seen: list[float | None] = []
    real = TemplateRenderer.render

    def render(self: TemplateRenderer, source: Any, now: float | None = None) -> Any:
        seen.append(now)
        return real(self, source, now)

    monkeypatch.setattr(TemplateRenderer, "render", render)
    specs = []
    for name in ("a", "b"):
        (tmp_path / f"{name}.j2").write_text('{{ key("k") }}\n')
        specs.append(TemplateSpec(tmp_path / f"{name}.j2", tmp_path / f"{name}.cfg", check_command="true"))
    config = Config(templates=tuple(specs))
    store, status = Store(), Status(templates=2)
    delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
    states = [TemplateState(TemplateRenderer(spec, {}, environ={})) for spec in specs]
    cycle = RenderCycle(config, states, store, status, delivery, io.StringIO())
    store.put(KVKey("k").key, "x", 1)
    assert asyncio.run(cycle.run())[0]
    store.put(KVKey("k").key, "y", 2)
    assert asyncio.run(cycle.run())[0]
    assert len(seen) == 4 and seen[0] == seen[1] is not None and seen[2] == seen[3] is not None and seen[2] > seen[0]
