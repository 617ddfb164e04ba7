"""HAProxy plus the renderer on a Consul agent, as local processes: shared by the demo, tests and bench.

The order matters: render once (`--once`) so HAProxy starts on a real config, start HAProxy in
master-worker mode on it, then run the renderer against HAProxy's master socket.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab import CHECKOUT
from lab.processes import ManagedProcess, free_port, http_get, spawn, start_haproxy, wait_until

DEFAULT_TEMPLATE = CHECKOUT / "templates" / "haproxy.cfg.j2"
ROUTES_TEMPLATE = CHECKOUT / "templates" / "routes.map.j2"


def routing_args(config_dir: Path) -> tuple[str, ...]:
    """The routing map (rendered first, beside haproxy.cfg) and the variable that points at it."""
    routes = config_dir / "routes.map"
    return ("--template", f"{ROUTES_TEMPLATE}:{routes}", "--var", f"routes_map={routes}")


def renderer_command(*args: str, allow_local: bool = True) -> list[str]:
    """`python -m renderer ARGS`. The labs, the demo, the bench and the tests run their web apps on
    this host (127.0.0.1), which the renderer refuses as server addresses unless allowed: a `run`
    allows local addresses, unless `allow_local` is false (to see them refused)."""
    allowed = ("--allow-local-addresses", "true") if allow_local and args[:1] == ("run",) else ()
    return [sys.executable, "-m", "renderer", *args[:1], *allowed, *args[1:]]


@dataclass
class LocalStack:
    haproxy: ManagedProcess
    renderer: ManagedProcess
    config_path: Path
    master_socket: Path
    http_port: int
    stats_port: int
    status_port: int
    processes: list[ManagedProcess] = field(default_factory=list)
    host: str = "127.0.0.1"  # where the caller reaches the frontend and the status server

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}/"

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()


def start_local_stack(
    workdir: Path,
    consul_addr: str,
    haproxy_bin: str,
    template: Path = DEFAULT_TEMPLATE,
    http_port: int | None = None,
    stats_port: int | None = None,
    status_port: int | None = None,
    extra_args: tuple[str, ...] = (),
    on_start: Callable[[ManagedProcess], ManagedProcess] = lambda proc: proc,
    wrap: Callable[[list[str]], list[str]] = list,
    bind_address: str = "127.0.0.1",
    host: str = "127.0.0.1",
    relative_paths: bool = False,
) -> LocalStack:
    """Start HAProxy and the renderer; `on_start` sees every process as soon as it exists.

    The lab runs the stack on its own host: `wrap` runs each command inside that host's network
    namespace, everything binds `bind_address` there, and `host` is where the caller reaches it.
    With `relative_paths`, every process runs in `workdir` and the rendered files name each other
    relative to it: two load balancers with directories of their own render byte-identical files."""
    http_port = http_port or free_port()
    stats_port = stats_port or free_port()
    status_port = status_port or free_port()
    config = workdir / "haproxy" / "haproxy.cfg"
    config.parent.mkdir(parents=True, exist_ok=True)
    master = workdir / "haproxy-master.sock"
    cwd = workdir if relative_paths else None
    named = config.relative_to(workdir) if relative_paths else config  # as the rendered files name it
    common = (
        "--consul-addr", consul_addr, *routing_args(named.parent), "--template", f"{template}:{named}",
        "--var", f"http_port={http_port}", "--var", f"bind_address={bind_address}", "--var", f"stats_port={stats_port}",
        "--haproxy-bin", haproxy_bin, *extra_args,
    )  # fmt: skip
    started: list[ManagedProcess] = []
    try:
        once_cmd = wrap(renderer_command("run", "--once", *common))
        once = on_start(spawn("renderer-once", once_cmd, workdir / "once.log", cwd=cwd))
        started.append(once)
        wait_until(lambda: once.popen.poll() is not None, 60, "the first render (--once)")
        if once.popen.returncode != 0:
            raise RuntimeError(f"the first render failed:\n{once.log_text()}")
        haproxy = on_start(start_haproxy(haproxy_bin, named, master, workdir / "haproxy.log", wrap=wrap, cwd=cwd))
        started.append(haproxy)
        cmd = renderer_command(
            "run", *common, "--haproxy-master-socket", str(master), "--status-addr", f"{bind_address}:{status_port}"
        )
        renderer = on_start(spawn("renderer", wrap(cmd), workdir / "renderer.log", cwd=cwd))
        started.append(renderer)
        ready = f"http://{host}:{status_port}/ready"
        wait_until(lambda: renderer.alive() and http_get(ready)[0] == 200, 30, "the renderer to render and apply")
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        raise
    # The --once process has finished its job: the stack is HAProxy and the running renderer.
    return LocalStack(haproxy, renderer, config, master, http_port, stats_port, status_port, [haproxy, renderer], host)
