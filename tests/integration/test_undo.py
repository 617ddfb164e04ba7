"""A membership change goes to HAProxy through the Runtime API before its file is checked; when
`haproxy -c` then rejects the file, the renderer undoes the runtime change. Against a real HAProxy:
`show servers state` (read on HAProxy's own stats socket, throughout the run) never keeps the
rejected server, the live file stays the last good one, and it keeps serving, with no reload.

A real way a membership-only change passes the Runtime API and fails the file check: a file the
config references (an `errorfile`) removed between two renders: the check fails in `defaults`,
which nothing may leave out, so the rendered file stays rejected until it changes. (An instance
whose host name does not resolve was the other until fc8df08; a host-named server is added by
reload now, checked before anything reaches HAProxy: its line is left out, the rest applied.)
And after an undo, with nothing else happening, the renderer reports what it left out, names only
what HAProxy holds, and deletes an undone server that still had connections once they close.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.processes import ManagedProcess, get_json, wait_until
from lab.stack import LocalStack
from lab.webapp import WebApp
from tests.helpers import (
    Load,
    Pace,
    ServerStateSampler,
    consul_client,
    register,
    reloads,
    runtime_servers,
    served_servers,
    start_stack,
    wait_log,
)

pytestmark = pytest.mark.integration

Track = Callable[[ManagedProcess], ManagedProcess]
Backends = Callable[[str], WebApp]

UNRESOLVABLE = "ghost.invalid"  # RFC 6761: `.invalid` never resolves, on any resolver
GHOST = "dev_web-ghost"  # its server name (node `dev`, id `web-ghost`)


def status(stack: LocalStack) -> dict[str, Any]:
    answer = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(answer, dict)
    return answer


def test_an_unresolvable_host_named_server_never_reaches_haproxy_and_stays_out(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    """A server named by a host name is added by reload, never through the Runtime API (HAProxy
    2.8 resolves no name given there, helper-131): one that does not resolve fails the check before
    anything reaches HAProxy, its line is left out and reported, and the next membership change is
    hitless. (Before fc8df08 it was added at runtime, then undone when its file failed the check.)"""
    register(consul_agent, backends("web-a"), check=False)
    stats = tmp_path / "stats.sock"
    # Host names are refused by default (the address policy); this is the set-up that allows them.
    extra = ("--var", f"runtime_socket={stats}", "--allow-host-names", "true")
    stack = start_stack(tmp_path, consul_agent, haproxy_bin, track, extra=extra)
    wait_until(lambda: runtime_servers(stack, "web", stats) == {"dev_web-a"}, 20, "web-a in HAProxy")
    sampler = ServerStateSampler(stack, "web", stats).start(track)
    reloads_before = reloads(stack)
    load: Load | None = None
    try:
        consul_client(consul_agent).agent.service.register(
            "web", service_id="web-ghost", address=UNRESOLVABLE, port=80, tags=["lb"]
        )
        left_out = wait_until(lambda: status(stack)["left_out"], 20, "the rejected server line reported")
        assert UNRESOLVABLE in json.dumps(left_out), left_out
        load = Load(stack.url).start()
        load.wait_for("web-a")  # the last good config serves
        register(consul_agent, backends("web-b"), check=False)  # the next membership change: hitless
        load.wait_for("web-b")
        wait_until(lambda: "dev_web-b" in stack.config_path.read_text(), 20, "web-b in the live file")
        load.wait_for("web-a")
    finally:
        if load is not None:
            load.stop()
        sampler.stop()
    assert sampler.held(GHOST) == [], sampler.timeline
    assert runtime_servers(stack, "web", stats) == {"dev_web-a", "dev_web-b"}
    assert sampler.now() == {"dev_web-a", "dev_web-b"} and sampler.samples >= 10, sampler.samples
    assert UNRESOLVABLE not in stack.config_path.read_text()
    log = stack.renderer.log_text(10**7)
    assert f"runtime: add web/{GHOST} " not in log and "could not undo the runtime changes" not in log
    assert reloads(stack) == reloads_before
    assert load is not None and load.failures == [], load.failures[:5]


ERRORFILE_TEMPLATE = """\
global
    stats socket {{ runtime_socket }} mode 600 level admin
    httpclient.ssl.verify none
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    errorfile 503 {{ errorfile }}
    default-server pool-purge-delay 100ms
frontend http
    bind {{ bind_address }}:{{ http_port }}
    default_backend web
backend web
    balance leastconn
{%- for i in service("web") %}
    server {{ i.server_name }} {{ i.endpoint }}
{%- endfor %}
"""


def errorfile_stack(
    tmp_path: Path, agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> tuple[LocalStack, Path, Path]:
    """A stack on ERRORFILE_TEMPLATE serving web-a: (the stack, its stats socket, the errorfile)."""
    register(agent, backends("web-a"), check=False)
    errorfile = tmp_path / "503.http"
    errorfile.write_text("HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nno server\n")
    template = tmp_path / "haproxy.cfg.j2"
    template.write_text(ERRORFILE_TEMPLATE)
    stats = tmp_path / "stats.sock"
    extra = ("--var", f"runtime_socket={stats}", "--var", f"errorfile={errorfile}")
    stack = start_stack(tmp_path, agent, haproxy_bin, track, template=template, extra=extra)
    wait_until(lambda: runtime_servers(stack, "web", stats) == {"dev_web-a"}, 20, "web-a in HAProxy")
    return stack, stats, errorfile


def test_a_file_rejected_outside_any_backend_undoes_its_runtime_add_until_the_next_change(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends
) -> None:
    stack, stats, errorfile = errorfile_stack(tmp_path, consul_agent, haproxy_bin, track, backends)
    good = stack.config_path.read_text()
    reloads_before = reloads(stack)
    sampler = ServerStateSampler(stack, "web", stats).start(track)
    load = Load(stack.url).start()
    try:
        load.wait_for("web-a")
        errorfile.unlink()  # removed between two renders: the next file check fails in `defaults`
        register(consul_agent, backends("web-b"), check=False)
        wait_log(stack.renderer, "runtime: add web/dev_web-b ")
        wait_log(stack.renderer, "runtime: remove web/dev_web-b ")
        # Undone: in maintenance at once (no new request), deleted once the connections it had close.
        wait_until(lambda: sampler.now(active=True) == {"dev_web-a"}, 10, "web-b out of HAProxy's rotation")
        undone = time.monotonic()
        wait_until(lambda: sampler.now() == {"dev_web-a"}, 10, "web-b deleted from HAProxy")
        deleted = time.monotonic()
        problem = wait_until(lambda: status(stack)["problems"], 20, "the rejected file reported")
        assert "errorfile" in json.dumps(problem) and status(stack)["check"] != "passing", problem
        assert stack.config_path.read_text() == good  # the live file is the last good one
        load.wait_for("web-a")  # and it serves
        # The same content is not tried again, so nothing puts web-b back while the file stays bad.
        watched = sampler.samples
        wait_until(lambda: sampler.samples > watched + 200, 20, "HAProxy watched for a while after the undo")
        restored = time.monotonic()
        errorfile.write_text("HTTP/1.0 503 Service Unavailable\r\n\r\nback\n")
        register(consul_agent, backends("web-c"), check=False)  # a change: checked again, now it passes
        load.wait_for("web-c")
        load.wait_for("web-b")
    finally:
        load.stop()
        sampler.stop()
    active, held = sampler.held("dev_web-b", active=True), sampler.held("dev_web-b")
    assert not any(start < restored and end > undone for start, end in active), (active, undone, sampler.timeline)
    assert not any(start < restored and end > deleted for start, end in held), (held, deleted, sampler.timeline)
    assert runtime_servers(stack, "web", stats) == {"dev_web-a", "dev_web-b", "dev_web-c"}
    # The file is written behind the runtime change (its check runs at a lower CPU priority): it
    # catches up, and nothing undoes the runtime state meanwhile (asserted above and below).
    wait_until(
        lambda: {"dev_web-b", "dev_web-c"} <= set(stack.config_path.read_text().split()), 30, "the file written behind"
    )
    assert runtime_servers(stack, "web", stats) == {"dev_web-a", "dev_web-b", "dev_web-c"}  # nothing undone meanwhile
    assert "could not undo the runtime changes" not in stack.renderer.log_text(10**7)
    assert reloads(stack) == reloads_before
    assert load.failures == [], load.failures[:5]


def slow_check(tmp_path: Path, haproxy_bin: str, seconds: float) -> str:
    """HAProxy itself, whose `haproxy -c` takes `seconds` longer, as a large file's check does
    (~0.5 s at 10,000 servers, README): the window between a runtime add and its undo, in which
    the new server takes requests and has connections when the undo disables it."""
    wrapper = tmp_path / "haproxy-slow-check"
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" -c "*) sleep {seconds} ;; esac\nexec {shlex.quote(haproxy_bin)} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def test_after_an_undo_the_renderer_says_what_haproxy_holds_without_waiting_for_another_change(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """Nothing else happens after the undo: the renderer still reports the rejected file (the check
    is not passing) and names only the servers HAProxy holds (found failing on 2026-12-01: the
    write-behind's failure did not wake the loop, and /status kept the undone content as served).
    The undo comes from a file rejected in `defaults` (its errorfile removed): a host-named server,
    which this test used before, is no longer added at runtime (fc8df08)."""
    stack, stats, errorfile = errorfile_stack(tmp_path, consul_agent, haproxy_bin, track, backends)
    errorfile.unlink()
    register(consul_agent, backends("web-b"), check=False)
    wait_log(stack.renderer, "runtime: remove web/dev_web-b ")  # the check failed: undone
    wait_until(lambda: served_servers(stack, "web") == {"dev_web-a"}, pace(5), "/status naming what HAProxy holds")
    wait_until(lambda: runtime_servers(stack, "web", stats) == {"dev_web-a"}, pace(5), "web-b out of HAProxy")
    answer = wait_until(lambda: status(stack) if status(stack)["problems"] else None, pace(5), "the file reported")
    assert answer["check"] != "passing" and "errorfile" in answer["output"], answer["output"]


def test_an_undone_server_with_connections_is_deleted_once_they_close(
    tmp_path: Path, consul_agent: ManagedProcess, haproxy_bin: str, track: Track, backends: Backends, pace: Pace
) -> None:
    """The undo finds the new server busy: it is put in maintenance at once and deleted once its
    connections close, with nothing else happening (found failing on 2026-12-01: no cleanup was
    scheduled, and HAProxy kept the server until another change woke the renderer)."""
    slow = slow_check(tmp_path, haproxy_bin, 0.5)
    stack, stats, errorfile = errorfile_stack(tmp_path, consul_agent, slow, track, backends)
    # Slow requests back to back on 8 connections, leastconn: the new web-b takes the next ones while
    # its file is checked, still in flight when the undo disables it: `del server` must wait for them.
    loads = [Load(f"{stack.url}slow/400").start() for _ in range(8)]
    try:
        loads[0].wait_for("web-a")
        errorfile.unlink()
        register(consul_agent, backends("web-b"), check=False)
        wait_log(stack.renderer, "runtime: remove web/dev_web-b ")
    finally:
        for load in loads:
            load.stop()
    log = stack.renderer.log_text(10**7)
    assert "runtime: web/dev_web-b still has connections" in log, "the undo met no connection: this proves nothing"
    assert all(load.failures == [] for load in loads), [load.failures[:3] for load in loads]
    wait_until(lambda: "dev_web-b" not in runtime_servers(stack, "web", stats), pace(5), "web-b deleted")
