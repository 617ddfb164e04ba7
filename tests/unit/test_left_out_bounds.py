"""One registrant cannot flood the reports: what is left out is bounded where it is made and where
it reaches the log, the Consul check and /status.

An attacker's review (helper, /tmp/rev17): 400 instances of one service, each with its own valid
500-character `haproxy_check_path`, made the "instances disagree" note list all 400 values (200 KB).
It was logged whole at every change of one value (67 MB of log for 4,000 instances), pushed to Consul
whole (which keeps the first 4 KB of a check's output, so a second, really refused registration was
never named in the check), and parsed on the loop for each /status (1.2 s for 10 MB).

Real template, Store, delivery and Status; the HAProxy side is our fake seam."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from lab.stack import DEFAULT_TEMPLATE
from renderer.config import Config, TemplateSpec
from renderer.deliver.delivery import Delivery
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import VALUE_SHOWN_CHARS, TemplateRenderer, agreed_settings
from renderer.source.dependency import CatalogServices, HealthService
from renderer.source.store import Store
from renderer.status import Status
from renderer.status.served import LEFT_OUT_CHARS
from tests.unit.fakes import FakeApplier
from tests.unit.test_service_settings import VARIABLES, instance

CONSUL_CHECK_OUTPUT = 4096  # bytes of a check's output Consul keeps (`check_output_max_size`'s default)
PATH_CHARS = 500


def long_path(n: int) -> str:
    return f"/p{n:05d}" + "p" * (PATH_CHARS - 7)


def disagreeing(count: int) -> list[dict[str, Any]]:
    return [instance("aaa", f"a{n}", 8000 + n, haproxy_check_path=long_path(n)) for n in range(count)]


def test_a_disagreement_note_shows_a_few_values_cut_and_how_many_more() -> None:
    instances = HealthService("aaa").parse(disagreeing(400))
    _, _, notes = agreed_settings(instances, {})
    [note] = [n for n in notes if "disagree" in n]
    assert len(note) < 4 * (VALUE_SHOWN_CHARS + 30) + 250, len(note)
    assert "and 397 more" in note and "/p00000" in note and "/p00399" not in note
    assert f"({PATH_CHARS} characters)" in note


def test_the_check_still_names_a_refused_registration_beside_a_flood_of_disagreeing_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    config = Config(templates=(spec,))
    store, status = Store(), Status(templates=1)
    delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
    state = TemplateState(TemplateRenderer(spec, VARIABLES, environ={}))
    cycle = RenderCycle(config, [state], store, status, delivery, io.StringIO())
    evil = instance("web", "web-evil")
    evil["Service"]["Address"] = "not a host!"
    store.put(CatalogServices().key, CatalogServices().parse({"aaa": ["lb"], "web": ["lb"]}), 1)
    store.put(HealthService("aaa").key, HealthService("aaa").parse(disagreeing(400)), 2)
    store.put(HealthService("web").key, HealthService("web").parse([evil, instance("web", "web-1")]), 3)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO):
            done, _ = await cycle.run()
            await delivery.flush()
        assert done

    asyncio.run(scenario())
    state_of, output = status.check()
    assert state_of == "warning"
    assert len(output.encode()) <= CONSUL_CHECK_OUTPUT, len(output)
    assert "web-evil" in output and output.endswith("the rest is served"), output
    assert max(len(r.getMessage()) for r in caplog.records) < 2 * LEFT_OUT_CHARS
    items = [item for items in status.left_out.values() for item in items]
    assert len(items) == 2 and all(len(item) <= LEFT_OUT_CHARS + 30 for item in items), [len(i) for i in items]


def test_an_item_left_out_is_cut_before_the_log_and_the_status_see_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever made it (a note some later code forgets to bound), an item is cut to LEFT_OUT_CHARS."""
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    config, status = Config(templates=(spec,)), Status(templates=1)
    state = TemplateState(TemplateRenderer(spec, VARIABLES, environ={}))
    delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
    cycle = RenderCycle(config, [state], Store(), status, delivery, io.StringIO())
    huge = "service aaa, instance 'a1' on node 'n1', field Meta: " + "x" * 200_000
    with caplog.at_level(logging.INFO):
        cycle._note_left_out(state, (huge, "service web: short"))
        cycle._note_left_out(state, (huge, "service web: short"))  # the same items: no new line
    [cut, short] = status.left_out[str(spec.destination)]
    assert cut.startswith(huge[:LEFT_OUT_CHARS]) and cut.endswith(f"… ({len(huge)} characters)")
    assert short == "service web: short"
    assert len(caplog.records) == 2 and all(len(r.getMessage()) < 2 * LEFT_OUT_CHARS for r in caplog.records)


def test_a_certificate_note_is_cut_like_an_item_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A re-review (/tmp/rev18): a KV key of 200,000 characters under the certificates' prefix made a
    200,167-character note, logged, pushed to the check and shown by /status whole."""
    spec = TemplateSpec(DEFAULT_TEMPLATE, tmp_path / "haproxy.cfg", haproxy=True, check_command="true")
    config, status = Config(templates=(spec,)), Status(templates=1)
    delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
    cycle = RenderCycle(config, [], Store(), status, delivery, io.StringIO())
    key = "k" * 200_000
    with caplog.at_level(logging.WARNING):
        cycle._note_certificates({("refused", key): f"certificate key {key!r} refused: not a PEM bundle"})
    [note] = status.certificate_notes
    assert len(note) <= LEFT_OUT_CHARS + 30 and note.endswith("(200044 characters)"), note[-40:]
    assert all(len(r.getMessage()) < 2 * LEFT_OUT_CHARS for r in caplog.records)
