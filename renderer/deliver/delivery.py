"""The front door of delivery: "make HAProxy (or the template's command) run this rendered content".

`Delivery.deliver(spec, content)` is all the runner calls for a rendered file. Behind it, per
destination: content that failed validation is not tried again until it changes; an apply that
failed is retried with a doubling backoff (`ApplyState`); the hitless path or validate → swap →
reload/command is chosen and carried out (`Installer`); failures found later (a file written
behind its runtime changes that fails its check) are reported through the same callback. The
runner also asks it when it next wants to act (`next_due`: a retry, servers still draining),
lets it do that work (`maintain`), hands it a new configuration on SIGHUP (`reconfigure`) and
waits for it on the way out (`flush`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from renderer.config import Config, TemplateSpec
from renderer.deliver.apply import Applier
from renderer.deliver.install import ApplyState, Installer
from renderer.errors import ReloadError, RendererError, ValidationError, WriteError
from renderer.haproxy.child import HAProxyChild
from renderer.status import Status

CLEANUP_INTERVAL_S = 0.1  # how often removed servers still draining are retried for deletion

Report = Callable[[TemplateSpec, RendererError], None]


@dataclass
class _Destination:
    """What delivery remembers of one destination between renders (kept across a SIGHUP)."""

    apply: ApplyState = field(default_factory=ApplyState)
    rejected: str | None = None  # content that failed validation: not tried again until it changes


class Delivery:
    """Makes HAProxy (or a template's command) run rendered content; one per renderer process."""

    def __init__(
        self,
        config: Config,
        status: Status,
        haproxy_bin: str | None,
        last_change: Callable[[], float],
        report: Report,
        haproxy_child: HAProxyChild | None = None,
        interrupt: threading.Event | None = None,
        applier: Applier | None = None,
    ) -> None:
        """`report` hears of every failure, found at once or later (write-behind); `interrupt` is
        set when the renderer stops, so that no apply keeps retrying a HAProxy that is gone;
        `applier` (default: one made from `config`) carries out reloads, commands and runtime plans."""
        self._report = report
        self._interrupt = interrupt
        self._destinations: dict[Path, _Destination] = {}
        self._installer = Installer(
            applier or Applier(config, interrupt=interrupt),
            status,
            haproxy_bin,
            last_change,
            haproxy_child,
            # --once: nobody to tell later, so the file is finished before deliver() returns.
            on_file_error=None if config.once else self._file_failed,
        )

    async def deliver(self, spec: TemplateSpec, content: str) -> bool:
        """Make HAProxy (or the command) run `content`: True once it does, False when it failed
        (reported), was rejected before, or waits for a retry of a failed apply."""
        destination = self._destination(spec.destination)
        if content == destination.rejected and not destination.apply.pending:
            return False
        if destination.apply.backing_off:
            return False  # an apply failed: its retry comes when next_due() says so
        try:
            await self._installer.install(spec, destination.apply, content)
        except (ValidationError, WriteError, ReloadError) as err:
            if isinstance(err, ValidationError):
                destination.rejected = content
            self._report(spec, err)
            return False
        destination.rejected = None
        return True

    def next_due(self) -> float | None:
        """When delivery wants to act again without new content (monotonic), or None."""
        due = [d.apply.retry_at for d in self._destinations.values() if d.apply.pending]
        if self._installer.applier.has_cleanup:
            due.append(time.monotonic() + CLEANUP_INTERVAL_S)
        return min(due) if due else None

    def retry_due(self) -> bool:
        """True when a failed apply is due for its retry (the runner then renders and delivers)."""
        now = time.monotonic()
        return any(d.apply.pending and d.apply.retry_at <= now for d in self._destinations.values())

    async def maintain(self) -> None:
        """Delete servers that were removed and are still draining, if any."""
        if self._installer.applier.has_cleanup:
            await asyncio.to_thread(self._installer.applier.cleanup)

    def reconfigure(self, config: Config) -> None:
        """A new configuration (SIGHUP): a new applier, with the servers still draining and the time
        of the last reload carried over; rejected content may be tried again."""
        self._installer.applier = Applier(config, previous=self._installer.applier, interrupt=self._interrupt)
        for destination in self._destinations.values():
            destination.rejected = None

    async def flush(self) -> None:
        """Wait for files still being written behind their runtime changes."""
        await self._installer.flush()

    def _destination(self, path: Path) -> _Destination:
        return self._destinations.setdefault(path, _Destination())

    def _file_failed(self, spec: TemplateSpec, err: RendererError, content: str) -> None:
        """A file written behind its runtime changes failed its check (or its write): HAProxy was
        brought back to the live file; the same content is not tried again until it changes."""
        if isinstance(err, ValidationError):
            self._destination(spec.destination).rejected = content
        self._report(spec, err)
