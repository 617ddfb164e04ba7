"""Constant HTTP load against one or more URLs, run on the lab's client host.

    python -m lab.load --out load.jsonl URL [URL ...]

Every request opens its own connection (as many browsers behind NAT would), so a server that
disappears shows up at once. The output is JSON lines, appended as they happen:
`{"t": <unix time>, "url": …, "error": …}` for every failed request (a socket error or a status
other than 200), and once a second `{"t": …, "ok": {url: count}, "slowest_ms": …}` (the slowest
successful request of that second). The harness reads the file to count failures in any time
window, so one load runs for the whole session. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import TextIO


class Recorder:
    """Writes failures at once and the per-second success counts, thread-safely."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._ok: Counter[str] = Counter()
        self._slowest = 0.0

    def ok(self, url: str, seconds: float) -> None:
        with self._lock:
            self._ok[url] += 1
            self._slowest = max(self._slowest, seconds)

    def failed(self, url: str, error: str) -> None:
        self._write({"t": time.time(), "url": url, "error": error})

    def flush_counts(self) -> None:
        with self._lock:
            counts, self._ok = dict(self._ok), Counter()
            slowest, self._slowest = self._slowest, 0.0
        self._write({"t": time.time(), "ok": counts, "slowest_ms": round(slowest * 1000, 1)})

    def _write(self, record: dict[str, object]) -> None:
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()


def hammer(url: str, recorder: Recorder, stop: threading.Event, timeout: float) -> None:
    while not stop.is_set():
        began = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            status = err.code
        except OSError as err:
            recorder.failed(url, repr(err))
            continue
        if status == 200:
            recorder.ok(url, time.monotonic() - began)
        else:
            recorder.failed(url, f"HTTP {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.load", description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads-per-url", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request (HAProxy retries inside it)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open(args.out, "a") as out:
        recorder = Recorder(out)
        threads = [
            threading.Thread(target=hammer, args=(url, recorder, stop, args.timeout), daemon=True)
            for url in args.urls
            for _ in range(args.threads_per_url)
        ]
        for thread in threads:
            thread.start()
        while not stop.wait(1.0):
            recorder.flush_counts()
        recorder.flush_counts()
    return 0


if __name__ == "__main__":
    sys.exit(main())
