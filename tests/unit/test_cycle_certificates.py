"""With `--certs`, no template is delivered before the certificates' KV prefix has answered: a
template may `bind … ssl crt-list` the list they fill, and HAProxy refuses an empty one. Before,
a template whose own keys answered first was delivered with the list still empty, and its check
failed (seen in the integration tests: `--once` exited on "no SSL certificate specified").

Real template, file, Store and certificate sync; the HAProxy side is our fake seam."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import ApplyOutcome
from renderer.deliver.delivery import Delivery
from renderer.errors import ApplyKind
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KeyPair, KVKey, KVPrefix
from renderer.source.store import Store
from renderer.status import Status
from tests.unit.fakes import FakeApplier
from tests.unit.test_certs import NOW, FakeRuntime, OpenTransactionRuntime, bundle


def test_no_template_is_delivered_before_the_certificates_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        source, dest, certs = tmp_path / "main.j2", tmp_path / "haproxy.cfg", tmp_path / "certs"
        source.write_text('{{ key_or_default("line") }}\n')
        spec = TemplateSpec(source, dest, haproxy=True, check_command="true")
        config = Config(templates=(spec,), certs=f"haproxy/certs:{certs}")
        store, status = Store(), Status(templates=1)
        delivery = Delivery(config, status, None, lambda _: 0.0, haproxy=FakeApplier())
        delivery.prepare_certificates()
        cycle = RenderCycle(
            config, [TemplateState(TemplateRenderer(spec, {}, environ={}))], store, status, delivery, io.StringIO()
        )
        store.put(KVKey("line").key, "bind :443 ssl crt-list", 1)
        done, dependencies = await cycle.run()
        prefix = KVPrefix("haproxy/certs/").key
        assert not done and not dest.exists() and prefix in dependencies
        assert status.waiting_for == [prefix]
        assert KVKey("line").key in dependencies, "the template was rendered: its keys are asked meanwhile"
        value = base64.b64encode(bundle().encode()).decode()
        store.put(prefix, KVPrefix("haproxy/certs/").parse([{"Key": "haproxy/certs/site.test", "Value": value}]), 2)
        done, _ = await cycle.run()
        await delivery.flush()
        assert done and dest.read_text() == "bind :443 ssl crt-list\n"
        assert (certs / "crt-list.txt").read_text() == f"{certs / 'site.test.pem'}\n"

    asyncio.run(scenario())


class ReloadingApplier(FakeApplier):
    """A HAProxy side with a Runtime API (`api`) and, with `master`, a reload (counted)."""

    def __init__(self, api: object, master: bool) -> None:
        super().__init__()
        self.runtime = SimpleNamespace(api=api)  # type: ignore[assignment]
        self.master = master
        self.reloads = 0

    def reload_running(self) -> ApplyOutcome | None:
        if not self.master:
            return None
        self.reloads += 1
        return ApplyOutcome(ApplyKind.RELOAD, 0.0)


@pytest.mark.parametrize("master", [False, True])
def test_certificates_haproxy_did_not_take_are_reported_and_offered_again_later(
    tmp_path: Path, master: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy's state is unknown (a transaction of another's open) and no reload settled it (none
    without a master socket; or the transaction is still open after it): the certificates are
    reported and offered again on a timer of their own, later each time, and a pass before the
    timer reloads nothing (it reloaded at every pass before, /tmp/rev25). Before, without a master
    the log said "reloaded", nothing was reported, and the next offer waited for an unrelated change."""
    monkeypatch.setattr("renderer.deliver.delivery.CERTIFICATES_FIRST_RETRY_S", 0.1)

    async def scenario() -> None:
        dest, certs = tmp_path / "haproxy.cfg", tmp_path / "certs"
        dest.write_text("running\n")  # HAProxy runs our file: certificates go through its Runtime API
        spec = TemplateSpec(tmp_path / "main.j2", dest, haproxy=True, check_command="true")
        config = Config(templates=(spec,), certs=f"haproxy/certs:{certs}")
        applier = ReloadingApplier(OpenTransactionRuntime(str(certs / "other.pem")), master)
        delivery = Delivery(config, Status(templates=1), None, lambda _: 0.0, haproxy=applier)
        delivery.prepare_certificates()
        pairs = (KeyPair("site.test", bundle()),)
        await delivery.sync_certificates(pairs)
        assert applier.reloads == (1 if master else 0)
        assert not (certs / "site.test.pem").exists()
        (note,) = delivery.certificate_notes().values()
        assert note.startswith("certificates not taken") and ("was reloaded" if master else "was not reloaded") in note
        first = delivery.next_retry()
        assert first is not None and 0.05 < first - time.monotonic() <= 0.1
        await delivery.sync_certificates(pairs)  # a pass before the timer: offered, no reload
        assert applier.reloads == (1 if master else 0) and delivery.next_retry() == first
        assert delivery.certificate_notes() == {("pending", ""): note}
        await asyncio.sleep(first - time.monotonic() + 0.001)
        await delivery.sync_certificates(pairs)  # the timer's offer: HAProxy's state still unknown
        assert applier.reloads == (2 if master else 0)
        second = delivery.next_retry()
        assert second is not None and 0.15 < second - time.monotonic() <= 0.2  # later each time
        applier.runtime.api = FakeRuntime()  # the transaction ended
        await delivery.sync_certificates(pairs)
        assert (certs / "site.test.pem").exists() and delivery.certificate_notes() == {}
        assert delivery.next_retry() is None

    asyncio.run(scenario())


async def default_going(
    tmp_path: Path, running: str, master: bool
) -> tuple[TemplateSpec, ReloadingApplier, Delivery, str]:
    """A delivery serving certificates `a` (the list's first: HAProxy's default) and `b`, HAProxy now
    refusing to unlist the default one; `running`: the HAProxy file. Returns `b`'s bundle too."""
    from tests.unit.test_certs import DefaultRefusingRuntime

    dest, certs = tmp_path / "haproxy.cfg", tmp_path / "certs"
    dest.write_text(running)
    spec = TemplateSpec(tmp_path / "main.j2", dest, haproxy=True, check_command="true")
    config = Config(templates=(spec,), certs=f"haproxy/certs:{certs}")
    applier = ReloadingApplier(FakeRuntime(), master=master)
    delivery = Delivery(config, Status(templates=1), None, lambda _: 0.0, haproxy=applier)
    delivery.prepare_certificates()
    second = bundle("b.test")
    await delivery.sync_certificates((KeyPair("a", bundle("a.test")), KeyPair("b", second)))
    applier.runtime.api = DefaultRefusingRuntime()
    return spec, applier, delivery, second


def test_the_default_certificate_removed_reloads_haproxy_until_a_reload_went_through(tmp_path: Path) -> None:
    """A review: the default certificate, unlisted, was dropped before any reload; when the reload
    failed (or there was no master socket) nothing said so and nothing tried again, and HAProxy went
    on serving the certificate deleted from KV. `reload_needed` now holds until a reload went through."""

    async def scenario() -> None:
        _, applier, delivery, second = await default_going(tmp_path, "running\n", master=False)
        await delivery.sync_certificates((KeyPair("b", second),))  # `a` deleted: no reload possible yet
        (note,) = delivery.certificate_notes().values()
        assert "was HAProxy's default one" in note and "was not reloaded" in note
        assert delivery.next_retry() is not None
        applier.master = True
        await delivery.sync_certificates((KeyPair("b", second),))  # another render pass, within the backoff
        assert applier.reloads == 0, "a reload at every render pass"
        delivery._certificates_pending.again_at = time.monotonic()  # the timer's offer is due
        await delivery.sync_certificates((KeyPair("b", second),))  # reloaded now
        assert applier.reloads == 1 and delivery.certificate_notes() == {} and delivery.next_retry() is None
        await delivery.sync_certificates((KeyPair("b", second),))
        assert applier.reloads == 1  # once

    asyncio.run(scenario())


def test_a_reload_for_the_certificates_yields_to_the_reload_gap_and_to_a_template_waiting_for_it(
    tmp_path: Path,
) -> None:
    """A review (/tmp/rev24): a reload for the certificates (a large one rotated, the default one
    deleted) ran first in each pass, took each gap's end and slept through a gap in the delivery's
    thread, and a template's change waiting for the gap never went. It waits for the gap's end (a
    retry then), yields to a template's change waiting, and that template's reload, which reads the
    certificate files too, settles it."""

    async def scenario() -> None:
        spec, applier, delivery, second = await default_going(tmp_path, "backend shop\n    balance roundrobin\n", True)
        applier.wait = 0.05  # a reload a moment ago: the gap runs
        await delivery.sync_certificates((KeyPair("b", second),))  # `a` deleted: HAProxy drops it at a reload
        due = delivery.next_retry()
        assert applier.reloads == 0 and due is not None and due - time.monotonic() <= 0.05
        waiting = await delivery.deliver(spec, "backend shop\n    balance leastconn\n")
        await asyncio.sleep(0.06)
        applier.wait = 0.0  # the gap's end (the certificates' retry due): the template waiting goes first
        await delivery.sync_certificates((KeyPair("b", second),))
        assert applier.reloads == 0, "the certificates took the gap's end"
        reloaded = await delivery.deliver(spec, "backend shop\n    balance leastconn\n")
        await delivery.sync_certificates((KeyPair("b", second),))
        assert (waiting.outcome.value, reloaded.kind, applier.reloads) == ("waiting", ApplyKind.RELOAD, 0)
        assert applier.calls == ["reload"] and delivery.certificate_notes() == {}

    asyncio.run(scenario())


def test_a_reload_for_the_certificates_yielding_to_a_waiting_template_does_not_keep_the_loop_awake(
    tmp_path: Path,
) -> None:
    """Yielding to a template's change that waits for a later gap (another reload took this one),
    the certificates' retry stayed at a time already past: the loop passed again at once, again and
    again, until that gap's end (a self-review of 238de11)."""

    async def scenario() -> None:
        spec, applier, delivery, second = await default_going(tmp_path, "backend shop\n    balance roundrobin\n", True)
        applier.wait = 0.05
        await delivery.sync_certificates((KeyPair("b", second),))  # the gap runs: offered again at its end
        await asyncio.sleep(0.06)
        applier.wait = 0.5  # another reload took that gap's end: the template's change waits for the next
        assert (await delivery.deliver(spec, "backend shop\n    balance leastconn\n")).outcome.value == "waiting"
        await delivery.sync_certificates((KeyPair("b", second),))  # its retry: it yields to the template
        due = delivery.next_retry()
        assert applier.reloads == 0 and due is not None and due > time.monotonic() + 0.3

    asyncio.run(scenario())


def test_delivery_wakes_the_loop_when_a_renewal_refused_as_not_valid_yet_becomes_valid(tmp_path: Path) -> None:
    """An attacker's review (/tmp/rev39): a renewal dated a moment ahead waited for the next write
    under the prefix. The moment it becomes valid is one of delivery's timers now, and the pass it
    wakes takes the renewal with the same KV answer."""

    async def scenario() -> None:
        dest, certs = tmp_path / "haproxy.cfg", tmp_path / "certs"
        dest.write_text("running\n")
        spec = TemplateSpec(tmp_path / "main.j2", dest, haproxy=True, check_command="true")
        config = Config(templates=(spec,), certs=f"haproxy/certs:{certs}")
        applier = ReloadingApplier(FakeRuntime(), master=False)
        delivery = Delivery(config, Status(templates=1), None, lambda _: 0.0, haproxy=applier)
        delivery.prepare_certificates()
        await delivery.sync_certificates((KeyPair("site.test", bundle()),))
        assert delivery.next_retry() is None
        ahead = (datetime.datetime.now(datetime.UTC) - NOW).total_seconds() + 2.0  # `bundle` dates from NOW
        renewal = (KeyPair("site.test", bundle(start_days=ahead / 86_400)),)  # valid in 1-2 s (whole seconds)
        await delivery.sync_certificates(renewal)
        due = delivery.next_retry()
        assert due is not None and 0.5 < due - time.monotonic() <= 2.0
        await asyncio.sleep(due - time.monotonic() + 0.01)
        delivery.pass_begins()
        await delivery.sync_certificates(renewal)
        served = (certs / "site.test.pem").read_text()
        assert served.split("-----END CERTIFICATE-----")[0] in renewal[0].value
        assert delivery.next_retry() is None

    asyncio.run(scenario())
