"""With `--certs`, no template is delivered before the certificates' KV prefix has answered: a
template may `bind … ssl crt-list` the list they fill, and HAProxy refuses an empty one. Before,
a template whose own keys answered first was delivered with the list still empty, and its check
failed (seen in the integration tests: `--once` exited on "no SSL certificate specified").

Real template, file, Store and certificate sync; the HAProxy side is our fake seam."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVKey, KVPrefix
from renderer.source.store import Store
from renderer.status import Status
from tests.unit.fakes import FakeApplier
from tests.unit.test_certs import bundle


def test_no_template_is_delivered_before_the_certificates_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        source, dest, certs = tmp_path / "main.j2", tmp_path / "haproxy.cfg", tmp_path / "certs"
        source.write_text('{{ key_or_default("line") }}\n')
        spec = TemplateSpec(source, dest, haproxy=True, check_command="true")
        config = Config(templates=(spec,), certs=f"haproxy/certs:{certs}")
        store, status = Store(), Status(templates=1)
        delivery = Delivery(config, status, None, lambda: 0.0, haproxy=FakeApplier())
        delivery.prepare_certificates()
        cycle = RenderCycle(
            config, [TemplateState(TemplateRenderer(spec, {}, environ={}))], store, status, delivery, io.StringIO()
        )
        store.put(KVKey("line").key, "bind :443 ssl crt-list", 1)
        done, dependencies = await cycle.run()
        prefix = KVPrefix("haproxy/certs").key
        assert not done and not dest.exists() and prefix in dependencies
        assert status.waiting_for == [prefix]
        assert KVKey("line").key in dependencies, "the template was rendered: its keys are asked meanwhile"
        value = base64.b64encode(bundle().encode()).decode()
        store.put(prefix, KVPrefix("haproxy/certs").parse([{"Key": "haproxy/certs/site.test", "Value": value}]), 2)
        done, _ = await cycle.run()
        await delivery.flush()
        assert done and dest.read_text() == "bind :443 ssl crt-list\n"
        assert (certs / "crt-list.txt").read_text() == f"{certs / 'site.test.pem'}\n"

    asyncio.run(scenario())
