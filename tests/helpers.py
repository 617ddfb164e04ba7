"""Helpers for integration tests: Consul registration, an HTTP load loop, the renderer as a process."""

from __future__ import annotations

import collections
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import consul

from renderer.demo.processes import ManagedProcess, free_port, http_get, spawn, start_haproxy, wait_until
from renderer.demo.webapp import WebApp

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = REPO / "templates" / "haproxy.cfg.j2"


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


def renderer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "renderer", *args]


@dataclass
class Stack:
    """HAProxy + the renderer (a real process) on a Consul agent, with the default template."""

    consul: ManagedProcess
    haproxy: ManagedProcess
    renderer: ManagedProcess
    config_path: Path
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"


def start_stack(
    tmp_path: Path,
    agent: ManagedProcess,
    haproxy_bin: str,
    track: Callable[[ManagedProcess], ManagedProcess],
    template: Path = DEFAULT_TEMPLATE,
    extra: tuple[str, ...] = (),
) -> Stack:
    """Render once (`--once`), start HAProxy on the result, then run the renderer against it."""
    http_port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy" / "haproxy.cfg"
    cfg.parent.mkdir(exist_ok=True)
    master = tmp_path / "master.sock"
    common = (
        "--consul-addr", str(agent.extra["http_addr"]), "--template", f"{template}:{cfg}",
        "--var", f"http_port={http_port}", "--var", "bind_address=127.0.0.1",
        "--var", f"stats_port={stats_port}", "--haproxy-bin", haproxy_bin, "--wait", "20ms:100ms", *extra,
    )  # fmt: skip
    once = track(spawn("renderer-once", renderer_command("run", "--once", *common), tmp_path / "renderer-once.log"))
    wait_until(lambda: once.popen.poll() is not None, 30, "the first render (--once)")
    assert once.popen.returncode == 0, once.log_text()
    haproxy = track(start_haproxy(haproxy_bin, cfg, master, tmp_path / "haproxy.log"))
    run_cmd = renderer_command("run", *common, "--haproxy-master-socket", str(master), "--log-level", "debug")
    renderer = track(spawn("renderer", run_cmd, tmp_path / "renderer.log"))
    wait_until(lambda: "watching Consul" in renderer.log_text(), 20, "the renderer to start")
    return Stack(agent, haproxy, renderer, cfg, http_port)


def wait_log(proc: ManagedProcess, text: str, timeout: float = 20) -> None:
    wait_until(lambda: text in proc.log_text(10**7), timeout, f"{text!r} in the log of {proc.name}")


def monotonic_ms() -> float:
    return time.monotonic() * 1000
