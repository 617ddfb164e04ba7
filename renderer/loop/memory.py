"""What a template's renderer remembers of the services, kept beside its output across a restart.

Two memories decide against a registration that comes at the wrong moment: who had each HAProxy
name (a case variant registered while the service is out of the catalog for a redeploy does not
take it, for NAME_HOLD_S) and the settings a service's instances last agreed on (a TCP service
keeps its listener and port beside an instance without meta). Both lived in the process only: an
attacker's re-review (/tmp/rev20) restarted the renderer inside a name's hold and the variant took
the backend for good, and restarted it beside a hostile instance without meta and the TCP service
became an HTTP backend. They are kept at `.NAME.memory.json` beside the output, as the port holds
are, each name's hold with its wall-clock time; what is read back is checked as it was when it
came from Consul (a file anyone could have edited is no more trusted than the catalog).

The file is written behind the loop, in a thread, at most once per WRITE_GAP_S and always ending
on the newest memory: it was written whole in the render pass, 10-17 ms per render that changed
a hold at 4,096 held names (an attacker's review, /tmp/rev22). A write that fails (disk full) is
tried again, further apart each time, until one succeeds; the loop flushes it on the way out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renderer.deliver.write import live_bytes, write_atomically
from renderer.errors import WriteError
from renderer.haproxy.checked import NAME_HOLD_S, Holder, setting_problem
from renderer.render.template import TemplateRenderer

log = logging.getLogger(__name__)

Agreed = dict[str, dict[str, str]]
Kept = dict[str, Any]  # the file's JSON object

WRITE_GAP_S = 1.0  # between two writes of a memory file: a churn of holds costs one write a second
WRITE_RETRY_MAX_S = 30.0  # a write that keeps failing (disk full) is tried again up to this far apart


@dataclass
class RendererMemory:
    """One template's memory file, and what was last written to it (written again only on change)."""

    path: Path
    _kept: tuple[dict[str, Holder], Agreed] | None = field(default=None, repr=False)  # the newest handed on
    _failed: bool = field(default=False, repr=False)  # a write failed: said once until one succeeds
    _next: Kept | None = field(default=None, repr=False)  # the newest not written yet (under _handoff)
    _writer: asyncio.Task[None] | None = field(default=None, repr=False)
    _writing: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one write at a time
    _handoff: threading.Lock = field(default_factory=threading.Lock, repr=False)  # _next, between loop and thread
    _retired: bool = field(default=False, repr=False)  # its template was removed: one last try, no retries

    @classmethod
    def beside(cls, destination: Path) -> RendererMemory:
        return cls(destination.with_name(f".{destination.name}.memory.json"))

    def restore(self, renderer: TemplateRenderer) -> None:
        """Give `renderer` what a previous run kept (holds not yet over, settings that pass their
        checks); none when there is no file or it cannot be read (said once)."""
        holders, agreed = self._read()
        renderer.restore(holders, agreed)
        self._kept = (dict(holders), _copy(agreed))

    def keep(self, renderer: TemplateRenderer) -> None:
        """Keep what `renderer` remembers now, if it changed since the last time: written behind
        the running loop (`flush` waits for it), or at once when no loop runs."""
        holders, agreed = renderer.remembered()
        if self._kept is not None and self._kept == (holders, agreed):
            return
        holders, agreed = dict(holders), _copy(agreed)
        self._kept = (holders, agreed)
        now_wall, now = time.time(), time.monotonic()
        kept: Kept = {
            "holders": {
                folded: [held.identifier, held.name, None if held.gone_at is None else now_wall - (now - held.gone_at)]
                for folded, held in holders.items()
            },
            "agreed": agreed,
        }
        with self._handoff:
            self._next = kept
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_next()
            return
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_behind(), name=f"keep {self.path.name}")

    async def flush(self) -> None:
        """Write what is not written yet, now (the loop's way out)."""
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()  # in its gap, or its thread's write, which ends by itself
        await asyncio.to_thread(self._write_next)

    def retire(self) -> None:
        """Its template was removed (SIGHUP): what is not written yet gets one more try, then the
        writer ends, failed or not. It went on retrying a failing write every 30 s until exit."""
        self._retired = True

    async def _write_behind(self) -> None:
        gap = WRITE_GAP_S
        while self._next is not None:
            written = await asyncio.to_thread(self._write_next)
            if self._retired:
                return
            gap = WRITE_GAP_S if written else min(gap * 2, WRITE_RETRY_MAX_S)
            await asyncio.sleep(gap)

    def _write_next(self) -> bool:
        """Write the newest memory not written yet, if any (one write at a time: the newest ends).
        False when the write failed: the memory waits for the next try (the writer's backoff, a
        newer memory, or `flush`), unless a newer one came meanwhile. Only `_next` is shared with
        the loop: a failure reset `_kept` from this thread, and the loop's `keep`, reading it in
        between, raised and stopped the renderer (an attacker's review, /tmp/rev31)."""
        with self._writing:
            with self._handoff:
                kept, self._next = self._next, None
            if kept is None:
                return True
            try:
                write_atomically(self.path, json.dumps(kept, sort_keys=True))
            except (WriteError, OSError) as err:
                if not self._failed:
                    log.warning("renderer memory not kept at %s (a restart forgets it): %s", self.path, err)
                self._failed = True
                with self._handoff:
                    if self._next is None:
                        self._next = kept
                return False
            if self._failed:
                log.info("renderer memory kept at %s again", self.path)
            self._failed = False
            return True

    def _read(self) -> tuple[dict[str, Holder], Agreed]:
        try:
            raw = live_bytes(self.path)
            kept = json.loads(raw) if raw is not None else {}
        except (WriteError, ValueError, RecursionError) as err:
            log.warning("renderer memory at %s not read (%s); starting with none", self.path, err)
            return {}, {}
        if not isinstance(kept, dict):
            return {}, {}
        return _holders(kept.get("holders")), _agreed(kept.get("agreed"))


def _holders(found: Any) -> dict[str, Holder]:
    """The name holds in `found` that are well formed and not over (their times made monotonic)."""
    holders: dict[str, Holder] = {}
    now_wall, now = time.time(), time.monotonic()
    for folded, entry in found.items() if isinstance(found, dict) else ():
        if not (isinstance(entry, list) and len(entry) == 3):
            continue
        identifier, name, gone_wall = entry
        if not (isinstance(identifier, str) and isinstance(name, str) and folded == identifier.lower()):
            continue
        gone_at: float | None = None
        if gone_wall is not None:
            if not (isinstance(gone_wall, int | float) and not isinstance(gone_wall, bool)):
                continue
            ago = now_wall - float(gone_wall)
            if not math.isfinite(ago):
                continue
            gone_at = now - min(max(ago, 0.0), NAME_HOLD_S)  # a clock stepped back holds no longer than its time
        held = Holder(identifier, name, gone_at)
        if held.holds(now):
            holders[folded] = held
    return holders


def _agreed(found: Any) -> Agreed:
    """The settings in `found` that pass the checks meta passes (others dropped)."""
    agreed: Agreed = {}
    for service, settings in found.items() if isinstance(found, dict) else ():
        if not isinstance(settings, dict):
            continue
        values = {
            key: value
            for key, value in settings.items()
            if isinstance(key, str) and isinstance(value, str) and setting_problem(key, value) is None
        }
        agreed[service] = values
    return agreed


def _copy(agreed: Agreed) -> Agreed:
    return {service: dict(values) for service, values in agreed.items()}
