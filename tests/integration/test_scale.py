"""A catalog past both walls (the client's pool and the agent's per-client limit), on a default agent.

300 services is past aiohttp's default pool of 100 and past the agent's
`limits.http_max_conns_per_client` of 200, which is where one blocking query per service stops
working. The renderer must still render everything, hold no more connections than its budget at
any moment (sampled throughout, from its first render to past the sweeps a change sets off), and
bring a change to the last service to HAProxy promptly, with no refusal from Consul in its log.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, http_get, wait_until
from lab.webapp import WebApp
from tests.helpers import ConnectionSampler, register, start_stack

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
SERVICES = 300
INSTANCES = 2
SAFETY_SWEEP_S = 6.0  # a located change is followed by a safety sweep within 5 s (README)


def fill_catalog(agent: ManagedProcess, services: int, instances: int) -> None:
    """Register services × instances on made-up nodes (closed ports: they need not answer)."""
    url = f"http://{agent.extra['http_addr']}/v1/catalog/register"
    for i in range(services):
        for j in range(instances):
            body = {
                "Node": f"filler-{j}",
                "Address": "127.0.0.1",
                "Service": {"ID": f"svc-{i:03d}-{j}", "Service": f"svc-{i:03d}", "Tags": ["lb"], "Port": 9 + j},
                "Checks": [
                    {"CheckID": f"c-{i}-{j}", "Name": "c", "Status": "passing", "ServiceID": f"svc-{i:03d}-{j}"}
                ],
            }
            request = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert resp.status == 200


def test_change_to_last_of_300_services_arrives_within_budget(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    fill_catalog(consul_agent, SERVICES, INSTANCES)
    agent_port = int(str(consul_agent.extra["http_addr"]).rsplit(":", 1)[1])
    # Connections are sampled from before the first renderer starts to past the safety sweep that
    # follows the change: the budget holds at the peak, not only in one reading at the end.
    sampler = ConnectionSampler(agent_port).start()
    try:
        began = time.monotonic()
        stack = start_stack(
            tmp_path,
            consul_agent,
            haproxy_bin,
            lambda proc: sampler.watch(track(proc)),
            extra=("--max-connections", "32"),
        )
        config = stack.config_path.read_text()
        assert config.count("\nbackend svc-") == SERVICES

        last = f"svc-{SERVICES - 1:03d}"
        app = backends(f"{last}-live")
        register(consul_agent, app, name=last)
        url = f"{stack.url.rstrip('/')}/{last}/"
        wait_until(lambda: http_get(url)[1].strip() == f"{last}-live", 10, f"the new {last} instance through HAProxy")
        served = time.monotonic()
        wait_until(lambda: sampler.last_sample > served + SAFETY_SWEEP_S, 30, "sampling past the safety sweep")
    finally:
        sampler.stop()
    assert sampler.first_sample < began and sampler.samples >= 100, (sampler.first_sample, began, sampler.samples)
    assert set(sampler.peak) == {"renderer-once", "renderer", "haproxy"}, sampler.peak
    for name in ("renderer-once", "renderer"):
        assert 0 < sampler.peak[name] <= 32, f"{name}: {sampler.peak[name]} connections to the agent at once, budget 32"
    print(f"\npeak connections to the agent over {sampler.samples} samples: {sampler.peak}")
    log = stack.renderer.log_text(10**7)
    for refusal in ("http_max_conns_per_client", "Too Many Requests", "closed the connection"):
        assert refusal not in log
