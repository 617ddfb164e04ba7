"""An answer over max_answer_bytes, made by one registrant, against the real stack.

Before, the key was retried as a failure forever: a service's answer made too large (many
instances) froze every later render of its template, the renderer reported Consul as down, and
the answer was downloaded again after every backoff. Now the key keeps its last answer or, if it
never had one, is served as having no data, reported, and everything else goes on.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ManagedProcess, get_json, http_get, wait_until
from lab.stack import start_local_stack
from lab.webapp import WebApp
from tests.helpers import Load, register, start_stack

pytestmark = pytest.mark.integration


def put(agent: ManagedProcess, path: str, body: Any) -> None:
    request = urllib.request.Request(
        f"http://{agent.extra['http_addr']}{path}", data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def fat_service(agent: ManagedProcess, name: str, instances: int, meta_keys: int = 4) -> None:
    """`instances` instances of `name` (lb-tagged, `meta_keys` × 500 bytes of meta each), 32 to a
    transaction."""
    ops = [
        {"Service": {"Verb": "set", "Node": "fat-node", "Service": {
            "ID": f"{name}-{i}", "Service": name, "Address": "127.0.0.1", "Port": 1, "Tags": ["lb"],
            "Meta": {f"k{j}": "v" * 500 for j in range(meta_keys)},
        }}}
        for i in range(instances)
    ]  # fmt: skip
    put(agent, "/v1/catalog/register", {"Node": "fat-node", "Address": "127.0.0.1"})
    for start in range(0, len(ops), 32):  # under the 512 KB a transaction may carry
        put(agent, "/v1/txn", ops[start : start + 32])


@pytest.mark.parametrize("protocol", ["HTTP/1.1", "HTTP/2"])
def test_a_service_made_too_large_leaves_the_rest_served_and_consul_not_reported_down(
    tmp_path: Path,
    protocol: str,
    request: pytest.FixtureRequest,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    consul_agent: ManagedProcess = request.getfixturevalue("consul_agent" if protocol == "HTTP/1.1" else "tls_agent")
    register(consul_agent, backends("web-0"))
    limit = ("--max-answer-bytes", "200000")
    if protocol == "HTTP/1.1":
        stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=limit)
    else:  # the HTTPS port: HTTP/2 streams, each answer's size counted as its frames come
        https, ca = consul_agent.extra["https_port"], str(consul_agent.extra["ca_file"])
        stack = start_local_stack(
            tmp_path, f"https://127.0.0.1:{https}", haproxy_bin, on_start=track,
            extra_args=("--wait", "20ms:100ms", "--log-level", "debug", "--ca-file", ca, *limit),
        )  # fmt: skip
        assert "HTTP/2" in stack.renderer.log_text(10**7)
    wait_until(lambda: http_get(stack.url)[0] == 200, 30, "the first instance served")
    load = Load(stack.url).start()
    try:
        fat_service(consul_agent, "zzfat", 64, meta_keys=16)  # ~520 KB: over the limit from its first answer
        fresh = backends("web-1")
        register(consul_agent, fresh, check=False)
        load.wait_for(fresh.state.instance_id, timeout=20)  # later changes are still rendered and applied
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    # web itself grows past the limit (its fat instances point nowhere: no load from here on); it had
    # an answer, which it keeps (the transactions' first ones fit, and are served)
    fat_service(consul_agent, "web", 150)  # ~2.2 KB each: the first 32 fit, and 64
    later = backends("api-1")
    register(consul_agent, later, check=False, name="api")
    wait_until(lambda: "backend api" in stack.config_path.read_text() or None, 20, "api rendered")
    assert stack.renderer.alive() and stack.haproxy.alive()
    # web's large answer may come after api's small one: its note is at the render after it
    status_url = f"http://127.0.0.1:{stack.status_port}/status"
    wait_until(lambda: "its last answer is served" in json.dumps(get_json(status_url)), 20, "web's oversize note")
    config = stack.config_path.read_text()
    assert "backend zzfat" in config and "zzfat-0" not in config  # served as having no data
    web = config.split("\nbackend web\n", 1)[1].split("\nbackend ", 1)[0]
    assert "web-0" in web and "web-1" in web and "fat-node_web-149" not in web  # its last answer, kept
    status = get_json(status_url)
    assert isinstance(status, dict)
    text = json.dumps(status)
    assert "max_answer_bytes (200000 bytes)" in text and "its last answer is served" in text, text[:2000]
    assert "served as having no data" in text
    assert status["watch_errors"] == 0  # Consul answered: never a failure, never retried as one
    log = stack.renderer.log_text(10**8)
    assert "failing for" not in log and "never giving up" not in log
