"""What the lab measures: failed requests in a time window, and when a change reaches each load balancer."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab.processes import http_get, wait_until


@dataclass(frozen=True)
class Window:
    """What the client host's load saw between two instants (unix time)."""

    ok: int
    failed: int
    errors: tuple[str, ...]
    slowest_ms: float  # the slowest successful request: how long a client waited at worst
    counted_until: float = 0.0  # the time of the last counts line in the window

    @classmethod
    def read(cls, load_log: Path, start: float, end: float) -> Window:
        ok, errors, slowest, counted_until = 0, [], 0.0, 0.0
        text = load_log.read_text() if load_log.exists() else ""  # the load may not have started yet
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if not start <= record["t"] <= end:
                continue
            if "ok" in record:
                ok += sum(record["ok"].values())
                slowest = max(slowest, record.get("slowest_ms", 0.0))
                counted_until = record["t"]
            else:
                errors.append(f"{record['url']}: {record['error']}")
        return cls(ok, len(errors), tuple(errors), slowest, counted_until)


def window_until_now(load_log: Path, since: float, timeout: float = 5.0) -> Window:
    """The window from `since` to now, once the load has written the counts that cover now (it
    writes them once a second)."""
    now = time.time()

    def covered() -> Window | None:
        window = Window.read(load_log, since, time.time())
        return window if window.counted_until >= now else None

    return wait_until(covered, timeout, f"the load to write its counts (is it running? see {load_log})", 0.05)


def wait_for_load(load_log: Path, timeout: float = 10.0) -> None:
    """Until the load has reported successful requests (it is running and HAProxy answers)."""
    wait_until(lambda: Window.read(load_log, 0, time.time()).ok > 0, timeout, f"successful requests in {load_log}")


def served_after(urls: list[str], instance: str, present: bool, start: float, timeout: float = 30.0) -> list[float]:
    """Seconds from `start` (monotonic) until each URL first answers from `instance` (present) or
    answers 40 times in a row from others (not present); one thread per URL, polling back to back."""
    results: list[float] = [float("nan")] * len(urls)

    def poll(n: int, url: str) -> None:
        deadline = start + timeout
        others = 0
        last_seen = time.monotonic()
        while time.monotonic() < deadline:
            try:
                status, body = http_get(url, timeout=5)
            except OSError:
                continue
            now = time.monotonic()
            if present and status == 200 and body.strip() == instance:
                results[n] = now - start
                return
            if not present:
                if body.strip() == instance:
                    others, last_seen = 0, now
                else:
                    others += 1
                    if others >= 40:
                        results[n] = last_seen - start if last_seen > start else 0.0
                        return

    threads = [threading.Thread(target=poll, args=(n, url), daemon=True) for n, url in enumerate(urls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 5)
    return results
