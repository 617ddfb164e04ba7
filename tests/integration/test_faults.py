"""Faults, one test per row of the reliability table: HAProxy keeps serving and nothing is lost."""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.processes import (
    ConsulPorts,
    ManagedProcess,
    free_port,
    http_get,
    spawn,
    start_consul_dev,
    start_haproxy,
    wait_until,
)
from lab.stack import DEFAULT_TEMPLATE, renderer_command
from lab.webapp import WebApp
from renderer.haproxy.control import check_config
from tests.helpers import Load, Pace, applies, consul_client, loopback_ports, register, start_stack, wait_log

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
Backends = Callable[[str], WebApp]


def passing(agent: ManagedProcess, count: int) -> None:
    c = consul_client(agent)
    wait_until(lambda: len(c.health.service("web", passing=True)[1]) == count, 20, f"{count} passing")


def test_consul_down_at_start_waits_not_ready_then_renders(
    tmp_path: Path, consul_bin: str, track: Track, backends: Backends
) -> None:
    ports = ConsulPorts.free()
    status_port = free_port()
    dest = tmp_path / "haproxy.cfg"
    cmd = renderer_command(
        "run", "--consul-addr", f"127.0.0.1:{ports.http}", "--template", f"{DEFAULT_TEMPLATE}:{dest}",
        *loopback_ports(), "--status-addr", f"127.0.0.1:{status_port}",
    )  # fmt: skip
    renderer = track(spawn("renderer", cmd, tmp_path / "renderer.log"))
    wait_log(renderer, "failed (attempt")
    assert http_get(f"http://127.0.0.1:{status_port}/ready")[0] == 503
    assert http_get(f"http://127.0.0.1:{status_port}/health")[0] == 200
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul.log", ports))
    register(agent, backends("web-a"), check=False)
    wait_until(lambda: dest.exists() and "web-a" in dest.read_text(), 60, "the first render once Consul is up")
    wait_until(lambda: http_get(f"http://127.0.0.1:{status_port}/ready")[0] == 200, 20, "/ready")
    assert renderer.alive()


def test_consul_restarted_fresh_index_backwards_guard_holds_and_recovers(
    tmp_path: Path, consul_bin: str, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    ports = ConsulPorts.free()
    agent = track(start_consul_dev(consul_bin, tmp_path / "consul-1.log", ports))
    apps = [backends("web-a"), backends("web-b")]
    for app in apps:
        register(agent, app, check=False)
    passing(agent, 2)
    stack = start_stack(tmp_path, agent, haproxy_bin, track)
    load = Load(stack.url).start()
    try:
        load.wait_for("web-b")
        agent.stop()  # a -dev agent keeps nothing: it comes back empty, with a lower index
        agent = track(start_consul_dev(consul_bin, tmp_path / "consul-2.log", ports))
        wait_log(stack.renderer, "guard: Consul reports 0 instance(s) of web", timeout=60)
        load.wait_for("web-a")  # the guard kept the last servers: still serving
        for app in apps:
            register(agent, app, check=False)
        load.wait_for("web-b", timeout=30)
        # Released at the first registration (leading edge) or at both (coalesced): either is right.
        wait_log(stack.renderer, "guard: service web back to")
    finally:
        load.stop()
    assert "Consul index went backwards" in stack.renderer.log_text(10**7)
    # The file follows what HAProxy runs once its check passed (write-behind): wait for it.
    wait_until(
        lambda: "web-a" in stack.config_path.read_text() and "web-b" in stack.config_path.read_text(),
        10,
        "both instances in the file on disk",
    )
    assert load.failures == []


def test_haproxy_not_running_clear_error_retries_without_crash_loop(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-a"))
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    stack.haproxy.stop()
    register(consul_agent, backends("web-b"), check=False)
    # The socket file may be gone ("does not exist") or left behind ("nothing accepts connections").
    wait_until(
        lambda: any(
            t in stack.renderer.log_text(10**7) for t in ("does not exist: is HAProxy", "HAProxy is not running")
        ),
        20,
        "a clear error about HAProxy",
    )
    wait_log(stack.renderer, "retrying the apply in 1.0s")  # backoff doubling, not a tight loop
    assert stack.renderer.alive()
    haproxy = track(start_haproxy(haproxy_bin, stack.config_path, stack.master_socket, tmp_path / "haproxy-2.log"))
    assert haproxy.alive()
    wait_until(lambda: http_get(stack.url)[0] == 200, 20, "HAProxy serving again")
    assert "web-b" in stack.config_path.read_text()


def test_failed_reload_is_reported_and_old_workers_keep_serving(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    # `haproxy -c` does not create sockets: a stats socket in a missing directory fails only at reload.
    template = tmp_path / "sock.j2"
    extra = "{% if key_or_default('socket_dir') %}    stats socket {{ key('socket_dir') }}/x.sock\n{% endif %}"
    template.write_text(
        DEFAULT_TEMPLATE.read_text().replace("    hard-stop-after 30s\n", "    hard-stop-after 30s\n" + extra)
    )
    register(consul_agent, backends("web-a"))
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, template=template)
    load = Load(stack.url).start()
    try:
        load.wait_for("web-a")
        consul_client(consul_agent).kv.put("socket_dir", str(tmp_path / "missing"))
        wait_log(stack.renderer, "HAProxy refused the reload; old workers keep serving")
        load.wait_for("web-a")
    finally:
        load.stop()
    assert "cannot bind UNIX socket" in stack.renderer.log_text(10**7)  # HAProxy's own words, reported
    assert load.failures == []
    assert stack.haproxy.alive()


def test_new_bind_on_a_busy_port_is_refused_before_the_reload(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    template = tmp_path / "bind.j2"
    extra = (
        "{% if key_or_default('extra_port') %}frontend extra\n    bind 127.0.0.1:{{ key('extra_port') }}\n{% endif %}"
    )
    template.write_text(DEFAULT_TEMPLATE.read_text() + extra)
    register(consul_agent, backends("web-a"))
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, template=template)
    before = stack.config_path.read_bytes()
    load = Load(stack.url).start()
    try:
        load.wait_for("web-a")
        consul_client(consul_agent).kv.put("extra_port", str(taken))
        wait_log(stack.renderer, f"bind 127.0.0.1:{taken} is already in use by another process")
        load.wait_for("web-a")
    finally:
        load.stop()
        busy.close()
    assert stack.config_path.read_bytes() == before
    assert "HAProxy reloaded" not in stack.renderer.log_text(10**7)
    assert load.failures == []


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_destination_full_or_read_only_keeps_live_file(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-a"), check=False)
    passing(consul_agent, 1)
    # Only the config directory is small: the renderer's log must stay writable to tell us.
    with tmpfs(tmp_path / "haproxy", "64k"):
        stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
        before = stack.config_path.read_bytes()
        filler = stack.config_path.parent / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:
            handle.write(b"x" * 10**6)  # fill the file system to the last block
        load = Load(stack.url).start()
        try:
            register(consul_agent, backends("web-b"), check=False)
            wait_log(stack.renderer, "the file system is full; the live file was left as it was")
            assert stack.config_path.read_bytes() == before
            filler.unlink()
            register(consul_agent, backends("web-c"), check=False)  # space again: catches up
            load.wait_for("web-c", timeout=30)
        finally:
            load.stop()
            stack.stop()
        assert load.failures == []
    # Read-only: a destination on a file system mounted read-only (nothing may hold a file open
    # there to remount it, so this half runs --once).
    with tmpfs(tmp_path / "ro", "64k") as ro:
        live = ro / "haproxy.cfg"
        live.write_text("# the live file\n")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        once = subprocess.run(
            renderer_command(
                "run",
                "--once",
                "--consul-addr",
                str(consul_agent.extra["http_addr"]),
                "--template",
                f"{DEFAULT_TEMPLATE}:{live}",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert once.returncode == 7, once.stderr
        assert "read-only" in once.stderr and "the live file was left as it was" in once.stderr
        assert live.read_text() == "# the live file\n"


def test_template_edited_with_syntax_error_keeps_old_then_picks_up_fix(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    template = tmp_path / "templates" / "haproxy.cfg.j2"
    template.parent.mkdir()
    template.write_text(DEFAULT_TEMPLATE.read_text())
    register(consul_agent, backends("web-a"), check=False)
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, template=template)
    template.write_text(DEFAULT_TEMPLATE.read_text() + "{% if %}\n")
    wait_log(stack.renderer, "new configuration or template rejected, keeping the running one")
    register(consul_agent, backends("web-b"), check=False)  # still rendered with the old template
    wait_until(lambda: "web-b" in stack.config_path.read_text(), 20, "web-b rendered with the old template")
    template.write_text(DEFAULT_TEMPLATE.read_text() + "# edited while running\n")
    wait_until(lambda: "# edited while running" in stack.config_path.read_text(), 20, "the fixed template")


def test_sigterm_during_render_or_reload_leaves_no_half_written_file(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    apps = [backends(f"web-{n}") for n in range(6)]
    register(consul_agent, apps[0], check=False)
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--apply", "reload"))
    c = consul_client(consul_agent)
    stop = threading.Event()

    def churn() -> None:
        n = 0
        while not stop.is_set():
            app = apps[1 + n % 5]
            register(consul_agent, app, check=False)
            c.agent.service.deregister(app.state.instance_id)
            n += 1

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        wait_log(stack.renderer, "HAProxy reloaded")
        started = time.monotonic()
        stack.renderer.signal(signal.SIGTERM)
        stack.renderer.popen.wait(10)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        churner.join(timeout=10)
    assert elapsed < pace(5), f"took {elapsed:.1f}s to stop ({pace.describe()})"
    leftovers = [p.name for p in stack.config_path.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    check_config(haproxy_bin, stack.config_path)  # the live file is whole and valid


def test_two_renderers_on_one_destination_only_one_writes(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    register(consul_agent, backends("web-a"), check=False)
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    second = subprocess.run(
        renderer_command(
            "run",
            "--consul-addr",
            str(consul_agent.extra["http_addr"]),
            "--status-addr",
            "off",
            "--template",
            f"{DEFAULT_TEMPLATE}:{stack.config_path}",
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 8
    assert f"another consul-renderer (pid {stack.renderer.pid}) already writes haproxy.cfg" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert stack.renderer.alive()


FLIPS = 30  # an instance's check flipping between failing and passing, every FLIP_S


def test_flapping_check_every_200ms_bounded_updates_no_failed_request(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """30 flips of a check, 200 ms apart, under `--wait 500ms:2s`: the flips come closer than
    wait.min, so the updates follow the burst's length over wait.max, not the number of flips
    (at most 7 for 6 s of flips, not 30). Every duration scales with the machine's pace."""
    flip_s, wait_min, wait_max = pace(0.2), pace(0.5), pace(2.0)
    c = consul_client(consul_agent)
    for name in ("web-a", "web-b"):
        register(consul_agent, backends(name), check=False)
    flappy = backends("web-flappy")
    c.agent.service.register(
        "web", service_id="web-flappy", address="127.0.0.1", port=flappy.port, tags=["lb"],
        check={"TTL": "10s", "Status": "passing"},
    )  # fmt: skip
    passing(consul_agent, 3)
    wait = f"{wait_min * 1000:.0f}ms:{wait_max * 1000:.0f}ms"
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--wait", wait))
    load = Load(stack.url).start()
    flipped: list[float] = []
    try:
        load.wait_for("web-flappy")
        before = applies(stack)
        started = time.monotonic()
        for flip in range(FLIPS):
            time.sleep(max(0.0, started + flip * flip_s - time.monotonic()))
            c.agent.check.ttl_fail("service:web-flappy") if flip % 2 == 0 else c.agent.check.ttl_pass(
                "service:web-flappy"
            )
            flipped.append(time.monotonic())
        c.agent.check.ttl_pass("service:web-flappy")
        # Until the last flip (passing) is applied: the file serves web-flappy and so does HAProxy.
        wait_until(lambda: "web-flappy" in stack.config_path.read_text(), 15, "the last flip applied")
        load.wait_for("web-flappy")
    finally:
        load.stop()
    updates = applies(stack) - before  # the renderer's own count (its log also says "last applied by")
    burst_s = flipped[-1] - started
    # Quiescence, as the loop does it: a flip after a quiet wait.min is applied at once (leading edge);
    # the flips after it are a burst, applied wait.max after its first. The next flip comes more than
    # wait.min after that burst began, so it is a leading edge again: at most two updates per
    # wait.max + one flip, and a flip late by more than wait.min (a slow Consul call) adds two.
    late = sum(1 for earlier, later in itertools.pairwise(flipped) if later - earlier >= wait_min)
    allowed = 2 * math.ceil(burst_s / (wait_max + flip_s)) + 1 + 2 * late
    figures = f"{updates} updates for {FLIPS} flips in {burst_s:.1f}s, {late} late (at most {allowed})"
    print(f"\nflapping: {figures}")
    assert updates <= allowed, figures
    assert load.failures == []


def test_sighup_rereads_config_and_keeps_running_on_a_broken_one(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    config = tmp_path / "renderer.toml"
    config.write_text('[vars]\nmaxconn = "3000"\n')
    register(consul_agent, backends("web-a"), check=False)
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--config", str(config)))
    assert "maxconn 3000" in stack.config_path.read_text()
    config.write_text('[vars]\nmaxconn = "2500"\n')
    stack.renderer.signal(signal.SIGHUP)
    wait_until(lambda: "maxconn 2500" in stack.config_path.read_text(), 20, "the new var after SIGHUP")
    config.write_text("[vars\n")  # broken TOML
    stack.renderer.signal(signal.SIGHUP)
    wait_log(stack.renderer, "new configuration or template rejected, keeping the running one")
    register(consul_agent, backends("web-b"), check=False)  # still rendering with the last good config
    wait_until(lambda: "web-b" in stack.config_path.read_text(), 20, "web-b with the running config")
    assert "maxconn 2500" in stack.config_path.read_text() and stack.renderer.alive()
