"""`make demo`: Consul dev agent + HAProxy (master-worker) + 3 demo web apps + the renderer, locally.

    python -m lab.demo              start everything; Ctrl-C stops everything it started
    python -m lab.demo add          start one more web app and register it
    python -m lab.demo remove ID    deregister a web app and stop it

State (logs, sockets, pid files, the rendered haproxy.cfg) lives in .run/demo/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import CHECKOUT
from lab.processes import (
    ConsulPorts,
    ManagedProcess,
    find_consul,
    free_port,
    http_get,
    spawn,
    start_consul_dev,
    wait_until,
)
from lab.stack import start_local_stack
from renderer.haproxy.binaries import find_haproxy, wheel_haproxy

RUN = CHECKOUT / ".run" / "demo"
STATE = RUN / "state.json"


def port_or_free(preferred: int) -> int:
    """The preferred port when it is free on loopback, else any free one."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


@dataclass(frozen=True)
class DemoPorts:
    http: int
    stats: int
    status: int
    consul: ConsulPorts

    @classmethod
    def choose(cls) -> DemoPorts:
        consul = ConsulPorts(port_or_free(8500), free_port(), free_port(), free_port(), free_port())
        return cls(port_or_free(8080), port_or_free(1936), port_or_free(9464), consul)


def start_webapp_process(consul_http: int, instance_id: str) -> ManagedProcess:
    """A demo web app that registers itself (`consul-renderer register -- …`), as in the compose stack."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "renderer", "register", "--consul-addr", f"127.0.0.1:{consul_http}",
        "--name", "web", "--id", instance_id, "--port", str(port), "--address", "127.0.0.1", "--tag", "lb",
        "--check-http", "/health", "--check-interval", "1s", "--deregister-critical-after", "1m",
        "--", sys.executable, "-m", "lab.webapp", "--port", str(port), "--id", instance_id,
    ]  # fmt: skip
    proc = spawn(instance_id, cmd, RUN / f"{instance_id}.log")
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, 10, f"{instance_id} to listen")
    (RUN / f"{instance_id}.pid").write_text(str(proc.pid))
    return proc


def load_state() -> dict[str, int]:
    try:
        return dict(json.loads(STATE.read_text()))
    except (OSError, ValueError) as err:
        raise SystemExit("no demo is running here (start it with `make demo`)") from err


def cmd_add() -> int:
    state = load_state()
    taken = {p.stem for p in RUN.glob("web-*.pid")}
    instance = next(f"web-{n}" for n in range(1, 1000) if f"web-{n}" not in taken)
    proc = start_webapp_process(state["consul_http"], instance)
    print(f"added {instance} (pid {proc.pid}); it gets traffic once its health check passes")
    return 0


def cmd_remove(instance: str) -> int:
    """SIGTERM to the instance's `register` wrapper: it deregisters first, then stops the app."""
    load_state()
    pid_file = RUN / f"{instance}.pid"
    if not pid_file.exists():
        raise SystemExit(f"no instance {instance} (see {RUN}/*.pid)")
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
    pid_file.unlink()
    print(f"removed {instance}")
    return 0


def already_running() -> int | None:
    """The pid of a demo still running from this checkout, if any."""
    try:
        pid = int(json.loads(STATE.read_text())["demo_pid"])
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError):
        return None
    return pid


def run_demo(instances: int) -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    other = already_running()
    if other is not None:
        print(f"a demo is already running here (pid {other}); stop it with Ctrl-C first", file=sys.stderr)
        return 1
    for stale in [*RUN.glob("*.pid"), *RUN.glob("*.log")]:
        stale.unlink()  # a fresh demo: no pid or log of an earlier run
    haproxy_bin = wheel_haproxy() or find_haproxy()
    ports = DemoPorts.choose()
    started: list[ManagedProcess] = []
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        print("starting Consul dev agent ...", flush=True)
        consul_agent = start_consul_dev(find_consul(), RUN / "consul.log", ports.consul, node="demo")
        started.append(consul_agent)
        STATE.write_text(json.dumps({"consul_http": ports.consul.http, "demo_pid": os.getpid()}))
        for n in range(1, instances + 1):
            started.append(start_webapp_process(ports.consul.http, f"web-{n}"))
        print("rendering the first haproxy.cfg, starting HAProxy and the renderer ...", flush=True)
        stack = start_local_stack(
            RUN,
            f"127.0.0.1:{ports.consul.http}",
            haproxy_bin,
            http_port=ports.http,
            stats_port=ports.stats,
            status_port=ports.status,
            extra_args=("--var", f"state_file={RUN / 'haproxy' / 'server-state'}"),
        )
        started += stack.processes
        config = stack.config_path
        print_banner(ports, config)
        # Web apps come and go on purpose (`remove`); only these three end the demo when they die.
        webapps = [p for p in started if p.name.startswith("web-")]
        tail_until(stack.renderer.log_path, stop, [consul_agent, *stack.processes], webapps)
    except (RuntimeError, TimeoutError) as err:
        print(f"the demo could not start: {err}", file=sys.stderr)
        return 1
    finally:
        print("\nstopping everything the demo started ...", flush=True)
        for pid_file in RUN.glob("web-*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            pid_file.unlink()
        for proc in reversed(started):
            proc.stop()
        STATE.unlink(missing_ok=True)
        for stale in RUN.glob("*.sock"):  # HAProxy leaves its master socket behind
            stale.unlink()
        alive = [p.name for p in started if p.alive()]
        print(
            f"still running: {', '.join(alive)}"
            if alive
            else f"demo stopped: all {len(started)} processes it started have exited; logs stay in {RUN}/",
            flush=True,
        )
    return 0


def print_banner(ports: DemoPorts, config: Path) -> None:
    py = Path(sys.executable)
    print(
        f"""
  Operator's page     http://127.0.0.1:{ports.status}/       (what is served, what changed, when and why;
                      at a glance: {py} -m renderer status --changes --status-addr 127.0.0.1:{ports.status})
  Load-balanced app   http://127.0.0.1:{ports.http}/        (try: curl -s http://127.0.0.1:{ports.http}/)
  HAProxy stats       http://127.0.0.1:{ports.stats}/       (Prometheus: /metrics)
  Consul UI           http://127.0.0.1:{ports.consul.http}/ui/
  Renderer status     http://127.0.0.1:{ports.status}/status   (JSON; metrics: /metrics)
  Rendered config     {config}
  Logs                {RUN}/

  Add an instance     {py} -m lab.demo add
  Remove an instance  {py} -m lab.demo remove web-2

  Ctrl-C stops everything. The renderer's log follows:
""",
        flush=True,
    )


def tail_until(
    log_path: Path, stop: threading.Event, procs: list[ManagedProcess], reap: Sequence[ManagedProcess] = ()
) -> None:
    """Print the renderer's log as it grows until Ctrl-C or one of `procs` dies; web apps in `reap`
    that were removed meanwhile are reaped at once (no zombie until the demo ends)."""
    with open(log_path, errors="replace") as handle:
        while not stop.is_set():
            line = handle.readline()
            if line:
                print(line, end="", flush=True)
                continue
            for proc in reap:
                proc.popen.poll()
            dead = [p for p in procs if not p.alive()]
            if dead:
                print(f"{dead[0].name} exited ({dead[0].popen.returncode}); see {dead[0].log_path}", flush=True)
                return
            stop.wait(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="start the demo (the default)")
    run.add_argument("--instances", type=int, default=3)
    sub.add_parser("add", help="add one web app instance")
    remove = sub.add_parser("remove", help="remove a web app instance")
    remove.add_argument("instance")
    args = parser.parse_args()
    if args.command == "add":
        return cmd_add()
    if args.command == "remove":
        return cmd_remove(args.instance)
    return run_demo(getattr(args, "instances", 3))


if __name__ == "__main__":
    sys.exit(main())
