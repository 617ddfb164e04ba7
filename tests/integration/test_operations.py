"""What operators see (metrics, status, the Consul check) and the security settings, against real processes."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ConsulPorts, ManagedProcess, free_port, http_get, spawn, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command
from lab.webapp import WebApp
from tests.helpers import consul_client, loopback_ports, register, start_stack, wait_log

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def renderer_check(agent: ManagedProcess) -> tuple[str, str]:
    checks = consul_client(agent).agent.checks()
    check = next(c for c in checks.values() if c["ServiceName"] == "consul-renderer")
    return check["Status"], check["Output"]


def test_metrics_status_and_consul_check_follow_the_renderer(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    template = tmp_path / "haproxy.cfg.j2"
    template.write_text(
        DEFAULT_TEMPLATE.read_text().replace(
            "defaults\n", "defaults\n{% if key_or_default('break') %}    bogus 1\n{% endif %}", 1
        )
    )
    register(consul_agent, backends("web-a"), check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, template=template)
    base = f"http://127.0.0.1:{stack.status_port}"
    web_b = backends("web-b")
    register(consul_agent, web_b, check=False)
    wait_until(
        lambda: 'consul_renderer_applies_total{kind="runtime"}' in http_get(f"{base}/metrics")[1], 20, "a runtime apply"
    )
    metrics = http_get(f"{base}/metrics")[1]
    for name in (
        "consul_renderer_renders_total", "consul_renderer_failures_total", "consul_renderer_watch_errors_total",
        "consul_renderer_convergence_seconds_bucket", "consul_renderer_last_success_timestamp_seconds",
        "consul_renderer_consul_requests_total", "consul_renderer_consul_answer_bytes_total",
    ):  # fmt: skip
        assert name in metrics
    assert http_get(f"{base}/ready")[0] == 200
    wait_until(lambda: renderer_check(consul_agent)[0] == "passing", 30, "the TTL check passing")
    # What is served, as an operator reads it in the Consul UI and from `consul-renderer status`.
    # The check follows the renderer within STATUS_POLL_S (1 s) of the apply the metric showed: waited
    # for (CI once read it in that second and saw the state before), within a bound a few times that.
    applied = f"{stack.config_path.name}: 1 backend(s), 2 server(s); last applied by "

    def shows_the_apply() -> str | None:
        output = renderer_check(consul_agent)[1]
        return output if applied in output else None

    output = wait_until(shows_the_apply, 5, "the check's output to show the apply")
    assert "ms after the Consul change" in output
    consul_client(consul_agent).agent.service.register("web", service_id="web-bad", address="not a host!", port=80)
    wait_until(lambda: "instance 'web-bad'" in renderer_check(consul_agent)[1], 30, "the left-out instance")
    state, output = renderer_check(consul_agent)
    assert state == "warning" and "field Address: 'not a host!' is not an IPv4 or IPv6 address" in output, output
    glance = subprocess.run(
        renderer_command("status", "--status-addr", f"127.0.0.1:{stack.status_port}"), capture_output=True, text=True
    ).stdout
    assert f"serving  {stack.config_path}: 1 backend(s), 2 server(s)" in glance, glance
    assert "left out service web, instance 'web-bad'" in glance, glance
    changes = subprocess.run(
        renderer_command("status", "--status-addr", f"127.0.0.1:{stack.status_port}", "--changes"),
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "haproxy.cfg runtime " in changes and f"added web/dev_web-b 127.0.0.1:{web_b.port}" in changes, changes
    assert "keys health.service(web)@" in changes and "change(s): median" in changes, changes
    consul_client(consul_agent).agent.service.deregister("web-bad")
    wait_until(lambda: renderer_check(consul_agent)[0] == "passing", 30, "the check passing once web-bad is gone")

    consul_client(consul_agent).kv.put("break", "1")  # validation fails → warning naming the template
    wait_until(lambda: renderer_check(consul_agent)[0] == "warning", 30, "the TTL check warning")
    assert str(stack.config_path) in renderer_check(consul_agent)[1]
    assert 'consul_renderer_failures_total{reason="validation"} 1.0' in http_get(f"{base}/metrics")[1]
    status = subprocess.run(
        renderer_command("status", "--status-addr", f"127.0.0.1:{stack.status_port}"), capture_output=True, text=True
    )
    assert status.returncode == 1 and status.stdout.startswith("warning") and "validation" in status.stdout

    consul_client(consul_agent).kv.delete("break")
    stack.haproxy.stop()  # HAProxy unreachable → critical
    register(consul_agent, backends("web-c"), check=False)
    wait_until(lambda: renderer_check(consul_agent)[0] == "critical", 40, "the TTL check critical")
    assert "HAProxy" in renderer_check(consul_agent)[1]
    snapshot = json.loads(http_get(f"{base}/status")[1])
    assert snapshot["check"] == "critical" and snapshot["failures"]["reload"] >= 1


def test_consul_over_tls_with_client_certificates(tmp_path: Path, consul_bin: str, track: Track) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for args in (
        ["ca", "create"],
        ["cert", "create", "-server", "-dc", "dc1"],
        ["cert", "create", "-client", "-dc", "dc1"],
    ):
        subprocess.run([consul_bin, "tls", *args], cwd=certs, check=True, capture_output=True)
    ports, https = ConsulPorts.free(), free_port()
    tls = (
        f'ports {{ https = {https} }}', f'ca_file = "{certs}/consul-agent-ca.pem"',
        f'cert_file = "{certs}/dc1-server-consul-0.pem"', f'key_file = "{certs}/dc1-server-consul-0-key.pem"',
        "verify_incoming_https = true",
    )  # fmt: skip
    from lab.processes import start_consul_dev

    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", ports, hcl=tls))
    register(agent, _FakeApp(8080), check=False)
    dest = tmp_path / "haproxy.cfg"
    once = subprocess.run(
        renderer_command(
            "run",
            "--once",
            "--consul-addr",
            f"https://127.0.0.1:{https}",
            "--ca-file",
            f"{certs}/consul-agent-ca.pem",
            "--cert-file",
            f"{certs}/dc1-client-consul-0.pem",
            "--key-file",
            f"{certs}/dc1-client-consul-0-key.pem",
            "--template",
            f"{DEFAULT_TEMPLATE}:{dest}",
            *loopback_ports(),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert once.returncode == 0, once.stderr
    assert "127.0.0.1:8080" in dest.read_text()
    # Without a client certificate Consul refuses the connection: the renderer retries, it never renders.
    refused = track(
        spawn(
            "renderer-no-cert",
            renderer_command(
                "run",
                "--once",
                "--consul-addr",
                f"https://127.0.0.1:{https}",
                "--ca-file",
                f"{certs}/consul-agent-ca.pem",
                "--template",
                f"{DEFAULT_TEMPLATE}:{tmp_path / 'other.cfg'}",
            ),
            tmp_path / "no-cert.log",
        )
    )
    wait_log(refused, "failed (attempt")
    assert not (tmp_path / "other.cfg").exists()


class _FakeApp:
    """Just enough of a WebApp for `register` (nothing listens; checks are off)."""

    def __init__(self, port: int) -> None:
        self.port = port

        class State:
            instance_id = "web-tls"

        self.state = State()


def test_stats_page_needs_credentials_and_sockets_are_private(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-a"), check=False)
    runtime = tmp_path / "runtime.sock"
    stack = start_stack(
        tmp_path, consul_agent, haproxy_bin, track,
        extra=("--var", "stats_auth=admin:s3cret", "--var", f"runtime_socket={runtime}"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{stack.stats_port}/"
    assert http_get(url)[0] == 401
    request = urllib.request.Request(
        url, headers={"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200
    for sock in (stack.master_socket, runtime):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600, sock


def test_stale_data_turns_the_check_warning_then_critical_while_the_last_good_config_serves(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-a"), check=False)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--max-data-age", "2s"))
    base = f"http://127.0.0.1:{stack.status_port}"

    def consul() -> dict[str, Any]:
        state = json.loads(http_get(f"{base}/status")[1])
        return {**state["consul"], "check": state["check"], "output": state["output"]}

    assert consul()["freshness"] == "fresh" and consul()["data_age_s"] == 0
    consul_agent.stop()  # Consul gone: the renderer keeps its data and HAProxy its config
    wait_until(lambda: consul()["check"] == "warning", 10, "the check warning past max_data_age")
    assert consul()["output"].startswith("no answer from Consul at http://"), consul()["output"]
    wait_until(lambda: consul()["check"] == "critical", 10, "the check critical past twice max_data_age")
    state = consul()
    assert state["freshness"] == "critical" and state["data_age_s"] >= 4 and state["failing"] >= 1, state
    assert "refused the connection" in state["output"] and "the last good config keeps serving" in state["output"]
    metrics = http_get(f"{base}/metrics")[1]
    assert "consul_renderer_data_stale 2.0" in metrics and "consul_renderer_max_data_age_seconds 2.0" in metrics
    age = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("consul_renderer_data_age_")))
    assert age >= 4, metrics
    answer = http_get(stack.url)
    assert answer[0] == 200 and answer[1].strip() == "web-a", answer
    glance = subprocess.run(
        renderer_command("status", "--status-addr", f"127.0.0.1:{stack.status_port}"), capture_output=True, text=True
    )
    assert glance.returncode == 1 and "stale    no answer from Consul" in glance.stdout, glance.stdout


def test_the_page_and_status_ask_for_status_auth_and_metrics_do_not(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-a"), check=False)
    token = "0f1e2d3c-not-for-the-page"
    stack = start_stack(
        tmp_path, consul_agent, haproxy_bin, track, extra=("--status-auth", "ops:s3cret-pw", "--token", token)
    )
    base = f"http://127.0.0.1:{stack.status_port}"
    for path in ("/", "/status", f"/diff?template={stack.config_path}"):
        assert http_get(f"{base}{path}")[0] == 401, path
    assert http_get(f"{base}/metrics")[0] == 200 and http_get(f"{base}/ready")[0] == 200
    status_cmd = renderer_command("status", "--status-addr", f"127.0.0.1:{stack.status_port}")
    refused = subprocess.run(status_cmd, capture_output=True, text=True)
    assert refused.returncode == 3 and "--status-auth" in refused.stderr, refused.stderr
    glance = subprocess.run([*status_cmd, "--status-auth", "ops:s3cret-pw"], capture_output=True, text=True)
    assert glance.returncode == 0 and "serving  " in glance.stdout, glance.stdout + glance.stderr
    request = urllib.request.Request(
        f"{base}/status", headers={"Authorization": "Basic " + base64.b64encode(b"ops:s3cret-pw").decode()}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert token not in resp.read().decode()
    # Off loopback without a login the renderer does not start.
    exposed = subprocess.run(
        renderer_command("run", "--template", f"{DEFAULT_TEMPLATE}:{tmp_path / 'x.cfg'}", "--status-addr", "0.0.0.0:1"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert exposed.returncode == 2 and "is not a loopback address: set status_auth" in exposed.stderr, exposed.stderr
