"""Logging set-up: human-readable lines by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any


def shown(value: str, limit: int = 60) -> str:
    """A hostile value for a log line or a report: quoted and escaped (one line), cut to `limit`
    characters (a name from Consul may be a megabyte long)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


@dataclass
class LineBudget:
    """How many lines of one kind may be logged: `burst` at once, then `per_s` a second. A
    registrant churning bad registrations made ~4 lines each, 165 kB of log a second (helper-133,
    /tmp/rev79); past the budget the lines are counted and told in one line later (`owed`)."""

    burst: float = 50.0
    per_s: float = 1.0
    tokens: float = 50.0
    at: float = -math.inf  # monotonic: when `tokens` was counted
    skipped: int = 0  # lines not logged since the last `owed`

    def take(self, wanted: int, now: float) -> int:
        """How many of `wanted` lines may be logged at `now` (monotonic); the rest count as skipped."""
        elapsed = max(0.0, now - self.at)  # a clock that went back gives nothing (and takes nothing)
        self.tokens = min(self.burst, self.tokens + elapsed * self.per_s)  # the first call: elapsed is inf
        self.at = max(self.at, now)
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        self.skipped += wanted - granted
        return granted

    def owed(self, now: float) -> int:
        """The lines skipped, once a line telling how many may be logged (0 until then)."""
        if not self.skipped:
            return 0
        skipped = self.skipped
        self.skipped = 0
        if self.take(1, now):
            return skipped
        self.skipped = skipped  # the one line asked for was not counted as skipped: it is the count
        return 0


_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every secret (an ACL token) replaced, for --dry output and error messages."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug; per-event and per-request lines always do
    # (watchdog's events; HTTP/2's lines per request, frame and header: thousands a second).
    for noisy in ("asyncio", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    for per_event in ("watchdog", "httpx", "httpcore", "hpack", "h2"):
        logging.getLogger(per_event).setLevel(logging.WARNING)
    # A traceback per malformed request to the status port: any client could write thousands a second.
    logging.getLogger("aiohttp.server").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
