"""What the lab measures: failed requests in a time window, and when a change reaches each load balancer."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lab.processes import http_get


@dataclass(frozen=True)
class Window:
    """What the client host's load saw between two instants (unix time)."""

    ok: int
    failed: int
    errors: tuple[str, ...]
    slowest_ms: float  # the slowest successful request: how long a client waited at worst

    @classmethod
    def read(cls, load_log: Path, start: float, end: float) -> Window:
        ok, errors, slowest = 0, [], 0.0
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
            else:
                errors.append(f"{record['url']}: {record['error']}")
        return cls(ok, len(errors), tuple(errors), slowest)


def window_until_now(load_log: Path, since: float, timeout: float = 5.0) -> Window:
    """The window from `since` to now, once the load has written the counts that cover now (it
    writes them once a second)."""
    now = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = load_log.read_text() if load_log.exists() else ""
        last = next((line for line in reversed(text.splitlines()) if '"ok"' in line), "")
        try:
            if json.loads(last)["t"] >= now:
                return Window.read(load_log, since, time.time())
        except (ValueError, KeyError):
            pass  # no complete counts line yet
        time.sleep(0.05)
    raise TimeoutError(f"the load wrote no counts for {timeout:.0f}s; is it running? see {load_log}")


def wait_for_load(load_log: Path, timeout: float = 10.0) -> None:
    """Until the load has reported successful requests (it is running and HAProxy answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Window.read(load_log, 0, time.time()).ok > 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the load reported no successful request within {timeout:.0f}s; see {load_log}")


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
