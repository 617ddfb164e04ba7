"""The Consul agent of a scale run, by the protocol the renderer speaks to it, and what it counts.

`http`: the agent's plain HTTP port, HTTP/1.1 (blocking queries within the connection budget,
catalog-wide queries and sweeps past it). `h2`: the same agent also serves HTTPS (a CA and a
server certificate made with `consul tls`), and the renderer is pointed at that port; it then
holds every watched key's blocking query as an HTTP/2 stream. Either way the bench's own changes
and the catalog's filling use the plain HTTP port, and the agent keeps Prometheus telemetry
(cumulative counters, read from its plain port) so that a run can say what it cost Consul:
`consul.client.rpc` counts every RPC the agent made to its server (each read the renderer asked
for, and each write the bench's changes synced), `consul.rpc.query` the reads the server ran.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from lab.processes import ManagedProcess, free_port, http_get, start_consul_dev
from lab.tls import make_agent_tls

# Cumulative counters on /v1/agent/metrics?format=prometheus (the in-memory sink's JSON holds only
# the current 10 s interval).
TELEMETRY = 'telemetry { prometheus_retention_time = "24h" }'
AGENT_RPCS = "consul_client_rpc"
SERVER_QUERIES = "consul_rpc_query"
RENDERER_REQUESTS = "consul_renderer_consul_requests_total"
RENDERER_ANSWER_BYTES = "consul_renderer_consul_answer_bytes_total"
NEGOTIATED = re.compile(r"watching Consul at \S+ over (HTTP/[\d.]+)")


class Protocol(StrEnum):
    """How the renderer talks to the agent (`--protocols`)."""

    HTTP = "http"  # the plain HTTP port, HTTP/1.1
    H2 = "h2"  # the HTTPS port, HTTP/2 by ALPN

    @property
    def expected(self) -> str:
        """What the renderer should log having negotiated."""
        return "HTTP/2" if self == Protocol.H2 else "HTTP/1.1"


def parse_protocols(text: str) -> list[Protocol]:
    """`http,h2` → [HTTP, H2], in the order given, each once; an unknown name raises ValueError
    naming the known ones."""
    chosen: list[Protocol] = []
    for word in (w.strip() for w in text.split(",")):
        try:
            protocol = Protocol(word)
        except ValueError:
            known = ", ".join(p.value for p in Protocol)
            raise ValueError(f"unknown protocol {word!r} in --protocols (known: {known})") from None
        if protocol not in chosen:
            chosen.append(protocol)
    return chosen


@dataclass(frozen=True)
class Agent:
    """A dev agent; the renderer reaches it at `renderer_port` with `renderer_args`."""

    process: ManagedProcess
    protocol: Protocol
    http_port: int  # plain HTTP: the bench's registrations and changes, the telemetry
    renderer_port: int  # where the renderer's connections go (the connection sampler watches it)
    renderer_args: tuple[str, ...]  # --consul-addr and, over TLS, --ca-file


def start_agent(consul_bin: str, workdir: Path, protocol: Protocol, block_wait: str = "") -> Agent:
    """A fresh `consul agent -dev` with default limits and telemetry; over `h2` it serves HTTPS too.
    `block_wait`: the renderer's `--block-wait`, and the agent's `max_query_time` to match (as an
    operator raises it on the servers); empty: both at their defaults."""
    hcl: tuple[str, ...] = (TELEMETRY,)
    if block_wait:
        hcl += (f'max_query_time = "{block_wait}"',)
    waits = ("--block-wait", block_wait) if block_wait else ()
    ca_file: Path | None = None
    https_port = 0
    if protocol == Protocol.H2:
        tls = make_agent_tls(consul_bin, workdir / "tls")
        https_port, ca_file = free_port(), tls.ca_file
        hcl += tls.hcl(https_port)
    process = start_consul_dev(consul_bin, workdir / "consul.log", hcl=hcl)
    http_port = int(str(process.extra["http_addr"]).rsplit(":", 1)[1])
    if ca_file is None:
        return Agent(process, protocol, http_port, http_port, ("--consul-addr", f"127.0.0.1:{http_port}", *waits))
    args = ("--consul-addr", f"https://127.0.0.1:{https_port}", "--ca-file", str(ca_file), *waits)
    return Agent(process, protocol, http_port, https_port, args)


def prometheus_counter(text: str, name: str) -> float | None:
    """The value of counter `name` in Prometheus text, summed over its label sets; None when absent
    (a counter the agent has not incremented yet is absent too: the caller decides what that means)."""
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
    values = [float(v) for v in pattern.findall(text)]
    return sum(values) if values else None


@dataclass(frozen=True)
class AgentCounts:
    """The agent's cumulative counters at one moment (None: not readable)."""

    rpcs: float | None
    server_queries: float | None


def agent_counts(http_port: int) -> AgentCounts:
    status, text = http_get(f"http://127.0.0.1:{http_port}/v1/agent/metrics?format=prometheus", timeout=5)
    if status != 200:
        return AgentCounts(None, None)
    # Absent before the first RPC: 0 then, since the telemetry itself is on.
    return AgentCounts(prometheus_counter(text, AGENT_RPCS) or 0.0, prometheus_counter(text, SERVER_QUERIES) or 0.0)


def renderer_counters(status_port: int) -> tuple[int | None, int | None]:
    """The renderer's counts of requests to Consul and of the answers' bytes; None where its
    /metrics does not say."""
    _, text = http_get(f"http://127.0.0.1:{status_port}/metrics")
    counts = (prometheus_counter(text, RENDERER_REQUESTS), prometheus_counter(text, RENDERER_ANSWER_BYTES))
    requests, answer_bytes = (None if value is None else int(value) for value in counts)
    return requests, answer_bytes


def negotiated(renderer_log: str) -> str | None:
    """The protocol the renderer says it watches Consul over ("HTTP/2", "HTTP/1.1"); None if unsaid."""
    match = NEGOTIATED.search(renderer_log)
    return match.group(1) if match else None
