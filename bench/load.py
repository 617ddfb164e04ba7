"""HTTP load and the probe that times when an instance starts and stops answering through HAProxy."""

from __future__ import annotations

import http.client
import re
import shutil
import signal
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass, field


@dataclass
class Probe:
    """Threads of keep-alive GETs that record, per instance id, when it was first and last seen."""

    host: str
    port: int
    threads: int = 2
    path: str = "/"
    gap_s: float = 0.0  # each thread's pause between requests (0: back to back)
    first_seen: dict[str, float] = field(default_factory=dict)
    last_seen: dict[str, float] = field(default_factory=dict)
    last_answer: float = 0.0  # when any instance last answered
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _active: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Probe:
        self._active.set()
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, name=f"probe-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            if not self._active.is_set() and conn is not None:
                # Paused: HAProxy closes an idle keep-alive connection after a while, and the first
                # request on it after `resume` would fail for the probe's sake, not the renderer's.
                conn.close()
                conn = None
            if not self._active.wait(0.1):
                continue
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", self.path)
                response = conn.getresponse()
                body = response.read().decode(errors="replace").strip()
                now = time.monotonic()
                if response.status != 200:
                    self._fail(f"HTTP {response.status}")
                    continue
                with self._lock:
                    self.requests += 1
                    self.first_seen.setdefault(body, now)
                    self.last_seen[body] = now
                    self.last_answer = now
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as err:
                self._fail(repr(err))
                if conn is not None:
                    conn.close()
                conn = None
            finally:
                if self.gap_s:  # after every request, answered or not
                    self._stop.wait(self.gap_s)

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def pause(self) -> None:
        """Stop sending (the threads idle) until `resume`: a probe costs a core on a small machine,
        and one that measures nothing must not slow what the others measure."""
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def forget(self, instance: str) -> None:
        """Start afresh for `instance`: a sighting from before no longer counts, first or last."""
        with self._lock:
            self.first_seen.pop(instance, None)
            self.last_seen.pop(instance, None)

    def stop(self) -> None:
        self._stop.set()
        self._active.set()
        for worker in self._workers:
            worker.join(timeout=10)


@dataclass
class LoadResult:
    tool: str
    requests: int
    non_2xx: int
    socket_errors: int
    duration_s: float

    @property
    def failed(self) -> int:
        return self.non_2xx + self.socket_errors


class WrkLoad:
    """Constant load from a second process: wrk with a few keep-alive connections, stopped by SIGINT."""

    def __init__(self, url: str, connections: int = 4) -> None:
        self._cmd = ["wrk", "-t1", f"-c{connections}", "-d3600s", "--timeout", "5s", url]
        self._proc: subprocess.Popen[str] | None = None
        self._started = 0.0

    @staticmethod
    def available() -> bool:
        return shutil.which("wrk") is not None

    def start(self) -> WrkLoad:
        self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # A bench stopped midway (an error, SIGTERM) leaves no wrk behind: killed at exit unless stopped.
        self._at_exit = weakref.finalize(self, _kill, self._proc)
        self._started = time.monotonic()
        return self

    def stop(self) -> LoadResult:
        assert self._proc is not None
        self._at_exit.detach()
        self._proc.send_signal(signal.SIGINT)
        out, _ = self._proc.communicate(timeout=30)
        return parse_wrk(out, time.monotonic() - self._started)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def parse_wrk(out: str, duration: float) -> LoadResult:
    requests = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not requests:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return LoadResult(
        "wrk",
        int(requests.group(1)),
        int(non_2xx.group(1)) if non_2xx else 0,
        sum(int(g) for g in errors.groups()) if errors else 0,
        duration,
    )


class PythonLoad:
    """The fallback when wrk is not installed: a probe with more threads, counted the same way."""

    def __init__(self, host: str, port: int, path: str = "/", threads: int = 4) -> None:
        self._probe = Probe(host, port, threads=threads, path=path)
        self._started = 0.0

    def start(self) -> PythonLoad:
        self._probe.start()
        self._started = time.monotonic()
        return self

    def stop(self) -> LoadResult:
        self._probe.stop()
        duration = time.monotonic() - self._started
        return LoadResult("python", self._probe.requests, 0, len(self._probe.failures), duration)


def constant_load(host: str, port: int, path: str = "/", connections: int = 4) -> WrkLoad | PythonLoad:
    """wrk when installed, else the Python fallback (which measures itself more than HAProxy)."""
    if WrkLoad.available():
        return WrkLoad(f"http://{host}:{port}{path}", connections=connections)
    return PythonLoad(host, port, path)
