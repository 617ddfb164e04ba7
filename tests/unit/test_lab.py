"""The lab's own logic: reading the load log, and how a host wraps a command."""

from __future__ import annotations

import json
from pathlib import Path

from lab.netns import Host
from lab.observe import Window


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
