"""Talking to HAProxy: `haproxy -c`, the master CLI (reload, show proc) and the Runtime API socket.

Facts measured against HAProxy 2.8 that shape this module:
- Both sockets answer one command per connection once the client half-closes its side.
- The master CLI's `reload` answers `Success=1` or `Success=0`, then `--`, then the startup log.
- Right after a reload the master briefly refuses connections: callers retry with a short backoff.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set, wait_random_exponential

from renderer.commands import Hurry, probe, run_command
from renderer.errors import ReloadError, ValidationError
from renderer.haproxy.runtime_grammar import Command

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 10.0


def send_command(socket_path: str, command: str, timeout: float = SOCKET_TIMEOUT_S) -> str:
    """Send one command to an HAProxy UNIX socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def send_with_retry(
    socket_path: str,
    command: str,
    deadline_s: float = 5.0,
    timeout: float = SOCKET_TIMEOUT_S,
    interrupt: threading.Event | None = None,
) -> str:
    """`send_command`, retried while the socket is missing or refuses (e.g. just after a reload).

    `interrupt`: set when the renderer stops; the retries end at once (HAProxy may be gone for good).
    """
    stop = stop_after_delay(deadline_s)

    def sleep(seconds: float) -> None:
        if interrupt is None:
            time.sleep(seconds)
        else:
            interrupt.wait(seconds)

    retrying = Retrying(
        retry=retry_if_exception_type((ConnectionRefusedError, FileNotFoundError, ConnectionResetError)),
        wait=wait_random_exponential(multiplier=0.01, max=0.25),
        stop=stop | stop_when_event_set(interrupt) if interrupt is not None else stop,
        sleep=sleep,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                return send_command(socket_path, command, timeout)
    except FileNotFoundError as err:
        raise ReloadError(
            f"HAProxy socket {socket_path} does not exist: is HAProxy running with -S {socket_path} "
            "(master CLI) or a stats socket at that path?"
        ) from err
    except ConnectionRefusedError as err:
        raise ReloadError(f"nothing accepts connections on {socket_path}: HAProxy is not running") from err
    except (OSError, TimeoutError) as err:
        raise ReloadError(f"HAProxy socket {socket_path}: {first_line(command)!r} failed: {err}") from err
    raise AssertionError("unreachable")


def first_line(command: str) -> str:
    """A command for a message: its first line. A payload's lines are not shown: `set ssl cert`'s is a
    certificate's private key, which a timed-out command wrote whole to the log (helper-139's run)."""
    line, payload, _ = command.partition("\n")
    return f"{line} … (payload not shown)" if payload else line


def check_config(binary: str, path: Path | str, timeout: float = 30.0, background: Hurry | None = None) -> None:
    """Run `haproxy -c -f path`; raise ValidationError with HAProxy's own text when it fails.
    `background`: at a lower CPU priority (see `run_command`)."""
    cmd = [binary, "-c", "-f", str(path)]
    done = run_command(cmd, timeout, ValidationError, f"`{' '.join(cmd)}`", background)
    if not done.ok:
        raise ValidationError(f"haproxy -c rejected {path}:\n{done.output}")


def check_new_binds(running: str | None, new: str, judge: BindJudge | None = None) -> None:
    """Test-bind every TCP address the new config binds and the running one does not.

    `haproxy -c` does not bind. A reload whose new listener finds its port taken fails, and
    HAProxy 2.8 stops accepting on its existing listeners for ~2 s meanwhile (measured here).
    Only "address in use" counts: a port we may not bind (a privileged port, HAProxy as root) is
    left to HAProxy. The error has one line per taken port, naming the section as HAProxy's own
    alerts do (`listen 'db'`), so that each TCP service asking for a port another process holds is
    left out alone, all in one round (quarantine): one clash a round let five registrations
    exhaust the rounds and freeze every update. `judge(kind, host, port, in_use)` says why a section
    of `kind` may not bind an address (None: it may), given what the probe found; by default a port
    another process holds, only (deliver.busy_ports remembers which ones it saw held).
    """
    from renderer.haproxy.config_text import bind_lines, parse_sections, tcp_binds_by_section

    if running and bind_lines(running) == bind_lines(new):
        return
    old = set(tcp_binds_by_section(parse_sections(running))) if running else set()
    judge = judge or _in_use_only
    taken: list[str] = []
    for (host, port), (kind, name) in sorted(tcp_binds_by_section(parse_sections(new)).items()):
        why = None if _held_by_haproxy(host, port, old) else judge(kind, host, port, port_in_use(host, port))
        if why is not None:
            taken.append(f"[ALERT]    (bind pre-check) : config : {kind} '{name}': bind {host}:{port} {why}")
    if taken:
        raise ValidationError("\n".join(taken))


BindJudge = Callable[[str, str, int, bool], str | None]
IN_USE_REASON = "Address already in use"  # the system's words in HAProxy's "cannot bind socket (...)"
_BIND_FAILED = re.compile(
    r"(?m)^\[ALERT\] *\(\d+\) : Binding \[(?P<file>[^\]\n]*):(?P<line>\d+)\] for proxy [^\n]*?: cannot bind socket "
    r"\((?P<reason>[^)\n]*)\) for \[(?P<address>[^\]\n]*):(?P<port>\d{1,5})\]"
)


@dataclass(frozen=True)
class BindFailure:
    """A listener HAProxy could not bind when it loaded a file: the bind line's place, its address
    and the system's reason ("Address already in use": another program holds the port)."""

    file: str
    line: int
    host: str
    port: int
    reason: str


def bind_failures(startup_log: str) -> list[BindFailure]:
    """The listeners a reload's startup log says HAProxy could not bind (2.8: `Binding [FILE:LINE]
    for proxy NAME: cannot bind socket (REASON) for [ADDRESS:PORT]`). The check before a reload
    probes each new port, but a program may take one between that probe and the reload: then the
    reload failed, and every reload of the file after it, since the file was never checked again."""
    return [
        BindFailure(m["file"], int(m["line"]), m["address"], int(m["port"]), m["reason"])
        for m in _BIND_FAILED.finditer(startup_log)
    ]


IN_USE = (
    "is already in use by another process; a reload would fail (and HAProxy would stop accepting "
    "connections while it retried)"
)


def _in_use_only(kind: str, host: str, port: int, in_use: bool) -> str | None:
    return IN_USE if in_use else None


_ANY = ("0.0.0.0", "::")


def _held_by_haproxy(host: str, port: int, running: set[tuple[str, int]]) -> bool:
    """Whether the running config binds an address of `port` that overlaps `host` (the same one, or
    a wildcard on either side): HAProxy's new worker binds it beside the old (SO_REUSEPORT), and a
    probe would find it held by HAProxy itself (`::` over its `*`, bindv6only=0). Another address
    of that port is probed: another process may hold it."""
    return any(p == port and (h == host or h in _ANY or host in _ANY) for h, p in running)


def port_in_use(host: str, port: int) -> bool:
    """Whether another process holds (host, port): only EADDRINUSE counts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def has_prometheus_exporter(binary: str) -> bool:
    """Whether this HAProxy build carries the Prometheus exporter service (USE_PROMEX)."""
    return "Prometheus exporter" in probe([binary, "-vv"])


@dataclass(frozen=True)
class ProcInfo:
    master_pid: int
    reloads: int
    failed_reloads: int
    workers: tuple[int, ...]


def parse_show_proc(text: str) -> ProcInfo:
    """Parse the master CLI's `show proc` (the current worker is listed first)."""
    master = re.search(r"^(\d+)\s+master\s+(\d+)(?:\s+\[failed:\s*(\d+)\])?", text, re.M)
    if not master:
        raise ReloadError(f"unexpected `show proc` answer: {text[:200]!r}")
    workers = tuple(int(m.group(1)) for m in re.finditer(r"^(\d+)\s+worker\b", text, re.M))
    return ProcInfo(int(master.group(1)), int(master.group(2)), int(master.group(3) or 0), workers)


@dataclass(frozen=True)
class ReloadResult:
    success: bool
    worker_pid: int | None
    log: str
    duration_s: float


class MasterCLI:
    """HAProxy's master CLI (`haproxy -W -S PATH`): reloads and process listing."""

    def __init__(
        self, socket_path: str, reload_timeout: float = 30.0, interrupt: threading.Event | None = None
    ) -> None:
        self.socket_path = socket_path
        self.reload_timeout = reload_timeout
        self.interrupt = interrupt  # set when the renderer stops: no more retries

    def show_proc(self) -> ProcInfo:
        return parse_show_proc(send_with_retry(self.socket_path, "show proc", interrupt=self.interrupt))

    def worker_command(self, command: str) -> str:
        """A Runtime API command sent to the current worker through the master (`@1 command`)."""
        return send_with_retry(self.socket_path, f"@1 {command}", interrupt=self.interrupt)

    def reload(self) -> ReloadResult:
        """Reload and confirm that a new worker runs; raise ReloadError when HAProxy says it failed."""
        started = time.monotonic()
        before = self.show_proc()
        # The master answers once the new worker has loaded (or failed to): that is the reload's timeout.
        answer = send_with_retry(self.socket_path, "reload", timeout=self.reload_timeout, interrupt=self.interrupt)
        status, _, startup_log = answer.partition("\n--\n")
        if status.strip() == "Success=0":
            raise ReloadError(f"HAProxy refused the reload; old workers keep serving:\n{startup_log.strip()}")
        after = self.show_proc()
        if status.strip() != "Success=1" and after.reloads == before.reloads:
            # Older HAProxy versions answer nothing: confirm through the reload counter instead.
            raise ReloadError(f"reload not confirmed by `show proc` (answer: {answer[:200]!r})")
        worker = after.workers[0] if after.workers else None
        duration = time.monotonic() - started
        return ReloadResult(True, worker, startup_log.strip(), duration)


class RuntimeAPI:
    """HAProxy's Runtime API, through a stats socket or through the master CLI (`@1`)."""

    def __init__(self, stats_socket: str | None = None, master: MasterCLI | None = None) -> None:
        if not stats_socket and not master:
            raise ValueError("RuntimeAPI needs a stats socket or a master CLI")
        self.stats_socket = stats_socket
        self.master = master

    def command(self, command: Command) -> str:
        """Send one command built by `runtime_grammar.command` (checked word by word)."""
        return self._send(command)

    def chain(self, commands: Sequence[Command]) -> list[str]:
        """Send several commands on one line, one round trip, and return each one's answer.

        HAProxy runs every command of a line in turn whatever the one before answered: chain only
        commands that do no harm after a refusal. Each command's answer ends with an empty line;
        an output that cannot be cut into exactly one answer per command (an answer with an empty
        line of its own) raises ReloadError, the commands having run."""
        if any(not isinstance(c, Command) or any(ch in c for ch in ";\r\n#") for c in commands):
            raise ValueError("only checked commands without a payload can be chained")
        # Through the master each command names the worker (`@1`); `_send` adds the first one's.
        line = ("; " if self.stats_socket else "; @1 ").join(commands)
        raw = self._send(line)
        answers = split_answers(raw, len(commands))
        if answers is None:
            raise ReloadError(f"cannot tell the answers of `{line}` apart: {raw[:300]!r}")
        return answers

    def _send(self, line: str) -> str:
        if self.stats_socket:
            return send_with_retry(self.stats_socket, line, interrupt=self.master.interrupt if self.master else None)
        assert self.master is not None
        return self.master.worker_command(line)


def split_answers(raw: str, count: int) -> list[str] | None:
    """The answers of `count` commands sent on one line: each is empty or one paragraph, and ends
    with an empty line (HAProxy 2.8); None when `raw` is not exactly that."""
    answers, rest = [], raw
    for _ in range(count):
        if rest.startswith("\n"):
            answers.append("")
            rest = rest[1:]
            continue
        text, separator, rest = rest.partition("\n\n")
        if not separator:
            return None
        answers.append(text)
    return answers if rest == "" else None
