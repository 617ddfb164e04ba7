"""The scale part's tables on stdout: one row per catalog size and protocol (the JSON has it all).

1. cold and hot changes over all kinds, with what the renderer costs the agent: connections to the
   port it uses, its requests per change and per idle minute, the agent's RPCs to its server and
   the server's reads;
2. start-up (time to the first file and to serving; the renderer's requests and the agent's RPCs
   until serving), the probes' failed requests, the renderer's RSS and idle CPU, the frontend's rps, the
   machine's load average when the row's run started and ended;
3. each kind of change, cold apart from hot.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from bench.catalog import INSTANCES, CatalogResult
from bench.stats import ms_cell


def table(results: list[CatalogResult], probe_gap_ms: float | None = None) -> str:
    rows = [cost_table(results), "", start_table(results), "", changes_table(results)]
    if probe_gap_ms is not None:
        rows.append(f"timing probe: 2 threads, {probe_gap_ms:g} ms between requests each (0: back to back)")
    for r in results:
        if r.soak:
            rows.append(f"soak at {r.services} services over {r.protocol}: {json.dumps(asdict(r.soak))}")
    return "\n".join(rows) + (
        f"\n(× {INSTANCES} instances each; times in ms from the Consul call to HAProxy, p50/p95/max, TO: a timeout "
        "falls there; http: HTTP/1.1 on the agent's HTTP port, h2: HTTP/2 on its HTTPS port, `?`: the renderer "
        "negotiated something else; agent RPC: the agent's RPCs to its server (consul.client.rpc), each change's own "
        "write included, in brackets its rate before the renderer started; reads: the server's queries "
        "(consul.rpc.query), the renderer's reads and the agent's anti-entropy; kB/chg: Consul's answers to the "
        "renderer per change, in brackets one service's own answer (10 instances))"
    )


def protocol_cell(r: CatalogResult) -> str:
    return r.protocol.value if r.negotiated == r.protocol.expected else f"{r.protocol.value}?"


def cost_table(results: list[CatalogResult]) -> str:
    head = (
        f"{'services':>8} {'proto':>5} {'cold p50/p95/max':>16} {'t/o':>4} {'hot p50/p95/max':>15} {'t/o':>4} "
        f"{'conns peak/med':>14} {'req/chg':>7} {'req/idle min':>12} {'agent RPC/chg':>13} {'reads/chg':>9} "
        f"{'agent RPC/idle min':>18} {'kB/chg (answer)':>15}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        cold, hot, agent = r.all_changes.cold, r.all_changes.hot, r.agent
        idle_rpcs = f"{_or_dash(agent.rpcs_per_idle_minute)} ({_or_dash(agent.rpcs_per_minute_without_renderer)})"
        kb = f"{_or_dash(r.consul_answer_kb_per_change)} ({_or_dash(r.service_answer_kb)})"
        rows.append(
            f"{r.services:>8} {protocol_cell(r):>5} {cold.cell():>16} {cold.timeouts:>4} {hot.cell():>15} "
            f"{hot.timeouts:>4} {r.connections_to_agent.cell():>14} {_or_dash(r.consul_requests_per_change):>7} "
            f"{_or_dash(r.consul_requests_per_idle_minute):>12} {_or_dash(agent.rpcs_per_change):>13} "
            f"{_or_dash(agent.server_queries_per_change):>9} {idle_rpcs:>18} {kb:>15}"
        )
    return "\n".join(rows)


def start_table(results: list[CatalogResult]) -> str:
    head = (
        f"{'services':>8} {'proto':>5} {'file s':>6} {'serve s':>7} {'start req/RPC':>13} {'first chg ms':>12} "
        f"{'failed/probe reqs':>17} "
        f"{'RSS MB':>6} {'idle CPU%':>9} {'rps':>6} {'load 1 min start/end':>20}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        rows.append(
            f"{r.services:>8} {protocol_cell(r):>5} {r.start_to_file_s:>6} {r.start_to_serving_s:>7} "
            f"{_or_dash(r.start_cost.renderer_requests) + '/' + _or_dash(r.start_cost.agent_rpcs):>13} "
            f"{ms_cell(r.first_change.max_ms, r.first_change.count):>12} "
            f"{f'{r.probe_failed_requests}/{r.probe_requests}':>17} {_or_dash(r.renderer_rss_mb):>6} "
            f"{r.renderer_idle_cpu_percent:>9} {_or_dash(r.frontend_rps):>6} "
            f"{f'{r.load_average_start[0]:.2f}/{r.load_average_end[0]:.2f}':>20}"
        )
    return "\n".join(rows)


def changes_table(results: list[CatalogResult]) -> str:
    head = (
        f"{'services':>8} {'proto':>5} {'changes':>7} {'n':>4} {'t/o':>4} {'add p50/p95/max':>16} "
        f"{'check fails':>14} {'check passes':>14} {'remove':>14} {'all':>14}"
    )
    rows = [head, "-" * len(head)]
    for r in results:
        for label in ("cold", "hot"):
            cold = label == "cold"
            kinds = [split.side(cold) for split in (r.add, r.check_fail, r.check_pass, r.remove)]
            total = r.all_changes.side(cold)
            cells = " ".join(f"{s.cell():>{w}}" for s, w in zip(kinds, (16, 14, 14, 14), strict=True))
            rows.append(
                f"{r.services:>8} {protocol_cell(r):>5} {label:>7} {total.count:>4} {total.timeouts:>4} {cells} "
                f"{total.cell():>14}"
            )
    return "\n".join(rows)


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"
