"""Helpers for integration tests: Consul registration, an HTTP load loop, the renderer as a process."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import consul

from lab.processes import ManagedProcess, get_json, http_get, wait_until
from lab.stack import DEFAULT_TEMPLATE, LocalStack, start_local_stack
from lab.webapp import WebApp


def loopback_ports() -> tuple[str, ...]:
    """--var flags that put the default template's frontend and stats on free loopback ports."""
    from lab.processes import free_port

    return (
        "--var",
        f"http_port={free_port()}",
        "--var",
        f"stats_port={free_port()}",
        "--var",
        "bind_address=127.0.0.1",
    )


def consul_client(agent: ManagedProcess) -> consul.Consul:
    host, port = str(agent.extra["http_addr"]).split(":")
    return consul.Consul(host=host, port=int(port))


def register(
    agent: ManagedProcess,
    app: WebApp,
    name: str = "web",
    tags: tuple[str, ...] = ("lb",),
    meta: dict[str, str] | None = None,
    check: bool = True,
) -> str:
    """Register a backend with the agent, with an HTTP check on /health every second."""
    service_id = app.state.instance_id
    check_def = None
    if check:
        check_def = {"HTTP": f"http://127.0.0.1:{app.port}/health", "Interval": "1s", "Timeout": "1s"}
    consul_client(agent).agent.service.register(
        name, service_id=service_id, address="127.0.0.1", port=app.port, tags=list(tags), meta=meta, check=check_def
    )
    return service_id


@dataclass
class Load:
    """A background loop of GETs against one URL, counting answers per instance and every failure."""

    url: str
    seen: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    ok: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _mark: int = 0

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = http_get(self.url, timeout=5)
            except OSError as err:
                self.failures.append(repr(err))
                continue
            if status == 200:
                self.ok += 1
                self.seen[body.strip()] += 1
            else:
                self.failures.append(f"HTTP {status}: {body.strip()[:80]}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)

    def reset_seen(self) -> None:
        self.seen.clear()

    def wait_for(self, instance: str, timeout: float = 20) -> None:
        self.reset_seen()
        wait_until(lambda: self.seen[instance] > 0, timeout, f"responses from {instance}")

    def wait_gone(self, instance: str, timeout: float = 20, settle: int = 50) -> None:
        """Wait until `settle` consecutive-ish answers came without `instance`."""

        def gone() -> bool:
            if self.seen[instance] > 0:
                self.reset_seen()
                return False
            return sum(self.seen.values()) >= settle

        self.reset_seen()
        wait_until(gone, timeout, f"{instance} to get no traffic")


def start_stack(
    tmp_path: Path,
    agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    template: Path = DEFAULT_TEMPLATE,
    extra: tuple[str, ...] = (),
) -> LocalStack:
    """HAProxy + the renderer (real processes, debug logs) on `agent`, every process tracked."""
    args = ("--wait", "20ms:100ms", "--log-level", "debug", *extra)
    return start_local_stack(
        tmp_path, str(agent.extra["http_addr"]), haproxy_bin, template, extra_args=args, on_start=track
    )


def wait_log(proc: ManagedProcess, text: str, timeout: float = 20) -> None:
    wait_until(lambda: text in proc.log_text(10**7), timeout, f"{text!r} in the log of {proc.name}")


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def reloads(stack: LocalStack) -> int:
    """How many reloads the stack's renderer has done (its `/status`)."""
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    return int(status["applies"].get("reload", 0))


def served_servers(stack: LocalStack, backend: str) -> set[str]:
    """The server names the renderer reports as applied in `backend` of the stack's config."""
    status = get_json(f"http://127.0.0.1:{stack.status_port}/status")
    assert isinstance(status, dict)
    for served in status["served"].values():
        for listed in served["listing"]:
            if listed["name"] == backend:
                return {server["name"] for server in listed["servers"]}
    return set()


def settled_reloads(stack: LocalStack, backend: str, servers: set[str], timeout: float = 20) -> int:
    """The reload count once the renderer reports `backend` applied with exactly `servers`:
    a request through HAProxy can succeed a moment before the renderer counts the reload."""
    wait_until(lambda: served_servers(stack, backend) == servers, timeout, f"{backend} applied with {sorted(servers)}")
    return reloads(stack)
