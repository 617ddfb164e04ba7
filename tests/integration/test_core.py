"""The core against real Consul and HAProxy: membership, health, outages, bad data, CLI modes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ConsulPorts, ManagedProcess, consul_leader, http_get, spawn, wait_until
from lab.stack import DEFAULT_TEMPLATE, renderer_command
from lab.webapp import WebApp
from tests.helpers import (
    Load,
    Pace,
    consul_client,
    loopback_ports,
    register,
    start_stack,
    wait_log,
)

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def test_membership_follows_consul_with_no_failed_request(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    apps = {name: backends(name) for name in ("web-a", "web-b", "web-c", "web-d")}
    for name in ("web-a", "web-b", "web-c"):
        register(consul_agent, apps[name])
    c = consul_client(consul_agent)
    wait_until(lambda: len(c.health.service("web", passing=True)[1]) == 3, 20, "3 passing instances")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    load = Load(stack.url).start()
    try:
        wait_until(lambda: {"web-a", "web-b", "web-c"} <= set(load.seen), 20, "traffic on all three")
        register(consul_agent, apps["web-d"])
        load.wait_for("web-d")
        c.agent.service.deregister("web-b")
        load.wait_gone("web-b")
        wait_until(lambda: load.ok > 100, 30, "100 requests through HAProxy")  # the changes may land sooner
    finally:
        load.stop()
    assert load.failures == []
    assert load.ok > 100


def test_failing_health_check_leaves_backend_and_returns(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    apps = [backends("web-a"), backends("web-b")]
    for app in apps:
        register(consul_agent, app)
    c = consul_client(consul_agent)
    wait_until(lambda: len(c.health.service("web", passing=True)[1]) == 2, 20, "2 passing instances")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    load = Load(stack.url).start()
    try:
        load.wait_for("web-b")
        apps[1].set_health(500)
        wait_until(lambda: "vm" and "web-b" not in stack.config_path.read_text(), 20, "web-b out of the file")
        load.wait_gone("web-b")
        apps[1].set_health(200)
        load.wait_for("web-b")
    finally:
        load.stop()
    # Requests that reached web-b between its check failing and its removal were still answered
    # (only /health fails), so no request may fail here either.
    assert load.failures == []


def test_consul_outage_keeps_haproxy_serving_and_changes_apply_after(
    tmp_path: Path, consul_bin: str, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    # A server agent with a data dir (not -dev), so a restart keeps the catalog, as in production.
    ports = ConsulPorts.free()
    data = tmp_path / "consul-data"
    cmd = [
        consul_bin, "agent", "-server", "-bootstrap-expect", "1", "-data-dir", str(data), "-node", "n1",
        "-bind", "127.0.0.1", "-client", "127.0.0.1", "-http-port", str(ports.http),
        "-dns-port", str(ports.dns), "-server-port", str(ports.server), "-serf-lan-port", str(ports.serf_lan),
        "-serf-wan-port", str(ports.serf_wan), "-hcl", "ports { grpc = -1 }",
    ]  # fmt: skip

    def start_consul(n: int) -> ManagedProcess:
        proc = track(spawn(f"consul-{n}", cmd, tmp_path / f"consul-{n}.log"))
        proc.extra["http_addr"] = f"127.0.0.1:{ports.http}"
        wait_until(lambda: consul_leader(ports.http), 60, "Consul leader")
        return proc

    agent = start_consul(1)
    apps = [backends("web-a"), backends("web-b")]
    for app in apps:
        register(agent, app, check=False)
    wait_until(lambda: len(consul_client(agent).health.service("web")[1]) == 2, 20, "2 instances")
    stack = start_stack(tmp_path, agent, haproxy_bin, track)
    load = Load(stack.url).start()
    try:
        load.wait_for("web-b")
        agent.stop()
        wait_log(stack.renderer, "failed (attempt", timeout=30)
        load.wait_for("web-a")  # HAProxy keeps serving the last configuration
        load.wait_for("web-b")
        agent = start_consul(2)
        apps.append(backends("web-c"))
        register(agent, apps[2], check=False)
        load.wait_for("web-c", timeout=60)
    finally:
        load.stop()
    assert stack.renderer.alive()
    assert load.failures == []
    assert "watch recovered" in stack.renderer.log_text(10**7)


def test_invalid_render_keeps_live_file_and_logs_haproxy_error(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    template = tmp_path / "haproxy.cfg.j2"
    source = DEFAULT_TEMPLATE.read_text()
    # A template that writes an unknown keyword once the KV key "break" exists.
    template.write_text(
        source.replace("defaults\n", "defaults\n{% if key_or_default('break') %}    bogus-keyword 1\n{% endif %}", 1)
    )
    register(consul_agent, backends("web-a"))
    c = consul_client(consul_agent)
    wait_until(lambda: c.health.service("web", passing=True)[1], 20, "web-a passing")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, template=template)
    before = stack.config_path.read_bytes()
    load = Load(stack.url).start()
    try:
        load.wait_for("web-a")
        c.kv.put("break", "yes")
        wait_log(stack.renderer, "bogus-keyword")
        load.wait_for("web-a")
    finally:
        load.stop()
    assert stack.config_path.read_bytes() == before
    log_text = stack.renderer.log_text(10**7)
    assert "haproxy -c rejected" in log_text and "unknown keyword 'bogus-keyword'" in log_text
    assert load.failures == []


def test_an_unsafe_registration_is_left_out_and_the_rest_served(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """One service owner's bad registration never freezes the load balancer for everyone."""
    good, evil = backends("web-a"), backends("web-evil")
    register(consul_agent, good)
    register(
        consul_agent, evil, tags=("lb", "x\nbackend injected"), meta={"weight": "1\nbackend injected2"}, check=False
    )
    c = consul_client(consul_agent)
    wait_until(lambda: len(c.health.service("web", passing=True)[1]) == 2, 20, "2 passing instances")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    text = stack.config_path.read_text()
    assert "injected" not in text and "web-evil" not in text and "web-a" in text
    log = stack.renderer.log_text(10**7)
    assert "left out service web, instance 'web-evil' on node 'dev', field Tags: character '\\n'" in log
    status = f"http://127.0.0.1:{stack.status_port}"
    metrics = http_get(f"{status}/metrics")[1]
    assert f'consul_renderer_left_out_instances{{template="{stack.config_path}"}} 1.0' in metrics

    def check_output() -> tuple[str, str]:
        checks = [ch for ch in c.agent.checks().values() if ch["ServiceName"] == "consul-renderer"]
        return (checks[0]["Status"], checks[0]["Output"]) if checks else ("", "")

    wait_until(lambda: "instance 'web-evil'" in check_output()[1], 20, "the check naming the instance")
    assert check_output()[0] == "warning"
    # Once the registration is fixed, the instance comes back and the check passes again.
    register(consul_agent, evil, check=False)
    wait_until(lambda: "web-evil" in stack.config_path.read_text(), 20, "web-evil back in the file")
    wait_until(lambda: check_output()[0] == "passing", 20, "the check passing again")

    # A custom template that prints raw tags renders the rest; one that asks to fail, fails.
    register(consul_agent, evil, tags=("lb", "y\rz"), check=False)
    raw = tmp_path / "raw.j2"
    raw.write_text("{% for i in service('web') %}{{ i.id }} {% for t in i.tags %}{{ t }} {% endfor %}\n{% endfor %}")
    out = tmp_path / "raw.out"
    addr = str(consul_agent.extra["http_addr"])
    wait_until(
        lambda: any("y\rz" in e["Service"]["Tags"] for e in c.health.service("web")[1]), 20, "the bad tag in Consul"
    )
    proc = subprocess.run(
        renderer_command("run", "--once", "--consul-addr", addr, "--template", f"{raw}:{out}"),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "web-a lb \n" and "field Tags: character '\\r'" in proc.stderr
    strict = tmp_path / "strict.toml"
    strict.write_text(
        f'[[template]]\nsource = "{raw}"\ndestination = "{tmp_path}/strict.out"\non_unsafe_value = "fail"\n'
    )
    proc = subprocess.run(
        renderer_command("run", "--once", "--consul-addr", addr, "--config", str(strict)),
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr
    assert "unsafe character '\\r' in service web, instance 'web-evil'" in proc.stderr
    assert not (tmp_path / "strict.out").exists()


def test_once_dry_and_check(tmp_path: Path, consul_agent: ManagedProcess, backends: Callable[[str], WebApp]) -> None:
    register(consul_agent, backends("web-a"), check=False)
    c = consul_client(consul_agent)
    wait_until(lambda: c.health.service("web")[1], 20, "web-a registered")
    addr = str(consul_agent.extra["http_addr"])
    dest = tmp_path / "haproxy.cfg"
    spec = f"{DEFAULT_TEMPLATE}:{dest}"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(renderer_command(*args), capture_output=True, text=True, timeout=60)

    dry = run("run", "--once", "--dry", "--consul-addr", addr, "--template", spec)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"> {dest}\n") and "server " in dry.stdout
    assert not dest.exists()

    ports = loopback_ports()
    once = run("run", "--once", "--consul-addr", addr, "--template", spec, *ports)
    assert once.returncode == 0, once.stderr
    assert f"bind 127.0.0.1:{ports[1].split('=')[1]}" in dest.read_text()

    ok = run("check", "--template", spec)  # check takes only the flags it uses (no --consul-addr)
    assert ok.returncode == 0 and "ok: 1 template" in ok.stdout

    bad = tmp_path / "bad.j2"
    bad.write_text("global\n{% for x in %}\n")
    undefined = tmp_path / "undefined.j2"
    undefined.write_text("line one\nport {{ no_such_var }}\n")
    both = run("check", "--template", f"{bad}:{tmp_path}/a", "--template", f"{undefined}:{tmp_path}/b")
    assert both.returncode == 4
    assert "bad.j2:2" in both.stderr and "undefined.j2:2" in both.stderr and "'no_such_var' is undefined" in both.stderr


def test_local_addresses_and_host_names_are_refused_unless_allowed(
    tmp_path: Path, consul_agent: ManagedProcess, backends: Callable[[str], WebApp]
) -> None:
    """A registration at 127.0.0.1 or at a host name is left out and reported (how to allow it
    named); the flag, or the environment, serves the loopback one."""
    app = backends("web-a")
    register(consul_agent, app, check=False)
    c = consul_client(consul_agent)
    c.agent.service.register("web", service_id="web-named", address="web-1.example.invalid", port=80, tags=["lb"])
    wait_until(lambda: len(c.health.service("web")[1]) == 2, 20, "both instances registered")
    addr = str(consul_agent.extra["http_addr"])
    dest = tmp_path / "haproxy.cfg"
    args = ("run", "--once", "--consul-addr", addr, "--template", f"{DEFAULT_TEMPLATE}:{dest}", *loopback_ports())

    def once(*extra: str, allow_local: bool = False, env: dict[str, str] | None = None) -> str:
        cmd = renderer_command(*args, *extra, allow_local=allow_local)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    refused = once()
    assert f"127.0.0.1:{app.port}" not in dest.read_text() and "web-1.example.invalid" not in dest.read_text()
    assert "field Address: '127.0.0.1' is refused: a local address" in refused
    assert "--allow-local-addresses true" in refused
    assert "field Address: 'web-1.example.invalid' is refused: a host name" in refused

    once(allow_local=True)  # as the labs run it: --allow-local-addresses true
    assert f"127.0.0.1:{app.port}" in dest.read_text() and "web-1.example.invalid" not in dest.read_text()
    dest.unlink()
    once(env={**os.environ, "CONSUL_RENDERER_ALLOW_LOCAL_ADDRESSES": "true"})
    assert f"127.0.0.1:{app.port}" in dest.read_text()


def exec_command(
    tmp_path: Path, agent: ManagedProcess, haproxy_bin: str, dest: Path, http_port: int, stats_port: int
) -> list[str]:
    """`run --exec-haproxy` of the default template into `dest`, on loopback ports, no status server."""
    return renderer_command(
        "run", "--exec-haproxy", "--haproxy-master-socket", str(tmp_path / "master.sock"),
        "--haproxy-bin", haproxy_bin, "--consul-addr", str(agent.extra["http_addr"]),
        "--template", f"{DEFAULT_TEMPLATE}:{dest}", "--var", f"http_port={http_port}",
        "--var", "bind_address=127.0.0.1", "--var", f"stats_port={stats_port}", "--status-addr", "off",
    )  # fmt: skip


def test_exec_haproxy_starts_reloads_and_stops_haproxy(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    from lab.processes import free_port, http_get

    register(consul_agent, backends("web-a"), check=False)
    http_port = free_port()
    dest = tmp_path / "haproxy" / "haproxy.cfg"
    dest.parent.mkdir()
    cmd = exec_command(tmp_path, consul_agent, haproxy_bin, dest, http_port, free_port())
    renderer = track(spawn("renderer-exec", cmd, tmp_path / "renderer.log"))
    url = f"http://127.0.0.1:{http_port}/"
    wait_until(lambda: http_get(url) == (200, "web-a\n"), 30, "HAProxy started by the renderer")
    register(consul_agent, backends("web-b"), check=False)
    seen: set[str] = set()
    wait_until(lambda: seen.add(http_get(url)[1].strip()) or "web-b" in seen, 30, "web-b through HAProxy")
    renderer.signal(signal.SIGTERM)
    renderer.popen.wait(10)
    assert renderer.popen.returncode == 0, renderer.log_text()
    assert "started HAProxy" in renderer.log_text()
    with pytest.raises(OSError):
        http_get(url, timeout=1)  # HAProxy stopped with it


def test_exec_haproxy_refuses_to_start_beside_a_master_left_running(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, pace: Pace
) -> None:
    """helper-150's F2: a renderer SIGKILLed leaves its HAProxy running (its parent gone); the next
    started a second one beside it (SO_REUSEPORT: both served the frontend, the old one on its old
    file for good) and left every TCP listener out as "in use". It stops now, saying what to do."""
    from lab.processes import free_port

    dest = tmp_path / "haproxy" / "haproxy.cfg"
    dest.parent.mkdir()
    left = tmp_path / "left.cfg"
    left.write_text(f"defaults\n    mode http\n    timeout client 5s\n    timeout server 5s\n    timeout connect 1s\n"
                    f"frontend f\n    bind 127.0.0.1:{free_port()}\n")  # fmt: skip
    master = tmp_path / "master.sock"
    orphan = track(spawn("haproxy-left", [haproxy_bin, "-W", "-S", f"{master},mode,600", "-f", str(left)],
                         tmp_path / "left.log"))  # fmt: skip
    wait_until(master.exists, pace(10), "the master socket")
    cmd = exec_command(tmp_path, consul_agent, haproxy_bin, dest, free_port(), free_port())
    renderer = track(spawn("renderer", cmd, tmp_path / "renderer.log"))
    assert renderer.popen.wait(pace(30)) == 6
    said = renderer.log_text()
    assert f"an HAProxy master (pid {orphan.popen.pid}) already answers at {master}" in said, said
    assert "kill -USR1" in said and not dest.exists() and orphan.popen.poll() is None


def test_exec_haproxy_starts_haproxy_again_on_its_own_file_and_around_a_port_taken_meanwhile(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    pace: Pace,
) -> None:
    """A restart of the renderer (systemd, a container's restart keeping its files) found the live
    file equal to its render and started no HAProxy ("already live when the renderer started", the
    check passing); and a port a program took while it was down (a TCP service's) failed HAProxy's
    start, the renderer exiting with it at every start. Now HAProxy starts on the file, checked
    whole, and a listener whose port another program holds is left out."""
    from lab.processes import free_port

    register(consul_agent, backends("web-a"), check=False)
    port = free_port()
    register(consul_agent, backends("db-1"), name="pg", meta={"haproxy_mode": "tcp", "haproxy_port": str(port)},
             check=False)  # fmt: skip
    http_port, stats_port = free_port(), free_port()
    dest = tmp_path / "haproxy" / "haproxy.cfg"
    dest.parent.mkdir()

    def start(name: str) -> ManagedProcess:
        cmd = exec_command(tmp_path, consul_agent, haproxy_bin, dest, http_port, stats_port)
        return track(spawn(name, cmd, tmp_path / f"{name}.log"))

    url = f"http://127.0.0.1:{http_port}/"
    for name in ("first", "restarted"):  # the second renders what the live file holds
        renderer = start(name)
        wait_until(lambda: http_get(url) == (200, "web-a\n"), pace(30), f"HAProxy started by the {name} renderer")
        assert f":{port}\n" in dest.read_text()
        renderer.signal(signal.SIGTERM)
        renderer.popen.wait(pace(10))
    with socket.socket() as daemon:  # a program takes the TCP service's port while the renderer is down
        daemon.bind(("127.0.0.1", port))
        daemon.listen()
        renderer = start("after-the-port-was-taken")
        wait_until(lambda: http_get(url) == (200, "web-a\n"), pace(30), "HAProxy started around the taken port")
        assert f":{port}\n" not in dest.read_text() and renderer.popen.poll() is None
        assert "listen 'pg': bind 127.0.0.1:" in renderer.log_text() and "already in use" in renderer.log_text()
