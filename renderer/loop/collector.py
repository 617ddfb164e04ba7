"""Python's cyclic garbage collector, kept off a change's path.

At 1,000 services × 10 the renderer holds a few million objects the collector tracks, and a full
(generation 2) collection scans every one of them: 120-456 ms with the event loop stopped,
measured in the bench (gc callbacks on the live renderer, 8 such collections in a 2-minute run).
The collector starts one whenever allocations cross its thresholds, that is mostly while a change
is parsed and rendered, so the pause lands on a change.

So, after every cycle that did work (the loop then waits for the next change): a collection of
what is not frozen (what that cycle left: cheap), then `gc.freeze()` (everything alive is moved
out of the collector's sight; it is still freed by reference counting when its last reference
goes). The collections the thresholds start from then on scan only what arrived since. Only a
reference cycle that becomes garbage while frozen would outlive its last use, so every
`full_every_s` the loop, when idle, does one full collection over everything and freezes again
(a timer of the loop: `Wake.COLLECT`); under changes without an idle moment, the first cycle
after it is due does it.

Idle is not still: blocking queries expire and are asked again (at 1,000 keys all of them within
a minute, 10 minutes after they started), members are read, checks updated. What that leaves
alive stayed unfrozen until the next change, which then paid for it: the first change after ~12
minutes idle waited 94 ms for a collection before its second render, and its after-cycle
collection took 136 ms (bench, 1,000 × 10 over HTTP/2, `--idle-seconds 700`). So while idle,
every `freeze_every_s`, what arrived since the last freeze is collected and frozen (a few ms).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

log = logging.getLogger(__name__)

FULL_EVERY_S = 600.0
FREEZE_EVERY_S = 30.0
# … and sooner once the process has grown to twice its size after the last full one (from at least
# this many bytes): whatever else leaves reference cycles as garbage while frozen (tenacity's retry
# state did, one per held query, and the write-behind's jobs with the file each held: a registrant
# writing 70 times a second grew the renderer from 94 to 740 MB in the 10 minutes; helper-134,
# /tmp/rev80) grows it to twice its size at most. The resident size, not `gc.get_freeze_count()`:
# that walks every frozen object (13.5 ms at 3 million), and asked after each cycle it made every
# change that takes two cycles (a removal, a failing check) ~35 ms slower at 1,000 × 10 (bench).
FULL_WHEN_RSS_FROM = 64 * 1024 * 1024


def resident_bytes() -> Callable[[], int]:
    """A reader of this process's resident size (~13 µs a call)."""
    process = psutil.Process()
    return lambda: int(process.memory_info().rss)


@dataclass
class Collector:
    """When the garbage collector may run long: after a cycle, and idle every `full_every_s`."""

    full_every_s: float = FULL_EVERY_S
    freeze_every_s: float = FREEZE_EVERY_S
    clock: Callable[[], float] = time.monotonic
    enabled: bool = True
    last_full: float | None = field(default=None)  # None: nothing frozen yet
    last_freeze: float | None = field(default=None)
    memory: Callable[[], int] = field(default_factory=resident_bytes)
    memory_after_full: int = 0  # the resident size after the last full collection

    def after_cycle(self) -> None:
        """A cycle did its work: collect what it left and freeze the rest (the first time, a full one)."""
        if not self.enabled:
            return
        if self._full_due():
            self.full()  # the first, or one the loop had no idle moment for
        else:
            self._freeze("after a cycle")

    def idle(self) -> None:
        """The loop is idle and a collection is due (`due_at`): the full one when it is due, else
        what arrived since the last freeze, collected and frozen."""
        if not self.enabled or self.last_full is None:
            return
        if self._full_due():
            self.full()
        else:
            self._freeze("idle")

    def _full_due(self) -> bool:
        """The first collection (nothing frozen yet), `full_every_s` since the last full one, or the
        process twice its size after it (see FULL_WHEN_RSS_FROM)."""
        if self.last_full is None or self.clock() >= self.last_full + self.full_every_s:
            return True
        return self.memory() >= 2 * max(self.memory_after_full, FULL_WHEN_RSS_FROM)

    def _freeze(self, when: str) -> None:
        found, took_ms = collect_and_freeze()
        self.last_freeze = self.clock()
        log.debug("%s: collected %d objects, froze what arrived since the last freeze (%.1f ms)", when, found, took_ms)

    def full(self) -> None:
        """Everything scanned once (frozen or not), then frozen again."""
        if not self.enabled:
            return
        gc.unfreeze()
        found, took_ms = collect_and_freeze()
        self.last_full = self.last_freeze = self.clock()
        self.memory_after_full = self.memory()
        log.debug("full garbage collection: %d objects freed, %.0f ms", found, took_ms)

    def due_at(self) -> float | None:
        """When the loop, idle, should next call `idle` (monotonic): the next full collection or
        the next freeze of what arrived since the last one, whichever comes first; None before the
        first cycle."""
        if not self.enabled or self.last_full is None:
            return None
        full = self.last_full + self.full_every_s
        return full if self.last_freeze is None else min(full, self.last_freeze + self.freeze_every_s)


def collect_and_freeze() -> tuple[int, float]:
    """Collect what is not frozen, then freeze what lives: (objects freed, ms it took)."""
    started = time.perf_counter()
    found = gc.collect()
    gc.freeze()
    return found, (time.perf_counter() - started) * 1000
