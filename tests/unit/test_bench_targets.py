"""The bench's verdicts on issue #20's targets, from synthetic bench JSON: what is met, what is
missed, and what the run did not measure (never taken as met). Pure functions and the CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from bench.agent import Protocol
from bench.catalog import AgentCost, CatalogResult, Rates
from bench.churn import SoakResult
from bench.connections import ConnectionStats
from bench.convergence import SetupResult
from bench.hostile import HostileResult, per_minute
from bench.stats import Kind, Ledger, finite
from bench.targets import Verdict, check, exit_code, main, table


def stats(p50: float | None, p95: float | None, top: float | None, count: int = 40) -> dict[str, Any]:
    return {"count": count, "timeouts": 0, "median_ms": p50, "p95_ms": p95, "max_ms": top}


def row(protocol: str, services: int = 1000) -> dict[str, Any]:
    """A scale row as `CatalogResult` writes it, every figure within its target."""
    h2 = protocol == "h2"
    return {
        "services": services,
        "protocol": protocol,
        "negotiated": "HTTP/2" if h2 else "HTTP/1.1",
        "all_changes": {
            "cold": stats(15, 40, 60) if h2 else stats(90, 200, 300),
            "hot": stats(16, 45, 55) if h2 else stats(18, 40, 50),
        },
        "first_change": stats(20, 20, 20, count=1) if h2 else stats(140, 140, 140, count=1),
        "timeouts": 0,
        "probe_requests": 50_000,
        "probe_failed_requests": 0,
        "connections_to_agent": {"samples": 900, "failed_samples": 0, "peak": 6, "median": 5.0},
        "consul_requests_per_change": 2.1 if h2 else 150.0,
        "consul_requests_per_idle_minute": 4.0,
        "idle_seconds": 1300.0,
        "consul_answer_kb_per_change": 17.4 if h2 else 210.8,
        "service_answer_kb": 14.3,
        "soak": {"changes": 1000, "requests": 400_000, "failed_requests": 0, "timeouts": 0, "reloads": 0},
    }


def setup(name: str) -> dict[str, Any]:
    return {"name": name, "timeouts": 0, "failed_requests": 0, "requests": 200_000}


def hostile() -> dict[str, Any]:
    """The hostile part as `HostileResult` writes it, every figure within its target: the storms'
    first minute (12 reloads, the gap grown to 2 s meanwhile) is their start, not judged."""
    result = HostileResult(
        storm_s=180.0, settings_names=20, listing_names=50, attacker_registrations=9000,
        reloads_per_minute=[12, 3, 2], reload_gap_max_s=2.0, reload_gap_steady_max_s=1.0, unbacked_served_max=0,
        unbacked_samples=90, spare_added_ms=35.0, brand_new_ms=[80.0, 95.5, 70.1], load_tool="wrk",
        load_requests=500_000, failed_requests=0,
    )  # fmt: skip
    return asdict(result)


def report() -> dict[str, Any]:
    """A whole run (every set-up, 1,000 services over both protocols, the hostile part) meeting every target."""
    return {
        "scale_settings": {"sizes": "1000", "protocols": ["http", "h2"], "idle_seconds": 1300.0, "block_wait": None},
        "convergence": [setup("ours-auto"), setup("ours-reload"), setup("dns-default") | {"timeouts": 3}],
        "scale": [row("http"), row("h2")],
        "hostile": hostile(),
    }


def verdicts(data: dict[str, Any]) -> dict[str, Verdict]:
    return {t.name: t.verdict for t in check(data)}


def test_a_run_within_every_target_meets_them_all() -> None:
    found = verdicts(report())
    assert set(found.values()) == {Verdict.MET}
    for name in (
        "ours-auto: timeouts", "ours-reload: failed requests", "http 1000: failed requests",
        "h2 1000 soak: timeouts", "h2 1000: protocol", "h2 1000: cold p50 ms", "h2 1000: hot max ms",
        "h2 1000: first change ms", "h2 1000: connections to the agent (peak)", "h2 1000: requests per change",
        "h2 1000: kB per change", "h2 1000: requests per idle minute", "http 1000: hot p50 ms",
        "http 1000: cold p50 ms", "http 1000: cold max ms (first change included)", "hostile: failed requests",
        "hostile: reloads in a minute", "hostile: reload gap s", "hostile: names serving the attacker's value",
        "hostile: server added ms", "hostile: brand-new service max ms",
    ):  # fmt: skip
        assert found[name] == Verdict.MET, name
    assert not any(name.startswith("dns-") for name in found)  # HAProxy's DNS discovery is not ours to judge
    assert exit_code(check(report())) == 0


def test_one_latency_over_its_limit_is_missed_and_nothing_else() -> None:
    data = report()
    data["scale"][1]["all_changes"]["hot"]["p95_ms"] = 120.0
    targets = check(data)
    missed = [t for t in targets if t.verdict == Verdict.MISSED]
    assert [(t.name, t.limit, t.value) for t in missed] == [("h2 1000: hot p95 ms", 100, 120.0)]
    assert exit_code(targets) == 1


def test_a_timeout_where_a_percentile_falls_misses_it() -> None:
    data = report()
    data["scale"][0]["all_changes"]["cold"]["max_ms"] = None  # the slowest cold change timed out
    target = next(t for t in check(data) if t.name == "http 1000: cold max ms (first change included)")
    assert (target.verdict, target.value) == (Verdict.MISSED, "TO")


def test_the_first_change_counts_in_the_plain_http_cold_max() -> None:
    data = report()
    data["scale"][0]["first_change"] = stats(620, 620, 620, count=1)
    target = next(t for t in check(data) if t.name == "http 1000: cold max ms (first change included)")
    assert (target.verdict, target.value) == (Verdict.MISSED, 620)


def test_an_idle_window_shorter_than_two_blocking_waits_is_not_measured() -> None:
    data = report()
    for r in data["scale"]:
        r["idle_seconds"] = 65.0
        r["consul_requests_per_idle_minute"] = 4.0
    idle = next(t for t in check(data) if t.name == "h2 1000: requests per idle minute")
    assert idle.verdict == Verdict.NOT_MEASURED
    assert "65 s" in idle.why and "blocking" in idle.why and "--idle-seconds" in idle.why
    assert exit_code(check(data)) == 0
    data["scale_settings"]["block_wait"] = "30s"  # two 30 s waits (and their jitter) fit in 65 s
    idle = next(t for t in check(data) if t.name == "h2 1000: requests per idle minute")
    assert idle.verdict == Verdict.MET
    data["scale"][1]["consul_requests_per_idle_minute"] = 12.0
    idle = next(t for t in check(data) if t.name == "h2 1000: requests per idle minute")
    assert idle.verdict == Verdict.MISSED


def test_a_run_over_another_protocol_than_claimed_fails() -> None:
    data = report()
    data["scale"][1]["negotiated"] = "HTTP/1.1"  # asked h2, the renderer watched over plain HTTP
    found = {t.name: t for t in check(data)}
    assert found["h2 1000: protocol"].verdict == Verdict.MISSED
    assert found["h2 1000: protocol"].value == "HTTP/1.1"
    # Its figures are not HTTP/2's: never judged (met) as if they were.
    assert found["h2 1000: cold p50 ms"].verdict == Verdict.NOT_MEASURED
    assert "HTTP/1.1" in found["h2 1000: cold p50 ms"].why
    data["scale"][1]["negotiated"] = None
    assert verdicts(data)["h2 1000: protocol"] == Verdict.MISSED
    assert exit_code(check(data)) == 1


@pytest.mark.parametrize(
    ("where", "key", "name"),
    [
        (("convergence", 0), "failed_requests", "ours-auto: failed requests"),
        (("convergence", 1), "timeouts", "ours-reload: timeouts"),
        (("scale", 0), "probe_failed_requests", "http 1000: failed requests"),
        (("scale", 1), "timeouts", "h2 1000: timeouts"),
    ],
)
def test_failed_requests_and_timeouts_are_missed(where: tuple[str, int], key: str, name: str) -> None:
    data = report()
    data[where[0]][where[1]][key] = 2
    found = {t.name: t for t in check(data)}
    assert (found[name].verdict, found[name].value, found[name].limit) == (Verdict.MISSED, 2, 0)
    assert exit_code(check(data)) == 1


def test_a_failed_request_in_the_soak_is_missed() -> None:
    data = report()
    data["scale"][1]["soak"]["failed_requests"] = 1
    assert verdicts(data)["h2 1000 soak: failed requests"] == Verdict.MISSED


def test_what_the_run_did_not_include_is_not_measured_never_met() -> None:
    data = report()
    data["convergence"] = []  # --only none
    data["scale"] = [row("h2", services=100)]  # --sizes 100 --protocols h2
    found = {t.name: t for t in check(data)}
    assert found["h2 100: timeouts"].verdict == Verdict.MET
    for name in ("ours-auto: timeouts", "h2 1000: cold p50 ms", "h2 1000: kB per change", "http 1000: hot p50 ms"):
        assert found[name].verdict == Verdict.NOT_MEASURED, name
    assert "1000" in found["http 1000: hot p50 ms"].why
    assert exit_code(check(data)) == 0


def test_figures_the_run_could_not_take_are_not_measured() -> None:
    data = report()
    h2 = data["scale"][1]
    h2["all_changes"]["cold"] = stats(None, None, None, count=0)  # --cold-changes 0
    h2["consul_answer_kb_per_change"] = None
    h2["connections_to_agent"] = {"samples": 0, "failed_samples": 5, "peak": None, "median": None}
    found = verdicts(data)
    for name in ("h2 1000: cold p95 ms", "h2 1000: kB per change", "h2 1000: connections to the agent (peak)"):
        assert found[name] == Verdict.NOT_MEASURED, name


def test_the_table_names_every_target_and_counts_the_verdicts() -> None:
    data = copy.deepcopy(report())
    data["scale"][1]["connections_to_agent"]["peak"] = 21
    text = table(check(data))
    assert "h2 1000: connections to the agent (peak)" in text and "≤ 16" in text and "MISSED" in text
    assert "1 MISSED" in text.splitlines()[-1]


def test_the_cli_rechecks_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(report()))
    assert main([str(saved)]) == 0
    assert "h2 1000: cold p50 ms" in capsys.readouterr().out
    data = report()
    data["scale"][0]["all_changes"]["hot"]["median_ms"] = 25.0
    saved.write_text(json.dumps(data))
    assert main([str(saved)]) == 1
    data["scale"] = []  # nothing at 1,000: not measured is not a failure
    saved.write_text(json.dumps(data))
    assert main([str(saved)]) == 0
    saved.write_text("{not json")
    assert main([str(saved)]) == 2
    assert "bench.json" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")]) == 2


def written(services: int, protocol: Protocol, negotiated: str) -> CatalogResult:
    """A scale row as the bench's own dataclasses make it (so the keys read are the keys written)."""
    ledger = Ledger()
    for n, seconds in enumerate((0.012, 0.018, 0.015)):
        ledger.record(f"svc-{n}", Kind.ADD, seconds)
        ledger.record(f"svc-{n}", Kind.REMOVE, seconds / 2)
    return CatalogResult(
        services=services, protocol=protocol, negotiated=negotiated, instances=10, hot_services=3,
        cold_changes_planned=3, start_to_file_s=1.0, start_to_serving_s=1.1, start_cost=Rates(1005, 1010, 1008),
        connections_to_agent=ConnectionStats.of([4, 5, 5]), connections_by_phase={},
        add=ledger.split(Kind.ADD), check_fail=ledger.split(Kind.CHECK_FAIL),
        check_pass=ledger.split(Kind.CHECK_PASS), remove=ledger.split(Kind.REMOVE), all_changes=ledger.split(),
        first_change=ledger.first(), timeouts=ledger.timeouts, changes=ledger.changes, probe_requests=100,
        probe_failed_requests=0, probe_failure_samples=[], consul_requests_per_change=1.5,
        consul_requests_per_idle_minute=float("nan"), idle_seconds=65.0,
        agent=AgentCost(2.5, 12.0, 6.0, 1.5, 6.0), renderer_rss_mb=60.0, renderer_idle_cpu_percent=0.1,
        frontend_rps=None, routing="map", refusals_in_log=0, load_average_start=(0.5, 1.0, 1.0),
        load_average_end=(2.25, 1.0, 1.0), soak=SoakResult(1000, 78.0, "wrk", 400_000, 5128, 0, 0, 0),
        consul_answer_kb_per_change=17.4, service_answer_kb=14.3,
    )  # fmt: skip


def test_the_figures_are_read_where_the_bench_writes_them() -> None:
    ledger = Ledger()
    ledger.record("web", Kind.ADD, 0.02)
    ledger.record("web", Kind.REMOVE, None)  # a removal not seen in time
    auto = SetupResult(
        name="ours-auto", description="", events=1, changes=2, add=ledger.split(Kind.ADD),
        remove=ledger.split(Kind.REMOVE), all_changes=ledger.split(), first_change=ledger.first(),
        timeouts=ledger.timeouts, failed_requests=0, requests=1000, load_tool="wrk", reloads=0,
        haproxy_processes_at_end=2,
    )  # fmt: skip
    bench = {
        "scale_settings": {"sizes": "1000", "protocols": ["h2"], "idle_seconds": 65.0, "block_wait": None},
        "convergence": [asdict(auto)],
        "scale": [asdict(written(1000, Protocol.H2, "HTTP/2"))],
    }
    found = verdicts(json.loads(json.dumps(finite(bench), allow_nan=False)))
    assert found["ours-auto: timeouts"] == Verdict.MISSED
    assert found["ours-reload: timeouts"] == Verdict.NOT_MEASURED
    for name in (
        "ours-auto: failed requests", "h2 1000: protocol", "h2 1000: timeouts", "h2 1000: failed requests",
        "h2 1000 soak: timeouts", "h2 1000 soak: failed requests", "h2 1000: cold p50 ms", "h2 1000: hot max ms",
        "h2 1000: first change ms", "h2 1000: connections to the agent (peak)", "h2 1000: requests per change",
        "h2 1000: kB per change",
    ):  # fmt: skip
        assert found[name] == Verdict.MET, name
    assert found["h2 1000: requests per idle minute"] == Verdict.NOT_MEASURED  # NaN: nothing measured
    assert found["http 1000: hot p50 ms"] == Verdict.NOT_MEASURED


@pytest.mark.parametrize(
    ("key", "value", "name"),
    [
        ("failed_requests", 1, "hostile: failed requests"),
        ("reloads_per_minute", [3, 3, 7], "hostile: reloads in a minute"),
        ("reload_gap_steady_max_s", 2.0, "hostile: reload gap s"),
        ("unbacked_served_max", 5, "hostile: names serving the attacker's value"),
        ("spare_added_ms", 600.0, "hostile: server added ms"),
        ("spare_added_ms", None, "hostile: server added ms"),  # not seen within 30 s
        ("brand_new_ms", [80.0, 2500.0, 70.0], "hostile: brand-new service max ms"),
        ("brand_new_ms", [80.0, None, 70.0], "hostile: brand-new service max ms"),  # one not seen
    ],
)
def test_what_the_storms_cost_others_past_a_promise_is_missed(key: str, value: object, name: str) -> None:
    data = report()
    data["hostile"][key] = value
    missed = [t for t in check(data) if t.verdict == Verdict.MISSED]
    assert [t.name for t in missed] == [name]
    assert exit_code(check(data)) == 1


def test_the_storms_first_minute_is_their_start_and_not_judged() -> None:
    data = report()
    data["hostile"]["reloads_per_minute"] = [40, 6, 6]
    data["hostile"]["reload_gap_max_s"] = 30.0  # the whole storm's; only the gap past the first minute is judged
    found = {t.name: t for t in check(data)}
    assert found["hostile: reloads in a minute"].verdict == Verdict.MET
    assert found["hostile: reload gap s"].verdict == Verdict.MET


def test_a_run_without_the_hostile_part_has_its_promises_not_measured() -> None:
    data = report()
    data["hostile"] = None  # --skip-hostile
    found = {t.name: t for t in check(data) if t.name.startswith("hostile:")}
    assert len(found) == 6
    assert {t.verdict for t in found.values()} == {Verdict.NOT_MEASURED}
    assert "--skip-hostile" in found["hostile: brand-new service max ms"].why
    assert exit_code(check(data)) == 0


def test_reloads_per_minute_are_counted_from_the_storms_start() -> None:
    samples = [(0.0, 5, 1.0), (30.0, 11, 1.0), (59.5, 17, 2.0), (61.0, 18, 2.0), (119.0, 20, 1.0), (150.0, 21, 1.0)]
    assert per_minute(samples, 180.0) == [12, 3]  # no sample past 150 s: no third minute
    assert per_minute([], 180.0) == []
