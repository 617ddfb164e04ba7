"""While Consul fails: a progress line, never a line per watched key."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from renderer.source.store import Store

log = logging.getLogger("renderer.runner")


@dataclass
class OutageReport:
    """While Consul fails: one progress line every `every_s` (how long, how many failures, what
    waits), and one line when it answers again."""

    address: str
    every_s: float = 10.0
    since: float | None = None
    next_line_at: float | None = None
    errors_at_start: int = 0

    def check(self, store: Store, watched: int) -> None:
        now, failing = time.monotonic(), store.failing()
        if failing and self.since is None:
            self.since, self.next_line_at, self.errors_at_start = now, now + self.every_s, store.watch_errors
        elif failing and self.since is not None and self.next_line_at is not None and now >= self.next_line_at:
            self.next_line_at = now + self.every_s
            log.warning(
                "Consul at %s failing for %.0fs (%d failed queries; %d of %d watched keys waiting; retrying, "
                "never giving up): %s",
                self.address, now - self.since, store.watch_errors - self.errors_at_start, failing, watched,
                store.last_error,
            )  # fmt: skip
        elif not failing and self.since is not None:
            log.info("Consul at %s answers again after %.0fs", self.address, now - self.since)
            self.since = self.next_line_at = None
