"""Hitless updates against real HAProxy: membership via the Runtime API, structure via reload."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.processes import ManagedProcess, wait_until
from lab.webapp import WebApp
from renderer.haproxy.control import MasterCLI
from tests.helpers import Load, Pace, consul_client, register, runtime_servers, start_stack, wait_log

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]


def passing(agent: ManagedProcess, count: int, name: str = "web") -> None:
    c = consul_client(agent)
    wait_until(lambda: len(c.health.service(name, passing=True)[1]) == count, 20, f"{count} passing {name}")


def test_add_and_remove_under_load_without_reload(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    apps = {n: backends(n) for n in ("web-a", "web-b", "web-c")}
    register(consul_agent, apps["web-a"])
    register(consul_agent, apps["web-b"])
    passing(consul_agent, 2)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    master = MasterCLI(str(stack.master_socket))
    before = master.show_proc()
    load = Load(stack.url).start()
    try:
        load.wait_for("web-b")
        register(consul_agent, apps["web-c"])
        load.wait_for("web-c")
        consul_client(consul_agent).agent.service.deregister("web-a")
        load.wait_gone("web-a")
    finally:
        load.stop()
    wait_log(stack.renderer, "runtime: remove web/")  # logged once `del server` went through
    # Gone from HAProxy itself, not only from traffic: deleted once its connections closed.
    wait_until(lambda: runtime_servers(stack, "web") == {"dev_web-b", "dev_web-c"}, 10, "web-a deleted from HAProxy")
    after = master.show_proc()
    assert (after.reloads, after.workers[0]) == (before.reloads, before.workers[0])
    assert load.failures == []
    log = stack.renderer.log_text(10**7)
    assert "runtime: add web/" in log and "runtime: remove web/" in log
    assert "HAProxy reloaded" not in log


def test_structural_change_reloads_without_failed_request(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-a"))
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    master = MasterCLI(str(stack.master_socket))
    before = master.show_proc()
    load = Load(stack.url).start()
    try:
        load.wait_for("web-a")
        register(consul_agent, backends("api-a"), name="api")  # a new service: a new backend
        wait_until(lambda: "backend api" in stack.config_path.read_text(), 20, "backend api rendered")
        wait_until(lambda: master.show_proc().reloads == before.reloads + 1, 20, "one reload")
        load.wait_for("web-a")
    finally:
        load.stop()
    assert load.failures == []


def test_refused_runtime_operation_falls_back_to_reload(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """A step HAProxy refuses that the plan could not foresee (here an operator added a server of
    the same name by hand through the Runtime API) falls back to a reload of the checked file."""
    register(consul_agent, backends("web-a"))
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    master = MasterCLI(str(stack.master_socket))
    master.worker_command("add server web/dev_web-b 127.0.0.1:9")  # by hand: the name the renderer will use
    before = master.show_proc()
    register(consul_agent, backends("web-b"))
    wait_log(stack.renderer, "runtime update failed, falling back to a reload")
    wait_until(lambda: master.show_proc().reloads == before.reloads + 1, 20, "the fallback reload")
    assert "web-b" in stack.config_path.read_text()


def test_a_registrants_balance_takes_servers_through_the_runtime_api_or_is_refused(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    """helper-130 (/tmp/rev76): a registrant's `haproxy_balance static-rr` (or `source`, a static
    hash) made HAProxy refuse every `add server` in its backend, so each flip of one instance's
    health reloaded HAProxy (17 reloads in a minute). `source` comes with `hash-type consistent` now
    (servers added with no reload), and `static-rr` is refused (the default stays, a note says why)."""
    register(consul_agent, backends("web-a"), meta={"haproxy_balance": "source"})
    register(consul_agent, backends("api-a"), name="api", meta={"haproxy_balance": "static-rr"})
    passing(consul_agent, 1)
    passing(consul_agent, 1, "api")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    config = stack.config_path.read_text()
    assert "backend web\n    balance source\n    hash-type consistent\n" in config
    assert "backend api\n    balance roundrobin\n" in config and "static-rr" not in config
    wait_log(stack.renderer, "'static-rr' takes no server through the Runtime API")
    master = MasterCLI(str(stack.master_socket))
    before = master.show_proc()
    register(consul_agent, backends("web-b"), meta={"haproxy_balance": "source"})
    register(consul_agent, backends("api-b"), name="api", meta={"haproxy_balance": "static-rr"})
    wait_log(stack.renderer, "runtime: add web/")
    wait_log(stack.renderer, "runtime: add api/")
    assert master.show_proc().reloads == before.reloads
    assert "falling back to a reload" not in stack.renderer.log_text(10**7)


def test_an_instance_moved_between_two_spellings_of_its_address_changes_nothing(
    tmp_path: Path,
    consul_agent: ManagedProcess,
    haproxy_bin: str,
    track: Track,
    backends: Callable[[str], WebApp],
    pace: Pace,
) -> None:
    """helper-131 (/tmp/rev77): an instance re-registered between `::ffff:127.0.0.1` and
    `::ffff:7f00:1` was a `set server addr` HAProxy answered "no need to change", read as a
    refusal: a reload each time (17 in a minute). One spelling per address: nothing to apply."""
    app = backends("web-a")
    register(consul_agent, app)
    passing(consul_agent, 1)
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track)
    client = consul_client(consul_agent)
    moves = ("::ffff:127.0.0.1", "::ffff:7f00:1", "::FFFF:7F00:1")
    for address in moves:
        client.agent.service.register("web", service_id="web-a", address=address, port=app.port, tags=["lb"])
    wait_until(lambda: "[::ffff:127.0.0.1]" in stack.config_path.read_text(), 20, "the move rendered")
    master = MasterCLI(str(stack.master_socket))
    before, config = master.show_proc(), stack.config_path.read_text()
    for n in range(6):
        client.agent.service.register("web", service_id="web-a", address=moves[n % 3], port=app.port, tags=["lb"])
    time.sleep(pace(1.0))  # the renderer's --wait is 100 ms at most: these moves were read and rendered
    assert stack.config_path.read_text() == config and master.show_proc().reloads == before.reloads
    assert "falling back to a reload" not in stack.renderer.log_text(10**7)


def test_server_state_survives_a_reload(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Callable[[str], WebApp]
) -> None:
    register(consul_agent, backends("web-a"))
    register(consul_agent, backends("web-b"))
    passing(consul_agent, 2)
    state_file = tmp_path / "server-state"
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=("--var", f"state_file={state_file}"))
    master = MasterCLI(str(stack.master_socket))
    name = next(line.split()[1] for line in stack.config_path.read_text().splitlines() if "web-b" in line)
    # An operator puts web-b in maintenance and changes web-a's weight by hand.
    master.worker_command(f"disable server web/{name}")
    web_a = name.replace("web-b", "web-a")
    master.worker_command(f"set server web/{web_a} weight 42")
    before = master.show_proc()
    register(consul_agent, backends("api-a"), name="api")  # structural: a reload
    wait_until(lambda: master.show_proc().reloads == before.reloads + 1, 20, "a reload")
    state = master.worker_command("show servers state web")
    rows = {line.split()[3]: line.split() for line in state.splitlines()[2:] if line.strip()}
    assert rows[name][6] == "1", state  # srv_admin_state: forced maintenance kept
    assert rows[web_a][7] == "42", state  # srv_uweight kept
    assert state_file.exists()
