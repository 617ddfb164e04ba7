"""The shipped least-privilege policy (consul/acl/renderer-policy.hcl) on an agent with ACLs in
default deny: the renderer renders, registers itself, serves; when its token is revoked mid-run it
keeps serving the last good config, reports the refusal, and does not exit."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab import CHECKOUT
from lab.processes import ManagedProcess, http_get, start_consul_dev, wait_until
from lab.webapp import WebApp
from tests.helpers import start_stack

pytestmark = pytest.mark.integration

MASTER = "root-secret-for-tests"
ACL = f'acl {{ enabled = true, default_policy = "deny", tokens {{ master = "{MASTER}", agent = "{MASTER}" }} }}'


def api(agent: ManagedProcess, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    request = urllib.request.Request(
        f"http://{agent.extra['http_addr']}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"X-Consul-Token": MASTER},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        text = answer.read()
    return json.loads(text) if text else None


def test_least_privilege_token_renders_registers_and_survives_revocation(
    tmp_path: Path,
    consul_bin: str,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    backends: Callable[[str], WebApp],
) -> None:
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", hcl=(ACL,)))
    rules = (CHECKOUT / "consul" / "acl" / "renderer-policy.hcl").read_text()
    # Right after its election the agent answers 500 until its ACL system is up: "not yet".
    wait_until(lambda: api(agent, "PUT", "/v1/acl/policy", {"Name": "consul-renderer", "Rules": rules}), 30, "ACLs up")
    token = api(agent, "PUT", "/v1/acl/token", {"Policies": [{"Name": "consul-renderer"}]})
    (tmp_path / "token").write_text(token["SecretID"])
    app = backends("web-a")
    service = {"ID": "web-a", "Name": "web", "Address": "127.0.0.1", "Port": app.port, "Tags": ["lb"]}
    api(agent, "PUT", "/v1/agent/service/register", service)
    stack = start_stack(tmp_path, agent, haproxy_bin, track, extra=("--token-file", str(tmp_path / "token")))
    wait_until(lambda: http_get(stack.url)[1].strip() == "web-a", 30, "web-a served with the renderer's token")
    wait_until(
        lambda: any(s["Service"] == "consul-renderer" for s in api(agent, "GET", "/v1/agent/services").values()),
        30,
        "the renderer registered itself with the same token",
    )
    assert token["SecretID"] not in stack.renderer.log_text(10**7)

    api(agent, "DELETE", f"/v1/acl/token/{token['AccessorID']}")  # revoked mid-run
    app_b = backends("web-b")
    api(agent, "PUT", "/v1/agent/service/register", {**service, "ID": "web-b", "Port": app_b.port})
    wait_until(lambda: "ACL permission denied" in stack.renderer.log_text(10**7), 90, "the refusal reported")
    for _ in range(20):  # the last good config keeps serving; the renderer and HAProxy run on
        assert http_get(stack.url)[1].strip() == "web-a"
    assert stack.renderer.alive() and stack.haproxy.alive()
    assert token["SecretID"] not in stack.renderer.log_text(10**7)
