"""What operators read: the Consul check, /status and the metrics, from typed outcomes."""

from __future__ import annotations

import json
import time

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
from renderer.status import AppliedChange, ConsulContact, ReloadWhy, Status
from renderer.status.timeline import Servers

CONFIG = "backend web\n    server a 10.0.0.1:80 check\n    server b 10.0.0.2:80 check\n"


def status_with_one_template() -> Status:
    status = Status(templates=1)
    status.now_serving("/etc/haproxy/haproxy.cfg", CONFIG, ApplyKind.RUNTIME, 0.012)
    status.destination_ok("/etc/haproxy/haproxy.cfg")
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


def contact(age_s: float, max_age_s: float = 60.0, failing: int = 0) -> ConsulContact:
    return ConsulContact(
        address="http://127.0.0.1:8500", watched=3, failing=failing, budgeted=False, max_connections=64, index=42,
        last_data_at=None, failing_since=None, last_error="Consul at http://127.0.0.1:8500 refused the connection",
        data_age_s=age_s, max_data_age_s=max_age_s,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("age", "check"), [(0.0, "passing"), (59.0, "passing"), (60.0, "warning"), (120.0, "critical")]
)
def test_the_stale_data_watchdog_warns_at_max_data_age_and_is_critical_at_twice_it(age: float, check: str) -> None:
    status = status_with_one_template()
    status.contact_source = lambda: contact(age, failing=1 if age else 0)
    state, output = status.check()
    assert state == check
    if check != "passing":
        assert output.startswith(f"no answer from Consul at http://127.0.0.1:8500 for {age:.0f}s (max_data_age 60s")
        assert "the last good config keeps serving" in output and "refused the connection" in output


def test_max_data_age_zero_turns_the_watchdog_off() -> None:
    status = status_with_one_template()
    status.contact_source = lambda: contact(10_000.0, max_age_s=0.0, failing=1)
    assert status.check()[0] == "passing"
    assert status.snapshot()["consul"]["freshness"] == "off"


def test_the_metrics_say_how_old_the_data_is_and_parse_as_prometheus_text() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    status = status_with_one_template()
    status.contact_source = lambda: contact(130.0, failing=2)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(status.registry).decode())}
    assert families["consul_renderer_data_age_seconds"].samples[0].value == 130.0
    assert families["consul_renderer_max_data_age_seconds"].samples[0].value == 60.0
    assert families["consul_renderer_data_stale"].samples[0].value == 2


def test_one_snapshot_feeds_the_check_the_page_and_the_cli() -> None:
    """The figures are computed once: the check in the snapshot is the one read with the same contact."""
    reads: list[int] = []

    def read() -> ConsulContact:
        reads.append(1)
        return contact(61.0, failing=1)

    status = status_with_one_template()
    status.contact_source = read
    snapshot = json.loads(json.dumps(status.snapshot()))
    assert len(reads) == 1, "the contact is read once per snapshot"
    assert snapshot["check"] == "warning" and snapshot["consul"]["stale"] == snapshot["output"]
    served = snapshot["served"]["/etc/haproxy/haproxy.cfg"]
    assert served["backends"] == 1 and served["servers"] == 2
    assert [s["name"] for s in served["listing"][0]["servers"]] == ["a", "b"]


def test_each_apply_goes_on_the_timeline_with_the_keys_that_changed_since_the_last_one() -> None:
    status = Status(templates=1)
    dest = "/etc/haproxy/haproxy.cfg"
    status.rendered_from(dest, {"health.service(web)": (10, time.monotonic()), "catalog.services": (9, 0.0)})
    status.now_serving(dest, CONFIG, ApplyKind.RELOAD, 0.2, AppliedChange(reload_why=ReloadWhy.FIRST))
    status.rendered_from(dest, {"health.service(web)": (12, time.monotonic()), "catalog.services": (9, 0.0)})
    added = AppliedChange(added=Servers.of(["web/c 10.0.0.3:80"]))
    status.now_serving(dest, CONFIG + "    server c 10.0.0.3:80\n", ApplyKind.RUNTIME, 0.004, added)
    changes = status.snapshot()["changes"]
    assert [c["kind"] for c in changes] == ["runtime", "reload"]  # newest first
    assert changes[0]["keys"] == [{"key": "health.service(web)", "index": 12}]
    assert changes[0]["summary"] == "added web/c 10.0.0.3:80" and changes[0]["after_change_ms"] == 4.0
    assert {k["key"] for k in changes[1]["keys"]} == {"health.service(web)", "catalog.services"}
    assert status.diff(dest) == (CONFIG, CONFIG + "    server c 10.0.0.3:80\n")


def test_a_file_found_live_is_no_change_and_later_changes_count_from_it() -> None:
    status = Status(templates=1)
    dest = "/etc/haproxy/haproxy.cfg"
    status.rendered_from(dest, {"health.service(web)": (10, time.monotonic())})
    status.found_serving(dest, CONFIG)
    assert status.snapshot()["changes"] == [] and status.diff(dest) is None
    status.rendered_from(dest, {"health.service(web)": (10, time.monotonic() - 5)})
    status.now_serving(dest, CONFIG + "# x\n    server c 10.0.0.3:80\n", ApplyKind.RUNTIME, 0.01)
    assert status.snapshot()["changes"][0]["keys"] == []  # its data had not changed since the file went live


def test_an_instance_left_out_of_two_files_is_named_once_in_the_check() -> None:
    status = status_with_one_template()
    item = "service web, instance 'bad' on node 'n', field Address: 'x y' is not an address"
    status.set_left_out("/etc/haproxy/haproxy.cfg", (item,))
    status.set_left_out("/etc/haproxy/routes.map", (item,))
    assert status.check()[1].count("instance 'bad'") == 1
    reasons = status.snapshot()["left_out_reasons"]["/etc/haproxy/haproxy.cfg"]
    assert reasons == [
        {"what": "service web, instance 'bad' on node 'n', field Address", "why": "'x y' is not an address"}
    ]


def test_a_change_names_a_long_key_cut_so_status_stays_small() -> None:
    """An attacker's review: registrants with 16 KB service names (Consul takes them) changed them
    at every apply, and each change named its keys whole: /status reached 16.5 MB, polled twice a
    second by every open page, and 200 kept changes held ~64 MB."""
    status = Status(templates=1)
    dest = "/etc/haproxy/haproxy.cfg"
    keys = {f"health.service({n}{'x' * 16_000})": (10 + n, time.monotonic()) for n in range(20)}
    status.rendered_from(dest, keys)
    status.now_serving(dest, CONFIG, ApplyKind.RELOAD, 0.2, AppliedChange(reload_why=ReloadWhy.FIRST))
    (change,) = status.snapshot()["changes"]
    assert change["keys_total"] == 20 and all(len(k["key"]) < 250 for k in change["keys"])
    assert change["keys"][0]["key"].endswith("… (16018 characters)")
    assert len(json.dumps(status.snapshot())) < 50_000


def test_a_storm_of_reloads_warns_says_its_gap_and_is_a_metric() -> None:
    """While a storm of reloads lengthens the gap (`ReloadPace`), a new service waits for the next
    reload: the check says so and why, /status and the metric give the gap."""
    from prometheus_client.parser import text_string_to_metric_families

    status = status_with_one_template()
    status.reload_pace_source = lambda: (1.0, 1.0)
    assert status.check()[0] == "passing" and status.snapshot()["reload_gap_s"] == 1.0
    status.reload_pace_source = lambda: (6.5, 1.0)
    state, output = status.check()
    assert state == "warning" and "one every 6 s" in output and "timeline" in output
    assert status.snapshot()["reload_gap_s"] == 6.5
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(status.registry).decode())}
    assert families["consul_renderer_reload_gap_seconds"].samples[0].value == 6.5


def test_an_expiring_certificate_and_a_storm_are_told_beside_instances_left_out() -> None:
    """helper-133 (/tmp/rev79): one instance left out (anyone can register `Address: "x!"`) took
    the check's output, and a certificate expiring in 2 days and a reload storm were told nowhere
    but the metrics."""
    status = status_with_one_template()
    status.reload_pace_source = lambda: (60.0, 1.0)
    status.set_certificate_notes(("certificate 'shop' expires in 2 days",))
    status.set_left_out("/etc/haproxy/haproxy.cfg", ("service junk, instance 'j1' on node 'n', field Address: bad",))
    state, output = status.check()
    assert state == "warning"
    assert output.index("expires in 2 days") < output.index("one every 60 s") < output.index("instance 'j1'"), output


def test_one_services_many_instances_left_out_do_not_push_anothers_off_the_list() -> None:
    """helper-133 (/tmp/rev79): the first 1,000 items in sorted order were listed, so a registrant's
    1,100 bad instances of a service named `aaa` hid `web-important`'s from /status, the page and the
    check. Each service's items are taken in turn."""
    status = status_with_one_template()
    flood = tuple(f"service aaa, instance 'x{n:04}' on node 'n', field Address: bad" for n in range(1100))
    victim = ("service web-important, instance 'w1' on node 'n', field Weight: bad",)
    status.set_left_out("/etc/haproxy/haproxy.cfg", flood + victim)
    snapshot = status.snapshot()
    listed = snapshot["left_out"]["/etc/haproxy/haproxy.cfg"]
    assert len(listed) == 1000 and victim[0] in listed and listed == sorted(listed, key=(flood + victim).index)
    assert snapshot["left_out_total"]["/etc/haproxy/haproxy.cfg"] == 1101
    assert "instance 'w1'" in status.check()[1] and "(and 1098 more)" in status.check()[1]


def test_the_check_tells_an_expiring_certificate_before_keys_refused() -> None:
    """helper-135 (/tmp/rev81): a KV writer's three bad keys under the certificates' prefix came
    first and pushed "expires in 2.0 days" into "(and 1 more)"."""
    from types import SimpleNamespace

    from renderer.loop.cycle import RenderCycle

    status = status_with_one_template()
    notes = {("refused", f"bad{n}"): f"certificate bad{n} refused: not PEM" for n in range(3)}
    notes["expiring", "shop"] = "certificate shop expires in 2.0 days"
    RenderCycle._note_certificates(SimpleNamespace(_status=status, _noted_certificates=set()), notes)  # type: ignore[arg-type]
    assert "certificate shop expires in 2.0 days" in status.check()[1]


def test_the_items_left_out_are_chosen_once_for_each_new_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-135 (/tmp/rev81): /status and the check chose the items to list (`fairly_listed`) over
    every item each time: 100,000 items cost 571 ms a snapshot and 192 ms a check, once a second."""
    import renderer.status.model as model

    chosen = []
    real = model.fairly_listed
    monkeypatch.setattr(model, "fairly_listed", lambda items, *a: chosen.append(len(items)) or real(items, *a))
    status = status_with_one_template()
    items = tuple(f"service s{n:05}, instance 'x' on node 'n', field Address: bad" for n in range(5000))
    status.set_left_out("/etc/haproxy/haproxy.cfg", items)
    for _ in range(3):
        status.snapshot()
        status.check()
    status.set_left_out("/etc/haproxy/haproxy.cfg", tuple(list(items)))  # a later render's list, alike
    status.snapshot()
    assert chosen == [5000], chosen
    status.set_left_out("/etc/haproxy/haproxy.cfg", items[1:])
    assert len(status.snapshot()["left_out"]["/etc/haproxy/haproxy.cfg"]) == 1000 and chosen == [5000, 4999]
