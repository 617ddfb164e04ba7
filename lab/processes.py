"""Local processes for the demo and the tests: a Consul dev agent and HAProxy in master-worker mode.

Every process writes its output to a log file, is polled for readiness with a deadline (never a
fixed sleep), and is stopped by PID (its process group as a backstop, for HAProxy's workers).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import consul

from renderer.errors import ReloadError
from renderer.haproxy.binaries import program_version
from renderer.haproxy.control import MasterCLI, ProcInfo

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free for both TCP and UDP (Serf and DNS use both): the probe sockets
    stay open until all are chosen, so the same port is never handed out twice."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            tcp = socket.socket()
            tcp.bind((host, 0))
            held.append(tcp)
            port = int(tcp.getsockname()[1])
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            try:
                udp.bind((host, port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


# What a probe may raise while the thing it waits for is not there yet: a refused or reset
# connection, a half-written file or JSON answer, a key not in an answer yet, Consul's own "not
# yet" (500 while it elects a leader). Anything else, an AssertionError above all, is a real
# failure and ends the wait at once.
NOT_YET: tuple[type[BaseException], ...] = (
    OSError, ValueError, LookupError, http.client.HTTPException, subprocess.TimeoutExpired, consul.ConsulException,
    ReloadError,
)  # fmt: skip


def wait_until(
    probe: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.02,
    not_yet: tuple[type[BaseException], ...] = NOT_YET,
) -> T:
    """Poll `probe` until it returns something truthy; raise TimeoutError naming `what` and the
    last "not yet" error. Only the `not_yet` exceptions are retried: a failed assertion or an
    unexpected error inside the probe propagates at once, as itself."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except not_yet as err:
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what} (last error: {last_error!r})")


@dataclass
class ManagedProcess:
    """A child process with its log file; `stop()` ends it by PID and reaps it."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self, tail: int = 20000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; also the process group (HAProxy's workers)."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.popen.returncode


def spawn(
    name: str,
    cmd: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    pass_fds: tuple[int, ...] = (),
) -> ManagedProcess:
    """Start `cmd` in its own process group with stdout and stderr going to `log_path` (and
    `pass_fds` left open in it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        popen = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
        )
    return ManagedProcess(name, popen, log_path)


@dataclass(frozen=True)
class ConsulPorts:
    http: int
    dns: int
    server: int
    serf_lan: int
    serf_wan: int

    @classmethod
    def free(cls) -> ConsulPorts:
        return cls(*free_ports(5))


def consul_dev_command(
    binary: str, ports: ConsulPorts, node: str = "dev", data_dir: Path | None = None, hcl: tuple[str, ...] = ()
) -> list[str]:
    """`consul agent -dev` on loopback with every port chosen; gRPC off (not needed, avoids 8502)."""
    cmd = [
        binary, "agent", "-dev", "-node", node, "-bind", "127.0.0.1", "-client", "127.0.0.1",
        "-http-port", str(ports.http), "-dns-port", str(ports.dns), "-server-port", str(ports.server),
        "-serf-lan-port", str(ports.serf_lan), "-serf-wan-port", str(ports.serf_wan),
        "-hcl", "ports { grpc = -1 }", "-hcl", 'log_level = "INFO"',
    ]  # fmt: skip
    for extra in hcl:
        cmd += ["-hcl", extra]
    if data_dir is not None:
        # -dev keeps state in memory; a data dir makes a restart keep the catalog (and its index).
        cmd[3:3] = ["-data-dir", str(data_dir)]
    return cmd


def get_json(url: str, timeout: float = 2.0) -> object:
    """GET `url` and decode its JSON body (an empty body is None)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def consul_leader(http_port: int) -> str | None:
    leader = get_json(f"http://127.0.0.1:{http_port}/v1/status/leader")
    return str(leader) if leader else None


def start_consul_dev(
    binary: str,
    log_path: Path,
    ports: ConsulPorts | None = None,
    node: str = "dev",
    data_dir: Path | None = None,
    timeout: float = 30.0,
    hcl: tuple[str, ...] = (),
) -> ManagedProcess:
    """Start a Consul dev agent and return once it has elected itself leader."""
    ports = ports or ConsulPorts.free()
    proc = spawn("consul", consul_dev_command(binary, ports, node, data_dir, hcl), log_path)
    proc.extra["ports"] = ports
    proc.extra["http_addr"] = f"127.0.0.1:{ports.http}"

    def ready() -> str | None:
        if not proc.alive():
            raise RuntimeError(f"consul exited with {proc.popen.returncode}:\n{proc.log_text(3000)}")
        return consul_leader(ports.http)

    try:
        wait_until(ready, timeout, f"Consul leader on 127.0.0.1:{ports.http}")
    except BaseException:
        proc.stop()
        raise
    return proc


def start_haproxy(
    binary: str,
    config: Path,
    master_socket: Path,
    log_path: Path,
    timeout: float = 15.0,
    wrap: Callable[[list[str]], list[str]] = list,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start HAProxy in master-worker mode (`-W -S`) in the foreground; ready once a worker runs.

    `wrap` turns the command into the one to run (the lab runs it inside a network namespace);
    a relative `config` is relative to `cwd`."""
    cmd = wrap([binary, "-W", "-S", f"{master_socket},mode,600", "-f", str(config)])
    proc = spawn("haproxy", cmd, log_path, cwd=cwd)
    proc.extra["master_socket"] = str(master_socket)
    cli = MasterCLI(str(master_socket))

    def ready() -> ProcInfo | None:
        if not proc.alive():
            raise RuntimeError(f"haproxy exited with {proc.popen.returncode}:\n{proc.log_text(3000)}")
        info = cli.show_proc()
        return info if info.workers else None

    try:
        wait_until(ready, timeout, f"HAProxy master socket {master_socket}")
    except BaseException:
        proc.stop()
        raise
    return proc


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """GET `url`: (status, body); connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode(errors="replace")


def find_consul() -> str:
    """A Consul agent binary: `consul` on PATH. `make` puts `.tools/bin` (where it fetches Consul
    1.8.7) first on PATH; run through make, or put a Consul 1.8+ on PATH yourself."""
    on_path = shutil.which("consul")
    if on_path:
        return os.path.abspath(on_path)  # a relative PATH entry (`.tools/bin`) fails where cwd changes
    raise RuntimeError(
        "no consul binary on PATH: run through `make` (it fetches Consul 1.8.7 into .tools/bin) "
        "or put a Consul 1.8 or newer on PATH"
    )


def consul_version(binary: str) -> str:
    return program_version(binary, ["version"], r"Consul v(\S+)")
