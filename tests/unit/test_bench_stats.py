"""The bench's statistics: a missing sample is a timeout, NaN never vanishes, cold apart from hot,
nothing measured is never 0. Pure functions and a probe that is never started: no processes."""

from __future__ import annotations

import json
import math

from bench.catalog import per
from bench.churn import COLD_KINDS, cold_plan, service_name
from bench.connections import ConnectionStats, established
from bench.load import Probe
from bench.stats import Kind, Ledger, Stats, finite, ms_cell
from bench.timing import delay_after, gone


def test_stats_over_measured_samples() -> None:
    stats = Stats.of([0.010, 0.030, 0.020])
    assert (stats.count, stats.timeouts, stats.median_ms, stats.p95_ms, stats.max_ms) == (3, 0, 20.0, 30.0, 30.0)
    assert stats.cell() == "20/30/30"


def test_a_missing_sample_is_a_timeout_ranked_after_every_measured_one() -> None:
    stats = Stats.of([0.010, None, 0.020])
    assert (stats.count, stats.timeouts) == (3, 1)
    assert stats.median_ms == 20.0
    assert stats.max_ms is None  # the slowest change is the one never seen, not 20 ms
    assert stats.cell() == "20/TO/TO"


def test_nan_is_a_timeout_and_never_vanishes() -> None:
    stats = Stats.of([math.nan, 0.005])
    assert (stats.count, stats.timeouts) == (2, 1)
    assert stats.max_ms is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in (stats.median_ms, stats.p95_ms, stats.max_ms))


def test_the_median_is_unknown_when_a_middle_sample_timed_out() -> None:
    assert Stats.of([0.001, None]).median_ms is None
    assert Stats.of([0.001, 0.002, None, None]).median_ms is None
    assert Stats.of([0.001, 0.002, 0.003, None]).median_ms == 2.5
    assert Stats.of([None, None]).cell() == "TO/TO/TO"


def test_no_sample_gives_no_figure_never_zero() -> None:
    stats = Stats.of([])
    assert (stats.count, stats.timeouts, stats.median_ms, stats.p95_ms, stats.max_ms) == (0, 0, None, None, None)
    assert stats.cell() == "-"
    assert ms_cell(None, 0) == "-"
    assert ConnectionStats.of([]) == ConnectionStats(0, 0, None, None)
    assert per((None, 10), 5) is None
    assert per((1, 10), 0) is None


def test_the_ledger_tells_cold_from_hot() -> None:
    ledger = Ledger()
    first = ledger.record("svc-0000", Kind.ADD, 0.050)
    ledger.record("svc-0000", Kind.CHECK_FAIL, 0.010)
    ledger.record("svc-0005", Kind.REMOVE, None)
    ledger.record("svc-0000", Kind.ADD, 0.012)
    assert first.cold
    assert [c.cold for c in ledger.changes] == [True, False, True, False]
    split = ledger.split()
    assert (split.cold.count, split.cold.timeouts, split.hot.count) == (2, 1, 2)
    assert ledger.split(Kind.ADD).cold.max_ms == 50.0
    assert ledger.split(Kind.ADD).hot.max_ms == 12.0
    assert ledger.split(Kind.CHECK_PASS).cold.count == 0
    assert ledger.timeouts == 1
    assert ledger.first().max_ms == 50.0


def test_a_timed_out_first_change_shows_as_one() -> None:
    ledger = Ledger()
    ledger.record("web", Kind.ADD, None)
    assert (ledger.first().count, ledger.first().timeouts) == (1, 1)
    assert Ledger().first().count == 0


def test_a_sighting_that_never_happened_is_no_delay() -> None:
    assert delay_after(None, 10.0) is None
    assert delay_after(9.9, 10.0) == 0.0  # landed before the Consul call returned to us
    assert delay_after(10.25, 10.0) == 0.25


def test_gone_needs_other_answers_after_the_quiet_time() -> None:
    probe = Probe("127.0.0.1", 1)  # never started
    probe.last_seen["spare-1"] = 10.0
    probe.last_answer = 10.2
    assert not gone(probe, "spare-1", 10.0, 0.3)
    probe.last_answer = 10.4
    assert gone(probe, "spare-1", 10.0, 0.3)
    probe.last_answer = 0.0  # a frontend that answers nothing proves nothing
    assert not gone(probe, "never-seen", 10.0, 0.3)


def test_forget_drops_first_and_last_sightings() -> None:
    probe = Probe("127.0.0.1", 1)
    probe.first_seen["spare-1"] = probe.last_seen["spare-1"] = 3.0
    probe.forget("spare-1")
    assert "spare-1" not in probe.first_seen
    assert "spare-1" not in probe.last_seen


def test_cold_plan_uses_untouched_services_once_each() -> None:
    hot = [0, 500, 999]
    plan = cold_plan(1000, hot, 40)
    services = [c.service for c in plan]
    assert len(services) == len(set(services)) == 40
    assert not {service_name(i) for i in hot} & set(services)
    assert [c.kind for c in plan[:4]] == list(COLD_KINDS)
    assert plan[0].kind == Kind.ADD  # the first change after start
    assert len(cold_plan(10, [0, 5, 9], 40)) == 7
    assert cold_plan(3, [0, 1, 2], 40) == []


def test_established_counts_only_the_process_sockets() -> None:
    ss_output = "\n".join(
        [
            "0      0      127.0.0.1:46764 127.0.0.1:8500 ino:111 sk:11b cgroup:/ <->",
            "0      0      127.0.0.1:46765 127.0.0.1:8500 ino:222 sk:11c cgroup:/ <->",
            "0      0      127.0.0.1:46766 127.0.0.1:8500 ino:1113 sk:11d cgroup:/ <->",
            "0      0      127.0.0.1:46767 127.0.0.1:8500 ino:333 sk:11e cgroup:/ <->",
            "0      0      127.0.0.1:46768 127.0.0.1:8500 sk:11f cgroup:/ <->",
        ]
    )
    assert established(ss_output, {111, 333, 11}) == 2  # another process's socket, or no inode: not counted
    assert established("", {111}) == 0


def test_connection_stats_report_peak_and_median() -> None:
    assert ConnectionStats.of([3, 12, 5, 5], failed=1) == ConnectionStats(4, 1, 12, 5.0)
    assert ConnectionStats.of([3, 12, 5, 5]).cell() == "12/5"


def test_json_has_null_where_nothing_was_measured() -> None:
    report = finite({"rps": math.nan, "nested": [math.inf, 1.5], "n": 3})
    assert json.loads(json.dumps(report, allow_nan=False)) == {"rps": None, "nested": [None, 1.5], "n": 3}
