"""The bench's protocol dimension: which protocols run, what the agent's telemetry says, how the
tables label a size run over HTTP/1.1 and over HTTP/2. Pure functions, no processes."""

from __future__ import annotations

import pytest

from bench.agent import AgentCounts, Protocol, negotiated, parse_protocols, prometheus_counter
from bench.catalog import AgentCost, CatalogResult, Counts, Rates
from bench.connections import ConnectionStats
from bench.scale_table import table
from bench.stats import Kind, Ledger

AGENT_METRICS = """\
# HELP consul_client_rpc consul_client_rpc
# TYPE consul_client_rpc counter
consul_client_rpc 17
consul_client_rpc_exceeded 3
consul_rpc_query{dc="dc1"} 12
consul_rpc_query{dc="dc2"} 2
consul_rpc_queries_blocking 2
"""


def test_protocols_run_in_the_order_given_each_once() -> None:
    assert parse_protocols("http,h2") == [Protocol.HTTP, Protocol.H2]
    assert parse_protocols("h2, http,h2") == [Protocol.H2, Protocol.HTTP]
    assert parse_protocols("h2") == [Protocol.H2]


def test_an_unknown_protocol_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'http2'.*known: http, h2"):
        parse_protocols("http,http2")


def test_each_protocol_says_what_the_renderer_should_negotiate() -> None:
    assert Protocol.HTTP.expected == "HTTP/1.1"
    assert Protocol.H2.expected == "HTTP/2"


def test_a_counter_is_summed_over_its_labels_and_never_confused_with_a_longer_name() -> None:
    assert prometheus_counter(AGENT_METRICS, "consul_client_rpc") == 17
    assert prometheus_counter(AGENT_METRICS, "consul_rpc_query") == 14
    assert prometheus_counter(AGENT_METRICS, "consul_rpc_request") is None
    renderer = "consul_renderer_consul_requests_total"
    assert prometheus_counter(f"{renderer} 1234.0\n", renderer) == 1234


def test_the_negotiated_protocol_is_read_from_the_renderer_log() -> None:
    line = (
        "2026-12-01 11:31:02,123 INFO renderer.runner: watching Consul at https://127.0.0.1:8501 over HTTP/2 "
        "for 2 template(s) (up to 1000 blocking queries on 10 connections)"
    )
    assert negotiated(f"starting\n{line}\n") == "HTTP/2"
    assert negotiated("watching Consul at http://127.0.0.1:8500 over HTTP/1.1 for 2 template(s)") == "HTTP/1.1"
    assert negotiated("nothing said") is None


def test_rates_are_unknown_where_a_count_was_not_read() -> None:
    before = Counts(100, AgentCounts(50.0, None))
    after = Counts(None, AgentCounts(80.0, 7.0))
    assert Rates.of(before, after, 10) == Rates(None, 3.0, None)
    assert Rates.of(before, before, 0) == Rates(None, None, None)


def result(services: int, protocol: Protocol, negotiated: str | None) -> CatalogResult:
    ledger = Ledger()
    ledger.record("svc-0001", Kind.ADD, 0.040)  # cold
    ledger.record("svc-0001", Kind.REMOVE, 0.010)  # hot
    ledger.record("svc-0002", Kind.CHECK_FAIL, None)  # cold, timed out
    ledger.record("svc-0003", Kind.CHECK_PASS, 0.020)  # cold
    return CatalogResult(
        services=services, protocol=protocol, negotiated=negotiated, instances=10, hot_services=3,
        cold_changes_planned=3, start_to_file_s=1.0, start_to_serving_s=1.1, start_cost=Rates(1005, 1010, 1008),
        connections_to_agent=ConnectionStats.of([4, 5, 5]), connections_by_phase={},
        add=ledger.split(Kind.ADD), check_fail=ledger.split(Kind.CHECK_FAIL),
        check_pass=ledger.split(Kind.CHECK_PASS), remove=ledger.split(Kind.REMOVE), all_changes=ledger.split(),
        first_change=ledger.first(), timeouts=ledger.timeouts, changes=ledger.changes, probe_requests=100,
        probe_failed_requests=0,
        probe_failure_samples=[], consul_requests_per_change=1.5, consul_requests_per_idle_minute=6.0,
        idle_seconds=65.0,
        agent=AgentCost(2.5, 12.0, 6.0, 1.5, 6.0), renderer_rss_mb=60.0, renderer_idle_cpu_percent=0.1,
        frontend_rps=None, routing="map", refusals_in_log=0, load_average_start=(0.5, 1.0, 1.0),
        load_average_end=(2.25, 1.0, 1.0),
    )  # fmt: skip


def test_the_tables_have_a_row_per_size_and_protocol_cold_apart_from_hot() -> None:
    text = table([result(100, Protocol.HTTP, "HTTP/1.1"), result(100, Protocol.H2, "HTTP/2")])
    lines = text.splitlines()
    cost = [line.split() for line in lines if line.split()[:1] == ["100"] and "5/5" in line]
    assert [row[1] for row in cost] == ["http", "h2"]
    # cold: 20 ms, 40 ms and a timeout; hot: 10 ms; then connections, requests and the agent's RPCs
    assert cost[0][2:8] == ["40/TO/TO", "1", "10/10/10", "0", "5/5", "1.5"]
    assert cost[1][-6:] == ["2.5", "1.5", "12", "(6)", "-", "(-)"]  # kB per change: not read in this result
    start = [row for row in map(str.split, lines) if row[:1] == ["100"] and row[2] == "1.0"]
    assert [row[-1] for row in start] == ["0.50/2.25", "0.50/2.25"]
    assert [row[4] for row in start] == ["1005/1010", "1005/1010"]
    changes = [row[:3] for row in map(str.split, lines) if row[:1] == ["100"] and row[2] in ("cold", "hot")]
    assert changes == [["100", "http", "cold"], ["100", "http", "hot"], ["100", "h2", "cold"], ["100", "h2", "hot"]]


def test_a_run_that_negotiated_another_protocol_is_marked() -> None:
    text = table([result(10, Protocol.H2, "HTTP/1.1"), result(10, Protocol.HTTP, None)])
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["10"]]
    assert {row[1] for row in rows} == {"h2?", "http?"}
