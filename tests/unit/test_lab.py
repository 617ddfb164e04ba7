"""The lab's own logic: reading the load log, and how a host wraps a command."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import netns
from lab.netns import Host, Network, NetworkError
from lab.observe import Window
from lab.processes import wait_until
from tests.helpers import Pace


def test_window_counts_only_its_own_time_span(tmp_path: Path) -> None:
    log = tmp_path / "load.jsonl"
    records = [
        {"t": 10.0, "ok": {"a": 5}, "slowest_ms": 900.0},
        {"t": 11.0, "url": "a", "error": "HTTP 503"},
        {"t": 12.0, "ok": {"a": 7, "b": 3}, "slowest_ms": 12.0},
        {"t": 20.0, "url": "b", "error": "ConnectionResetError()"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"t": 21.0, "ok"')  # a line being written
    window = Window.read(log, 10.5, 15.0)
    assert (window.ok, window.failed, window.errors, window.slowest_ms) == (10, 1, ("a: HTTP 503",), 12.0)
    assert Window.read(log, 0, 100).failed == 2


def test_window_of_a_load_not_started_yet_is_empty(tmp_path: Path) -> None:
    assert Window.read(tmp_path / "missing.jsonl", 0, 1) == Window(0, 0, (), 0.0)


def test_a_host_runs_commands_in_its_namespace_by_exec() -> None:
    host = Host("web1", "10.231.0.31")
    assert host.command(["consul", "agent"]) == ["ip", "netns", "exec", "crl-web1", "consul", "agent"]


def test_a_failed_assertion_inside_a_poll_fails_at_once_as_itself(pace: Pace) -> None:
    calls = []

    def probe() -> bool:
        calls.append(1)
        assert len(calls) > 5, "the status says critical"
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="the status says critical"):
        wait_until(probe, 10, "a status")
    assert len(calls) == 1 and time.monotonic() - started < pace(1)


def test_not_yet_is_retried_and_the_timeout_names_the_last_error() -> None:
    def probe() -> bool:
        raise ConnectionRefusedError("nothing listens")

    with pytest.raises(TimeoutError, match=r"waiting for a server \(last error: ConnectionRefusedError"):
        wait_until(probe, 0.2, "a server")


def test_a_lost_change_fails_with_the_balancer_named() -> None:
    from tests.integration.test_cluster import Lab

    figures = {"add_ms": {"lb1": [5.0, float("nan"), 7.0], "lb2": [6.0]}}
    with pytest.raises(AssertionError, match="a change never reached lb1"):
        Lab.slowest(figures)
    assert Lab.slowest({"add_ms": {"lb1": [5.0, 7.0]}}) == 7.0


@pytest.fixture
def fake_ip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """`ip`, iptables and the removal recorded instead of run; the owner file under tmp_path."""
    calls: list[str] = []
    monkeypatch.setattr(netns, "OWNER_FILE", tmp_path / "owner.pid")
    monkeypatch.setattr(netns, "ip", lambda *args, check=True: calls.append(" ".join(args)))
    monkeypatch.setattr(netns, "_allow_bridge_forwarding", lambda allow: None)
    monkeypatch.setattr(netns, "remove_all", lambda: calls.append("remove_all"))
    return calls


def test_a_run_refused_the_network_leaves_the_owners_hosts_alone(fake_ip: list[str]) -> None:
    """Two test runs at once: the second is refused, and its cleanup (Cluster.stop after a failed
    start) must not remove the first run's namespaces."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        netns.OWNER_FILE.write_text(str(owner.pid))
        network = Network()
        network.add("srv1", 11)
        with pytest.raises(NetworkError, match=f"another lab run \\(pid {owner.pid}\\)"):
            network.create()
        network.destroy()
        assert fake_ip == []
        assert netns.OWNER_FILE.read_text() == str(owner.pid)
    finally:
        owner.kill()
        owner.wait()


def test_a_network_claimed_is_removed_once(fake_ip: list[str]) -> None:
    network = Network()
    network.add("srv1", 11)
    network.create()
    assert fake_ip[0] == "remove_all"  # leftovers of a dead run taken over first
    assert any(call.startswith("netns add crl-srv1") for call in fake_ip)
    fake_ip.clear()
    network.destroy()
    network.destroy()
    assert fake_ip == ["remove_all"]
