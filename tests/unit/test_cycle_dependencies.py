"""What a pass of the loop asks the watcher to follow: a render that fails midway read less, and
nothing it did not reach is dropped for it (an attacker's re-review, /tmp/rev20: each key dropped
and wanted again costs Consul a fresh read, and over HTTP/1.1 it held its template for a wait).

Real template, Store and delivery; the HAProxy side is our fake seam."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVKey
from renderer.source.store import Store
from renderer.status import Status
from tests.unit.fakes import FakeApplier


def test_a_render_that_fails_midway_drops_none_of_the_keys_the_last_render_read(tmp_path: Path) -> None:
    source, dest = tmp_path / "main.j2", tmp_path / "out.cfg"
    source.write_text('{{ key("a") }}\n{{ 1 // (key("b") | int) }}\n{{ key("c") }}\n')
    spec = TemplateSpec(source, dest, check_command="true")
    config = Config(templates=(spec,))
    store, status = Store(), Status(templates=1)
    delivery = Delivery(config, status, None, lambda: 0.0, haproxy=FakeApplier())
    cycle = RenderCycle(
        config, [TemplateState(TemplateRenderer(spec, {}, environ={}))], store, status, delivery, io.StringIO()
    )
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
