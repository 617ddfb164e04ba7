"""README promises of the deliver stage: a file that stays rejected is checked again with a
doubling backoff (0.5 s to 30 s), never in a tight loop; a certificate that expires within 14 days
turns the Consul check warning. Real files and real check commands; HAProxy is never involved
(the templates run a command, not a reload); delivery's clock is ours."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from renderer.config import Config, TemplateSpec
from renderer.deliver import delivery as delivery_module
from renderer.deliver.delivery import Delivery, Outcome
from renderer.loop.cycle import RenderCycle
from renderer.loop.templates import TemplateState
from renderer.render.template import TemplateRenderer
from renderer.source.dependency import KVPrefix
from renderer.source.store import Store
from renderer.status import Status


class Clock:
    """Delivery's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_a_file_that_stays_rejected_is_checked_again_with_a_doubling_backoff_from_half_a_second_to_30_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(delivery_module, "time", clock)
    checks = tmp_path / "checks.log"
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg", check_command=f"echo {{path}} >> {checks}; false")
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0)

    def checked() -> int:
        return len(checks.read_text().splitlines()) if checks.exists() else 0

    async def scenario() -> list[float]:
        assert (await door.deliver(spec, "v0\n")).outcome is Outcome.REJECTED
        waits = []
        for n in range(1, 10):
            last_check, before = clock.now, checked()
            due = door.next_retry()
            assert due is None  # nothing waits: no wake-up for content already rejected
            clock.now += 0.25  # new content comes early: it waits, unchecked, and says until when
            assert (await door.deliver(spec, f"v{n}\n")).outcome is Outcome.DEFERRED
            due = door.next_retry()
            assert due is not None and checked() == before
            clock.now = due - 0.001  # still too early, however often the loop asks
            assert (await door.deliver(spec, f"v{n}\n")).outcome is Outcome.DEFERRED
            assert checked() == before
            clock.now = due
            assert (await door.deliver(spec, f"v{n}\n")).outcome is Outcome.REJECTED
            assert checked() == before + 1
            waits.append(due - last_check)
        return waits

    waits = asyncio.run(scenario())
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert not (tmp_path / "out.cfg").exists()  # nothing rejected was ever installed


def test_content_that_passes_its_check_resets_the_backoff_to_half_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(delivery_module, "time", clock)
    spec = TemplateSpec(tmp_path / "t.j2", tmp_path / "out.cfg", check_command="grep -q good {path}")
    door = Delivery(Config(), Status(templates=1), None, lambda _: 0.0)

    async def first_wait_after(rounds: int) -> float:
        for n in range(rounds):
            assert (await door.deliver(spec, f"bad {rounds} {n}\n")).outcome is Outcome.REJECTED
            clock.now += 60  # past any backoff
        assert (await door.deliver(spec, f"good {rounds}\n")).outcome is Outcome.APPLIED
        started = clock.now
        assert (await door.deliver(spec, f"bad again {rounds}\n")).outcome is Outcome.REJECTED
        assert (await door.deliver(spec, f"new {rounds}\n")).outcome is Outcome.DEFERRED
        due = door.next_retry()
        assert due is not None
        clock.now += 60
        return due - started

    assert asyncio.run(first_wait_after(4)) == 0.5  # four rejections before did not carry over


# -- certificates: expiring within 14 days turns the Consul check warning --------------------------


def bundle(days: float) -> str:
    """A self-signed certificate for site.test valid since yesterday for `days` more, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("site.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (cert.public_bytes(serialization.Encoding.PEM) + private).decode()


def check_after_passes(tmp_path: Path, days: float, passes: int = 1) -> tuple[str, str]:
    """The Consul check's (status, output) after passes of the loop with one certificate in KV."""
    source = tmp_path / "haproxy.cfg.j2"
    source.write_text("global\n")
    # An HAProxy output, validated and applied by commands here: no HAProxy needed.
    spec = TemplateSpec(source, tmp_path / "haproxy.cfg", haproxy=True, check_command="true", command="true")
    config = Config(templates=(spec,), certs=f"haproxy/certs:{tmp_path / 'certs'}")
    prefix = KVPrefix("haproxy/certs/")
    store = Store()
    answer = [{"Key": "haproxy/certs/site.test", "Value": base64.b64encode(bundle(days).encode()).decode()}]
    store.put(prefix.key, prefix.parse(answer), 7)
    status = Status(templates=1)
    door = Delivery(config, status, None, lambda _: 0.0)
    door.prepare_certificates()
    templates = [TemplateState(TemplateRenderer(spec, {}, environ={}))]
    cycle = RenderCycle(config, templates, store, status, door, io.StringIO())
    for _ in range(passes):
        done, _ = asyncio.run(cycle.run())
        assert done and (tmp_path / "certs" / "site.test.pem").exists()  # served
    assert not any(status.left_out.values()), "a certificate note is not an instance left out"
    return status.check()


@pytest.mark.parametrize("days", [5, 13.5])
def test_a_certificate_expiring_within_14_days_turns_the_check_warning(tmp_path: Path, days: float) -> None:
    state, output = check_after_passes(tmp_path, days)
    assert state == "warning"
    assert output.startswith("certificate site.test expires in") and "left out" not in output


@pytest.mark.parametrize("days", [14.5, 60])
def test_a_certificate_with_more_than_14_days_left_keeps_the_check_passing(tmp_path: Path, days: float) -> None:
    assert check_after_passes(tmp_path, days)[0] == "passing"


def test_an_expiring_certificate_is_said_once_in_the_log_not_at_every_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    check_after_passes(tmp_path, 5, passes=3)
    said = [r.getMessage() for r in caplog.records if "expires in" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("certificate site.test expires in 5.0 days"), said
    assert not [r for r in caplog.records if "left out" in r.getMessage()]
