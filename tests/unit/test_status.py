"""What operators read: the Consul check, /status and the metrics, from typed outcomes."""

from __future__ import annotations

import json

import pytest
from prometheus_client import generate_latest

from renderer.deliver.runtime import RuntimeApplyError
from renderer.errors import (
    ApplyKind,
    ConsulError,
    FailureReason,
    LockError,
    ReloadError,
    TemplateError,
    ValidationError,
    WriteError,
)
from renderer.status import Status

CONFIG = "backend web\n    server a 10.0.0.1:80 check\n    server b 10.0.0.2:80 check\n"


def status_with_one_template() -> Status:
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", CONFIG, ApplyKind.RUNTIME, 0.012)
    status.template_ok("/etc/haproxy/haproxy.cfg")
    return status


def test_passing_names_what_is_served_and_how_it_got_there() -> None:
    state, output = status_with_one_template().check()
    assert state == "passing"
    assert "haproxy.cfg: 1 backend(s), 2 server(s); last applied by runtime 12 ms after the Consul change" in output


@pytest.mark.parametrize(
    ("error", "check"),
    [
        (ReloadError("master socket missing"), "critical"),
        (RuntimeApplyError("add server refused"), "critical"),  # a reload problem too (its subclass)
        (ValidationError("haproxy -c: unknown keyword"), "warning"),
        (WriteError("read-only file system"), "warning"),
        (TemplateError("undefined name"), "warning"),
    ],
)
def test_the_check_follows_the_failure_reason_of_the_error(error: Exception, check: str) -> None:
    status = status_with_one_template()
    assert isinstance(error, ReloadError | ValidationError | WriteError | TemplateError)
    status.fail("/etc/haproxy/haproxy.cfg", error.reason, str(error))
    state, output = status.check()
    assert state == check
    assert str(error) in output


def test_reasons_keep_their_labels_in_metrics_and_status_json() -> None:
    """The enum values are the labels operators already query: consul_renderer_failures_total{reason="reload"}."""
    status = status_with_one_template()
    status.applied(ApplyKind.RELOAD)
    status.fail("/etc/haproxy/haproxy.cfg", FailureReason.VALIDATION, "bad")
    metrics = generate_latest(status.registry).decode()
    assert 'consul_renderer_applies_total{kind="reload"} 1.0' in metrics
    assert 'consul_renderer_failures_total{reason="validation"} 1.0' in metrics
    snapshot = json.loads(json.dumps(status.snapshot()))
    assert snapshot["applies"] == {"reload": 1}
    assert snapshot["problems"]["/etc/haproxy/haproxy.cfg"]["reason"] == "validation"


def test_every_error_class_reports_under_its_own_reason() -> None:
    assert [e.reason for e in (ConsulError, TemplateError, ValidationError, ReloadError, WriteError, LockError)] == [
        FailureReason.CONSUL,
        FailureReason.TEMPLATE,
        FailureReason.VALIDATION,
        FailureReason.RELOAD,
        FailureReason.WRITE,
        FailureReason.LOCK,
    ]


def test_a_change_haproxy_needed_nothing_for_keeps_the_last_apply_facts() -> None:
    status = status_with_one_template()
    status.now_serving("/etc/haproxy/haproxy.cfg", CONFIG + "# a comment\n", ApplyKind.NONE, 0.5)
    assert status.served["/etc/haproxy/haproxy.cfg"].kind is ApplyKind.RUNTIME
